"""The run report: one self-contained ``report.html`` (plus ``report.md`` and PNGs) per run.

Written by the runner after every run, cached stages included, from what the artifacts
already hold: manifests (status, counts, wall time, resources), ``metrics.jsonl`` of
training stages (loss curves), PNG sample grids, and the ``metrics.json`` of evaluation.
Nothing here recomputes stage work.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

from pipeline.store import Artifact, Store
from workflows.train.export import read_history

log = logging.getLogger("genmodels")

# Data stages whose "rows in / out / rejected by reason" make the funnel, in order.
FUNNEL = ("urls", "download", "filter", "recaption", "shard")
VS = "GPU-hours / node-hours / cost"


def resource_price(res: str, prices: dict[str, float], gpu: str | None = None) -> float:
    """$/hour of one unit of a Ray resource under ``run.prices``, for the report and the preflight alike:
    ``GPU`` of a known kind (``H100``) at ``GPU:<kind>`` where the table has it, else at ``GPU``; any other
    resource (``CPU``, or one already named ``GPU:H100``) by its name."""
    if res == "GPU" and gpu and f"GPU:{gpu}" in prices:
        return prices[f"GPU:{gpu}"]
    return prices.get(res, 0.0)


def cost_table(rows: list[dict[str, Any]], prices: dict[str, float], gpus: dict[str, str | None] | None = None,
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Resource-hours per stage (wall × resources held) and, with a price table, money. ``gpus``: the GPU
    kind each stage ran on (the node type the preflight places it on), so that ``GPU`` hours are priced
    at ``GPU:<kind>``.

    Cached stages cost nothing in this run; their original cost stays in their manifest.
    """
    out, total = [], {}
    for r in rows:
        wall = r.get("wall_s") or 0.0
        hours = {res: n * wall / 3600.0 for res, n in (r.get("resources") or {}).items()}
        ran = r["action"] == "run"
        gpu = (gpus or {}).get(r["stage"])
        money = sum(resource_price(res, prices, gpu) * h for res, h in hours.items()) if ran else 0.0
        out.append({"stage": r["stage"], "action": r["action"], "hours": {k: round(v, 6) for k, v in hours.items()},
                    "cost": round(money, 6)})
        if ran:
            for res, h in hours.items():
                total[f"{res}-hours"] = total.get(f"{res}-hours", 0.0) + h
            total["cost"] = total.get("cost", 0.0) + money
    total = {k: round(v, 6) for k, v in total.items()}
    return out, total


def _actual(row: dict[str, Any], cost: dict[str, Any], proj: dict[str, Any]) -> dict[str, float]:
    """This run's GPU-hours, node-hours (the share of the projected node type the resources held, as the
    preflight counts node-hours) and cost of a stage that ran."""
    hours = cost["hours"]
    node = proj.get("node_resources") or {}
    share = [h / node[k] for k, h in hours.items() if node.get(k)]
    return {"gpu_hours": sum(h for k, h in hours.items() if k.split(":")[0] == "GPU"),
            "node_hours": max(share, default=0.0), "cost": cost["cost"]}


def funnel(arts: dict[str, Artifact]) -> list[dict[str, Any]]:
    rows = []
    for name in FUNNEL:
        art = arts.get(name)
        if art is None or not art.manifest:
            continue
        c = art.manifest.get("counts", {})
        reasons = next((c[k] for k in ("rejected_by_reason", "failed_by_reason", "dropped_by_reason", "rejected")
                        if isinstance(c.get(k), dict)), {})
        rows.append({"stage": name, "in": c.get("rows_in", c.get("rows")), "out": c.get("rows_out", c.get("rows")),
                     "rejected": reasons})
    return rows


def loss_curves(arts: dict[str, Artifact]) -> dict[str, list[dict[str, Any]]]:
    curves = {}
    for name, art in arts.items():
        if art.manifest and art.exists("metrics.jsonl"):
            curves[name] = read_history(art)
    return curves


