"""The run report: cost accounting arithmetic and the sections the demo must show, on fake artifacts."""

from __future__ import annotations

import io
import json

from PIL import Image

from pipeline.store import Store, write_manifest
from workflows.report import cost_table, write_report


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_cost_table_counts_only_stages_that_ran():
    rows = [{"stage": "a", "action": "run", "wall_s": 3600.0, "resources": {"CPU": 2, "GPU:H100": 1}},
            {"stage": "b", "action": "cached", "wall_s": 7200.0, "resources": {"CPU": 4}}]
    costs, total = cost_table(rows, {"CPU": 0.05, "GPU:H100": 4.0})
    assert costs[0]["hours"] == {"CPU": 2.0, "GPU:H100": 1.0}
    assert costs[0]["cost"] == 4.1 and costs[1]["cost"] == 0.0
    assert total == {"CPU-hours": 2.0, "GPU:H100-hours": 1.0, "cost": 4.1}


def test_report_has_funnel_losses_grids_and_metrics(tmp_path):
    store = Store(str(tmp_path))
    arts = {}
    for name, counts in [("download", {"rows_in": 28, "rows_out": 23, "rejected": {"http_404": 1, "decode": 4}}),
                         ("filter", {"rows_in": 23, "rows_out": 20, "rejected": 3,
                                     "rejected_by_reason": {"too_small": 3}}),
                         ("train_x", {"steps": 3}), ("evaluate", {})]:
        art = store.artifact(name, "k" + name)
        arts[name] = art
        if name == "train_x":
            art.write_bytes("metrics.jsonl", b"".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}).encode() + b"\n"
                                                      for s in range(3)))
            art.write_bytes("preview.png", _png("red"))
        if name == "evaluate":
            art.write_json("metrics.json", {"pagoda_64": {"swd": 12.5}, "wuerstchen": {"swd": 20.25}})
        write_manifest(art, {"stage": name, "key": "k" + name, "counts": counts})
    summary = {"run_id": "r1", "root": store.uri, "wall_s": 5.0,
               "stages": [{"stage": n, "action": "run", "key": "k" + n, "wall_s": 1.0, "counts": a.manifest["counts"],
                           "resources": {"CPU": 1}} for n, a in arts.items()]}
    uri = write_report(summary, store, store.run_dir("r1"), {"CPU": 0.1})
    html = open(uri).read()
    md = open(uri.replace(".html", ".md")).read()
    for section in ("Stages", "Data funnel", "Loss curves", "Samples", "Metrics"):
        assert section in html and section in md
    assert "| download | 28 | 23 | decode=4, http_404=1 |" in md
    assert "| pagoda_64 | 12.5 |" in md and "| wuerstchen | 20.25 |" in md
    assert "train_x: final loss 0.3333" in md
    assert html.count("data:image/png;base64,") == 2  # loss curves + the preview grid
    report = json.load(open(tmp_path / "runs" / "r1" / "report.json"))
    assert report["cost_total"]["CPU-hours"] == round(4 / 3600, 6)


def test_cost_table_prices_gpus_at_their_kind():
    """Ray's resource is GPU; run.prices names the kind (GPU:H100), as the preflight prices it."""
    rows = [{"stage": "t", "action": "run", "wall_s": 1800.0, "resources": {"CPU": 16, "GPU": 2}},
            {"stage": "u", "action": "run", "wall_s": 3600.0, "resources": {"GPU": 1}}]
    prices = {"CPU": 0.05, "GPU:H100": 4.0, "GPU": 1.0}
    costs, total = cost_table(rows, prices, {"t": "H100", "u": "L4"})
    assert costs[0]["cost"] == 0.5 * (16 * 0.05 + 2 * 4.0)
    assert costs[1]["cost"] == 1.0  # no GPU:L4 price: the plain GPU one
    assert total["GPU-hours"] == 2.0 and total["cost"] == 5.4
    assert cost_table(rows[:1], {"GPU:H100": 4.0})[0][0]["cost"] == 0.0  # kind unknown: no GPU:<kind> lookup


