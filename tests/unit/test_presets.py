"""The paper-scale presets (workflows/configs/cluster.yaml, single_gpu.yaml) and the preflight that fits
and prices them: loaded with the pipeline's own loader, training stages at the papers' sizes on GPUs,
preflight exit 0 for both presets and one error line (exit 2) for a configuration that cannot fit.

Each preset's whole preflight is computed once (the ``docs`` fixture); the tests assert on its JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from genmodels.pagoda import UNet
from genmodels.wuerstchen import StageA, StageB, StageC
from pipeline import config as config_mod
from tests.conftest import REPO
from workflows import full_pipeline as fp
from workflows import preflight_models as pm
from workflows.train import TrainConfig
from workflows.wuerstchen.models import model_config

CLUSTER = str(REPO / "workflows" / "configs" / "cluster.yaml")
SINGLE = str(REPO / "workflows" / "configs" / "single_gpu.yaml")
# single_gpu.yaml reads a local parquet that CI does not have; a remote source is checked by its stage.
PRESETS = {"cluster": (CLUSTER, []), "single_gpu": (SINGLE, ["urls.source=s3://bucket/laion/"])}


def load(name: str, extra: list[str] | None = None):
    path, over = PRESETS[name]
    stages = fp.stage_table(fp.raw_sections(path, over + (extra or [])))
    return stages, config_mod.load(path, over + (extra or []), {s.name: s.config for s in stages})


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_training_stages_are_paper_sized_and_on_gpus(name):
    stages, cfg = load(name)
    training = {s.name: cfg.stages[s.name] for s in stages if isinstance(getattr(cfg.stages[s.name], "train", None),
                                                                          TrainConfig)}
    assert len(training) == (8 if name == "cluster" else 7)
    for stage, c in training.items():
        assert getattr(c, "preset", "paper") == "paper", stage
        assert c.train.use_gpu and c.train.gpus_per_worker == 1 and c.train.precision == "bf16", stage
        assert c.train.max_failures >= 1 and c.train.ckpt_every > 0, stage
    assert cfg.stages["wuerstchen_stage_b"].compressor_preset == "paper"
    assert cfg.stages["wuerstchen_encode_semantic"].text_encoder.name == "ViT-bigG-14"
    assert cfg.stages["pagoda_teacher"].resolution == 64
    assert cfg.stages["recaption"].model == "llava-hf/llava-1.5-7b-hf" and cfg.stages["recaption"].gpus_per_actor == 1
    assert cfg.stages["filter"].clip_model == "ViT-B-32" and cfg.stages["filter"].gpus_per_actor > 0
    grown = [s.name for s in stages if s.name.startswith("pagoda_grow_")]
    assert grown == (["pagoda_grow_128", "pagoda_grow_256", "pagoda_grow_512"] if name == "cluster"
                     else ["pagoda_grow_128", "pagoda_grow_256"])
    assert [cfg.stages[g].resolution for g in grown] == [int(g.rsplit("_", 1)[1]) for g in grown]


def test_cluster_global_batches_are_the_papers():
    _, cfg = load("cluster")
    batch = {k: cfg.stages[k].train.global_batch for k in ("wuerstchen_stage_b", "wuerstchen_stage_c",
                                                            "pagoda_teacher", "pagoda_distill", "pagoda_grow_128",
                                                            "pagoda_grow_256", "pagoda_grow_512")}
    assert batch == {"wuerstchen_stage_b": 384, "wuerstchen_stage_c": 1280, "pagoda_teacher": 2048,
                     "pagoda_distill": 96, "pagoda_grow_128": 256, "pagoda_grow_256": 360, "pagoda_grow_512": 512}
    assert cfg.run.root.startswith("s3://") and cfg.stages["wuerstchen_stage_c"].train.steps == 918_000


def test_paper_parameter_counts_on_meta():
    """Würstchen A 18.4M, B 1.055B, C 993.6M with the configured text encoders' widths; PaGoDA's teacher is
    EDM's ADM-64 (295.9M) with CLIP-L text cross-attention."""
    _, cfg = load("cluster")
    s = cfg.stages
    with torch.device("meta"):
        a = StageA(model_config("stage_a", s["wuerstchen_stage_a"].preset))
        b = StageB(model_config("stage_b", s["wuerstchen_stage_b"].preset,
                                c_clip=s["wuerstchen_encode_a"].text_encoder.width))
        c = StageC(model_config("stage_c", s["wuerstchen_stage_c"].preset,
                                c_clip=s["wuerstchen_encode_semantic"].text_encoder.width))
        teacher = UNet(pm.teacher_unet(s["pagoda_teacher"]))
        adm = UNet(pm.teacher_unet(config_mod.build(type(s["pagoda_teacher"]), {"preset": "paper", "resolution": 64,
                                                                               "text": False}, "t")))
    assert abs(n_params(a) - 18.4e6) / 18.4e6 < 0.005
    assert abs(n_params(b) - 1.055e9) / 1.055e9 < 0.005
    assert abs(n_params(c) - 993.6e6) / 993.6e6 < 0.001
    assert abs(n_params(adm) - 295.9e6) / 295.9e6 < 0.01  # EDM Table 7 ADM, no class embedding
    assert 310e6 < n_params(teacher) < 320e6  # + cross-attention to 77 CLIP-L (768-wide) token states