def grids(arts: dict[str, Artifact]) -> dict[str, list[str]]:
    """PNG grids per stage: the sample stages' grids and the training previews."""
    out = {}
    for name, art in arts.items():
        if not art.manifest:
            continue
        pngs = [n for n in art.list(".png") if "/" not in n and ("grid" in n or "preview" in n)]
        if pngs:
            out[name] = pngs
    return out


def metrics_tables(arts: dict[str, Artifact]) -> dict[str, Any]:
    return {name: art.read_json("metrics.json") for name, art in arts.items()
            if art.manifest and name.startswith("evaluate") and art.exists("metrics.json")}


def _plot_losses(curves: dict[str, list[dict[str, Any]]]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for stage, recs in curves.items():
        for key in sorted({k for r in recs for k in r if k.startswith("loss")}):
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(recs) if isinstance(r.get(key), (int, float))]
            if pts:
                series[f"{stage}/{key}"] = pts
    if not series:
        return None
    n = len(series)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, pts) in zip(axes.flat, series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(summary: dict[str, Any], store: Store, run_art: Artifact, prices: dict[str, float],
                 projection: dict[str, dict[str, Any]] | None = None) -> str:
    """Write report.html/report.md/report.json into the run directory; return the HTML's URI.

    ``projection``: the preflight's projection per stage (``preflight.projection``: GPU-hours,
    node-hours, cost, node type, GPU kind), set beside what each stage that ran actually held.
    """
    rows = summary["stages"]
    arts = {r["stage"]: store.artifact(r["stage"], r["key"]) for r in rows}
    ran = {r["stage"] for r in rows if r["action"] == "run"}
    proj = {k: v for k, v in (projection or {}).items() if k in ran}
    costs, total = cost_table(rows, prices, {k: p.get("gpu") for k, p in proj.items()})
    for r, c in zip(rows, costs):
        if r["stage"] in proj and "gpu_hours" in proj[r["stage"]]:
            p = proj[r["stage"]]
            c["projected"] = {k: p[k] for k in ("node", "gpu_hours", "node_hours", "cost", "note")}
            c["actual"] = _actual(r, c, p)
    curves = loss_curves(arts)
    data = {"run_id": summary["run_id"], "root": summary["root"], "wall_s": summary["wall_s"],
            "stages": rows, "cost": costs, "cost_total": total, "funnel": funnel(arts),
            "metrics": metrics_tables(arts), "grids": grids(arts),
            "final_losses": {k: {m: v for m, v in recs[-1].items() if m.startswith("loss")}
                             for k, recs in curves.items() if recs}}
    curve_png = _plot_losses(curves)
    if curve_png:
        run_art.write_bytes("loss_curves.png", curve_png)
    run_art.write_json("report.json", data)
    run_art.write_bytes("report.md", _markdown(data, curve_png is not None).encode())
    run_art.write_bytes("report.html", _html(data, arts, curve_png).encode())
    return run_art.child_uri("report.html")


def _vs(c: dict[str, Any]) -> tuple[str, str]:
    """(projected, actual) cells: GPU-hours / node-hours / cost."""
    if "projected" not in c:
        return "-", "-"
    return tuple(" / ".join(f"{c[side][k]:.4g}" for k in ("gpu_hours", "node_hours", "cost"))
                 for side in ("projected", "actual"))


def _counts_str(c: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items() if not isinstance(v, (dict, list)))


def _markdown(d: dict[str, Any], has_curves: bool) -> str:
    md = [f"# genmodels run {d['run_id']}", "", f"root: `{d['root']}` · wall {d['wall_s']:.1f}s", "",
          "## Stages", "", f"Projected: the preflight for this run's config ({VS}); actual: this run.", "",
          "| stage | status | wall s | counts | resource-hours | cost | projected | actual |",
          "|---|---|---|---|---|---|---|---|"]
    for r, c in zip(d["stages"], d["cost"]):
        hours = ", ".join(f"{k} {v:.4f}" for k, v in c["hours"].items())
        md.append(f"| {r['stage']} | {r['action']} | {r.get('wall_s') or 0:.1f} | {_counts_str(r.get('counts') or {})} "
                  f"| {hours} | {c['cost']:.4f} | {' | '.join(_vs(c))} |")
    md += ["", f"Total this run: {_counts_str(d['cost_total']) or 'nothing ran'}", "", "## Data funnel", "",
           "| stage | in | out | rejected by reason |", "|---|---|---|---|"]
    for f in d["funnel"]:
        md.append(f"| {f['stage']} | {f['in']} | {f['out']} | {_counts_str(f['rejected']) or '-'} |")
    md += ["", "## Loss curves", ""]
    if has_curves:
        md.append("![loss curves](loss_curves.png)")
    for stage, losses in d["final_losses"].items():
        md.append(f"- {stage}: final " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    md += ["", "## Samples", ""]
    for stage, pngs in d["grids"].items():
        md += [f"- {stage}: " + ", ".join(f"`{p}`" for p in pngs)]
    md += ["", "## Metrics", ""]
    for stage, table in d["metrics"].items():
        md += [f"### {stage}", "", *metrics_markdown(table)]
    return "\n".join(md) + "\n"


def metrics_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """A model x metric table ({model: {metric: value}}) as Markdown lines; a missing cell is '-'."""
    keys = sorted({m for v in table.values() for m in v})
    return ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
            *(f"| {model} | " + " | ".join(_fmt(vals.get(k)) for k in keys) + " |" for model, vals in table.items())]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "-")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html(d: dict[str, Any], arts: dict[str, Artifact], curve_png: bytes | None) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset=utf-8><title>genmodels run {e(d['run_id'])}</title>",
             "<style>body{font:14px system-ui;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;image-rendering:pixelated}"
             "</style>", f"<h1>genmodels run {e(d['run_id'])}</h1><p>root <code>{e(d['root'])}</code> · wall "
             f"{d['wall_s']:.1f}s</p>", "<h2 id=stages>Stages</h2>",
             f"<p>Projected: the preflight for this run's config ({VS}); actual: this run.</p>",
             "<table><tr><th>stage<th>status<th>wall s<th>counts<th>resource-hours<th>cost<th>projected<th>actual"]
    for r, c in zip(d["stages"], d["cost"]):
        hours = ", ".join(f"{k} {v:.4f}" for k, v in c["hours"].items())
        parts.append(f"<tr><td>{e(r['stage'])}<td>{e(r['action'])}<td>{r.get('wall_s') or 0:.1f}"
                     f"<td>{e(_counts_str(r.get('counts') or {}))}<td>{e(hours)}<td>{c['cost']:.4f}"
                     + "".join(f"<td>{e(x)}" for x in _vs(c)))
    parts.append(f"</table><p>Total this run: {e(_counts_str(d['cost_total']) or 'nothing ran')}</p>")
    parts.append("<h2 id=funnel>Data funnel</h2><table><tr><th>stage<th>in<th>out<th>rejected by reason")
    for f in d["funnel"]:
        parts.append(f"<tr><td>{e(f['stage'])}<td>{f['in']}<td>{f['out']}<td>{e(_counts_str(f['rejected']) or '-')}")
    parts.append("</table><h2 id=losses>Loss curves</h2>")
    if curve_png:
        parts.append(_img(curve_png, "loss curves"))
    parts.append("<ul>" + "".join(f"<li>{e(s)}: final " + e(", ".join(f"{k} {v:.4g}" for k, v in ls.items()))
                                  for s, ls in d["final_losses"].items()) + "</ul>")
    parts.append("<h2 id=samples>Samples</h2>")
    for stage, pngs in d["grids"].items():
        for p in pngs:
            parts.append(f"<h3>{e(stage)}: {e(p)}</h3>{_img(arts[stage].read_bytes(p), stage + '/' + p)}")
    parts.append("<h2 id=metrics>Metrics</h2>")
    for stage, table in d["metrics"].items():
        keys = sorted({m for v in table.values() for m in v})
        parts.append(f"<h3>{e(stage)}</h3><table><tr><th>model" + "".join(f"<th>{e(k)}" for k in keys))
        for model, vals in table.items():
            parts.append(f"<tr><td>{e(model)}" + "".join(f"<td>{e(_fmt(vals.get(k)))}" for k in keys))
        parts.append("</table>")
    return "\n".join(parts) + "\n"