def test_report_sets_projected_beside_actual(tmp_path):
    """A run of cluster.yaml's Stage A for one hour on 8 H100s: the preflight's projection for the run's
    config beside what the run held."""
    from pipeline import config as config_mod
    from tests.conftest import REPO
    from workflows import full_pipeline as fp
    from workflows import preflight

    path = str(REPO / "workflows" / "configs" / "cluster.yaml")
    stages = fp.stage_table(fp.raw_sections(path, []))
    cfg = config_mod.load(path, [], {s.name: s.config for s in stages})
    store = Store(str(tmp_path))
    store.run_dir("r2").write_json("config.json", cfg.to_dict())
    names = ("download", "wuerstchen_stage_a")
    rows = [{"stage": n, "action": "run", "key": "k" + n, "wall_s": 3600.0, "counts": {},
             "resources": {"CPU": 128.0, "GPU": 8.0} if n != "download" else {"CPU": 64.0}} for n in names]
    for n in names:
        write_manifest(store.artifact(n, "k" + n), {"stage": n, "key": "k" + n, "counts": {}})
    summary = {"run_id": "r2", "root": store.uri, "wall_s": 7200.0, "stages": rows}
    uri = write_report(summary, store, store.run_dir("r2"), cfg.run.prices,
                       fp.projection(stages, cfg, set(names)))
    data = json.load(open(tmp_path / "runs" / "r2" / "report.json"))
    want = {r["stage"]: r for r in preflight.preflight([s for s in stages if s.name in names], cfg)["stages"]}
    a, d = data["cost"]
    assert a["projected"]["node"] == "cpu_data" and d["projected"]["node"] == "gpu_train"
    for got in (a, d):
        assert {k: got["projected"][k] for k in ("gpu_hours", "node_hours", "cost")} == {
            k: want[got["stage"]][k] for k in ("gpu_hours", "node_hours", "cost")}
    assert d["projected"]["gpu_hours"] > 0 and a["projected"]["node_hours"] > 0
    # actual: 8 GPU-hours on one 8-GPU node, the GPUs at GPU:H100 (4.10), CPUs at 0.048
    assert d["actual"] == {"gpu_hours": 8.0, "node_hours": 1.0, "cost": round(8 * 4.10 + 128 * 0.048, 6)}
    assert a["actual"] == {"gpu_hours": 0.0, "node_hours": 2.0, "cost": round(64 * 0.048, 6)}  # 64 of 32 CPUs
    md = open(uri.replace(".html", ".md")).read()
    p = d["projected"]
    assert (f"| {p['gpu_hours']:.4g} / {p['node_hours']:.4g} / {p['cost']:.4g} | 8 / 1 / {8 * 4.10 + 128 * 0.048:.4g} |"
            in md)
    assert "projected" in open(uri).read()


def test_evaluate_scores_every_generator_of_its_inputs(tmp_path, monkeypatch):
    """evaluate's models are its inputs' (the config-driven table: PaGoDA grown to 512 px scores pagoda_512,
    absent from the family's default GENERATORS), each loaded by its family; the demo's table is unchanged."""
    import torch

    from workflows import evaluate, pagoda, wuerstchen
    from workflows.family import Generator

    loaded = []

    def loader(fam):
        def load(arts, initial=False):
            loaded.append((fam, dict(arts)))
            res = 16 if fam == "wuerstchen" else int(arts["generator"].rsplit("_", 1)[1])
            name = fam if fam == "wuerstchen" else f"pagoda_{res}"
            return Generator(name, res, lambda caps, seed: torch.zeros(len(caps), 3, res, res), nfe=1)
        return load

    monkeypatch.setattr(wuerstchen, "load_generator", loader("wuerstchen"))
    monkeypatch.setattr(pagoda, "load_generator", loader("pagoda"))
    monkeypatch.setattr(evaluate, "heldout_reals",
                        lambda shard, r, cfg: (torch.rand(4, 3, r, r) * 2 - 1, ["c"] * 4, [None] * 4))
    inputs = {"shard": "shard", "wuerstchen.stage_a": "a", "wuerstchen.stage_b": "b", "wuerstchen.stage_c": "c",
              "pagoda_64.generator": "pagoda_distill_64", "pagoda_512.generator": "pagoda_grow_512"}
    out = Store(str(tmp_path)).artifact("evaluate", "k")
    counts = evaluate.run(inputs, evaluate.EvaluateConfig(n_samples=4, metrics=["swd"], swd_patches_per_image=8,
                                                          initial=False), out)
    assert counts["models"] == 3
    assert set(out.read_json("metrics.json")) == {"wuerstchen", "pagoda_64", "pagoda_512"}
    assert loaded == [("wuerstchen", {"stage_a": "a", "stage_b": "b", "stage_c": "c"}),
                      ("pagoda", {"generator": "pagoda_distill_64"}), ("pagoda", {"generator": "pagoda_grow_512"})]
    # The demo's inputs (the default table): every default generator, in the families' order.
    demo = evaluate.models_in(evaluate.generator_inputs())
    assert list(demo) == [*wuerstchen.GENERATORS, *pagoda.GENERATORS]
    assert all(set(arts) == set(fam.GENERATORS[m]) for m, (fam, arts) in demo.items())