def preflight(name: str, capsys, *extra: str) -> tuple[int, str, str]:
    path, over = PRESETS[name]
    rc = fp.main(["--config", path, "--preflight", *over, *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    """Each preset's whole preflight (every stage), once for the module: the CLI's --json document. The
    footprints it measures stay cached in the process (preflight_models.memo), so the tests below that
    run the CLI again for a few stages cost table formatting, not meta forwards."""
    out = {}
    for name, (path, over) in PRESETS.items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = fp.main(["--config", path, "--preflight", "--json", *over])
        assert rc == 0, stderr.getvalue()
        out[name] = json.loads(stdout.getvalue())
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preflight_passes(name, docs):
    doc = docs[name]
    stages, _ = load(name)
    rows = {r["stage"]: r for r in doc["stages"]}
    assert list(rows) == [s.name for s in stages]
    train = [r for r in rows.values() if r["kind"] == "train"]
    assert len(train) == (8 if name == "cluster" else 7)
    for r in train:
        assert r["node"] == ("gpu_train" if name == "cluster" else "workstation"), r["stage"]
        assert 0 < r["gpu_gib"] < 80 * 0.92 and r["gflop_per_image"] > 0, r["stage"]
        assert r["gpu_hours"] > 0 and r["cost"] > 0, r["stage"]
    # Counted at 1024 px without recomputation (MFU counts model FLOPs; C and B checkpoint activations):
    # bench_wuerstchen.py --flops-only's 4243 GFLOP for C (24x24 latent, bigG tokens), 10900 for B + compressor.
    assert rows["wuerstchen_stage_c"]["gflop_per_image"] == pytest.approx(4243, rel=0.001)
    assert rows["wuerstchen_stage_c"]["trainable"] == pytest.approx(993.6e6, rel=0.001)
    assert rows["wuerstchen_stage_b"]["gflop_per_image"] == pytest.approx(10900, rel=0.001)
    total = sum(r["cost"] for r in rows.values())
    assert doc["total"]["cost"] == pytest.approx(total) and total > 0
    if name == "cluster":
        assert rows["recaption"]["node"] == "gpu_encode" and rows["download"]["node"] == "cpu_data"
        assert rows["download"]["images"] == doc["assumptions"]["source_rows"] and rows["download"]["node_hours"] > 0
        # a worker {CPU: 16, GPU: 1}, its GPU priced at the node's kind (run.prices: GPU:H100, no plain GPU)
        t = rows["pagoda_teacher"]
        assert t["cost"] == pytest.approx(t["gpu_hours"] * (4.10 + 16 * 0.048))


def test_recomputation_is_not_counted(docs):
    """The benchmark's count (checkpointing off) equals the preflight's for the checkpointed cluster stages,
    while checkpointing still shrinks what the stage keeps for backward."""
    _, cfg = load("cluster")
    s = cfg.stages
    assert all(s[k].train.activation_checkpointing for k in ("wuerstchen_stage_b", "wuerstchen_stage_c"))
    rows = {r["stage"]: r for r in docs["cluster"]["stages"]}
    bench = pm.wuerstchen_flops("paper", 1024, "ViT-bigG-14", "ViT-H-14")
    assert bench["stage_c"] / 1e9 == pytest.approx(rows["wuerstchen_stage_c"]["gflop_per_image"], rel=1e-9)
    assert bench["stage_b+compressor"] / 1e9 == pytest.approx(rows["wuerstchen_stage_b"]["gflop_per_image"], rel=1e-9)
    sem = pm.semantic_size(s["wuerstchen_stage_b"], 1024)
    c = s["wuerstchen_stage_c"]
    on = pm.wuerstchen_stage_c(c, sem, 1280)
    no_ckpt = dataclasses.replace(c.train, activation_checkpointing=False)
    off = pm.wuerstchen_stage_c(dataclasses.replace(c, train=no_ckpt), sem, 1280)
    assert on.flops == off.flops and on.activation_bytes < off.activation_bytes / 4


def test_preflight_table_is_printed(capsys, docs):
    rc, out, _ = preflight("cluster", capsys, "--stages", "download,wuerstchen_stage_a")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("preflight on cluster/aws.yaml (MFU train 0.4")
    assert lines[2].split()[:4] == ["download", "cpu_data", "tasks", "0"]
    assert lines[3].split()[:6] == ["wuerstchen_stage_a", "gpu_train", "8", "8", "18.41M", "18.41M"]
    assert lines[-1].startswith("total")


def test_preflight_refuses_what_cannot_fit(capsys, tmp_path, docs):
    """ZeRO-0 Stage B in fp32 on one 24 GB GPU: one line naming the stage and the memory; exit 2."""
    small = tmp_path / "a10g.yaml"
    small.write_text("head_node_type: head\navailable_node_types:\n"
                     "  head: {resources: {CPU: 0}, max_workers: 0, node_config: {}}\n"
                     "  g5: {resources: {CPU: 8, GPU: 1}, max_workers: 4, node_config: {InstanceType: g5.2xlarge}}\n")
    b = "wuerstchen_stage_b.train."
    rc, out, err = preflight("cluster", capsys, "--stages", "wuerstchen_stage_b", f"run.cluster={small}",
                             f"{b}zero_stage=0", f"{b}precision=fp32", f"{b}num_workers=1", f"{b}cpus_per_worker=4")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: preflight: stages.wuerstchen_stage_b: needs ")
    assert "ZeRO-0, fp32" in err and "A10G on g5 has 24 GiB" in err
    # A request no node type holds: 16 CPUs per worker on 8-CPU nodes.
    rc, _, err = preflight("cluster", capsys, "--stages", "wuerstchen_stage_b", f"run.cluster={small}")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: preflight: stages.wuerstchen_stage_b: {CPU: 16, GPU: 1} per worker fits no node type")


def test_growth_rows_follow_the_config():
    stages, cfg = load("cluster", ["pagoda_grow_1024.resolution=1024"])
    assert [s.name for s in stages if s.name.startswith("pagoda_grow_")][-1] == "pagoda_grow_1024"
    evaluate = next(s for s in stages if s.name == "evaluate")
    assert evaluate.inputs["pagoda_1024.generator"] == "pagoda_grow_1024"
    assert evaluate.inputs["pagoda_64.generator"] == "pagoda_distill"
    with pytest.raises(ValueError, match=r"pagoda_grow_1536: 1536 px is not the base 64 px"):
        load("cluster", ["pagoda_grow_1536.resolution=1536"])
    with pytest.raises(ValueError, match=r"stages.pagoda_grow_128.resolution: the row grows to 128 px, got 32"):
        bad, bad_cfg = load("cluster", ["pagoda_grow_128.resolution=32"])
        fp.pagoda.check_growth(bad, bad_cfg.stages)
    assert fp.stage_table(fp.raw_sections(str(REPO / "workflows" / "configs" / "demo.yaml"), [])) is fp.STAGES
