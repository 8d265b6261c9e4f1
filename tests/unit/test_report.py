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
