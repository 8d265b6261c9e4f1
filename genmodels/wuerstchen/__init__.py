"""Würstchen (arXiv 2306.00637): three-stage text-to-image in pure PyTorch.

Stage A (f4 VQGAN) <- Stage B (DiffNeXt, conditioned on the semantic latent + text)
<- Stage C (text-conditional prior over the 16-channel semantic latent).
"""
from genmodels.wuerstchen.compressor import PRESETS as COMPRESSOR_PRESETS
from genmodels.wuerstchen.compressor import CompressorConfig, SemanticCompressor
from genmodels.wuerstchen.stage_a import PRESETS as STAGE_A_PRESETS
from genmodels.wuerstchen.stage_a import PatchDiscriminator, StageA, StageAConfig, estimate_latent_scale, vqgan_loss
from genmodels.wuerstchen.stage_b import PRESETS as STAGE_B_PRESETS
from genmodels.wuerstchen.stage_b import StageB, StageBConfig
from genmodels.wuerstchen.stage_c import PRESETS as STAGE_C_PRESETS
from genmodels.wuerstchen.stage_c import StageC, StageCConfig, from_prior_space, to_prior_space
from genmodels.wuerstchen.steps import (
    StageALossConfig,
    StageBLossConfig,
    StageCLossConfig,
    sample_stage_b,
    sample_stage_c,
    sample_three_stage,
    stage_a_disc_loss,
    stage_a_loss,
    stage_b_loss,
    stage_c_loss,
)
from genmodels.wuerstchen.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm
from genmodels.wuerstchen.weights import map_diffusers_state_dict, to_diffusers_state_dict

__all__ = [
    "COMPRESSOR_PRESETS",
    "STAGE_A_PRESETS",
    "STAGE_B_PRESETS",
    "STAGE_C_PRESETS",
    "CompressorConfig",
    "PatchDiscriminator",
    "SemanticCompressor",
    "StageA",
    "StageAConfig",
    "StageALossConfig",
    "StageB",
    "StageBConfig",
    "StageBLossConfig",
    "StageC",
    "StageCConfig",
    "StageCLossConfig",
    "SyncBatchNorm2d",
    "convert_sync_batchnorm",
    "estimate_latent_scale",
    "from_prior_space",
    "map_diffusers_state_dict",
    "sample_stage_b",
    "sample_stage_c",
    "sample_three_stage",
    "stage_a_disc_loss",
    "stage_a_loss",
    "stage_b_loss",
    "stage_c_loss",
    "to_diffusers_state_dict",
    "to_prior_space",
    "vqgan_loss",
]
