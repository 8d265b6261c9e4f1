"""Würstchen (arXiv 2306.00637) as pipeline stages: its rows of the stage table and its sampler.

    shard ─► stage_a ─► encode_a ─► stage_b ─► encode_semantic ─► stage_c ─► sample (A, B, C)
    (both encode stages read the text encoder's weights from the `clip` stage: workflows/text_clip.py)

``models`` builds and loads the networks; ``stages`` trains A, B (+ compressor) and C;
``encode`` precomputes latents and text states with Ray Data; ``sample`` is the sampler (also
the CLI ``python -m workflows.wuerstchen.sample``); ``official`` loads the public v2 weights.
"""

from __future__ import annotations

from pipeline.stage import Stage, pool_resources
from workflows.train import train_resources
from workflows.wuerstchen import encode, sample, stages
from workflows.wuerstchen.sample import load_generator

__all__ = ["STAGES", "GENERATORS", "load_generator"]

SAMPLE = Stage("wuerstchen_sample", sample.sample, sample.SampleConfig,
               inputs={"stage_a": "wuerstchen_stage_a", "stage_b": "wuerstchen_stage_b",
                       "stage_c": "wuerstchen_stage_c"})

# The rows for full_pipeline.STAGES (after the stage that writes "shard").
STAGES: list[Stage] = [
    Stage("wuerstchen_stage_a", stages.stage_a, stages.StageATrainConfig, inputs={"shard": "shard"}, uses_ray=True,
          resources=train_resources),
    Stage("wuerstchen_encode_a", encode.encode_a, encode.EncodeAConfig,
          inputs={"shard": "shard", "stage_a": "wuerstchen_stage_a", "clip": "clip"}, uses_ray=True,
          resources=pool_resources, version=2),  # 2: networks run on fixed-size batches (bits per row)
    Stage("wuerstchen_stage_b", stages.stage_b, stages.StageBTrainConfig,
          inputs={"latents": "wuerstchen_encode_a", "stage_a": "wuerstchen_stage_a"}, uses_ray=True,
          resources=train_resources),
    Stage("wuerstchen_encode_semantic", encode.encode_semantic, encode.EncodeSemanticConfig,
          inputs={"shard": "shard", "stage_b": "wuerstchen_stage_b", "clip": "clip"}, uses_ray=True,
          resources=pool_resources, version=2),
    Stage("wuerstchen_stage_c", stages.stage_c, stages.StageCTrainConfig,
          inputs={"latents": "wuerstchen_encode_semantic"}, uses_ray=True, resources=train_resources),
    SAMPLE,
]

# {model: {role: stage name}}: the trained artifacts load_generator reads, as the sample stage reads them.
GENERATORS: dict[str, dict[str, str]] = {"wuerstchen": dict(SAMPLE.inputs)}
