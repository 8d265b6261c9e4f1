"""Image-generation metrics as small pure functions over features or images."""

from genmodels.metrics.clip_score import clip_score, clip_score_from_encoders
from genmodels.metrics.features import ImageFeatures, dinov2_features, inception_features, tiny_features
from genmodels.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_from_features
from genmodels.metrics.inception_score import inception_score
from genmodels.metrics.prdc import knn_radii, prdc
from genmodels.metrics.swd import laplacian_pyramid, sliced_wasserstein_distance, swd, swd_descriptors

__all__ = [
    "FeatureStats",
    "ImageFeatures",
    "clip_score",
    "clip_score_from_encoders",
    "dinov2_features",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_features",
    "inception_score",
    "knn_radii",
    "laplacian_pyramid",
    "prdc",
    "sliced_wasserstein_distance",
    "swd",
    "swd_descriptors",
    "tiny_features",
]
