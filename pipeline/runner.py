"""Plan and execute the stage DAG with per-stage caching.

The plan is computed from manifests only (no work, no Ray), printed first, and is what
``--dry-run`` shows. Execution runs the planned stages as their inputs become ready (up to
``run.parallel_stages`` at once), writes each manifest last, and finishes with a run summary
(``runs/<run_id>/summary.json``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig, to_dict
from pipeline.stage import Stage, cache_key
from pipeline.store import Artifact, Store, write_manifest

log = logging.getLogger("genmodels")


class PlanError(ValueError):
    """The requested selection cannot run (e.g. an upstream artifact is missing)."""


@dataclass
class Step:
    stage: Stage
    key: str
    artifact: Artifact
    action: str  # "run" | "cached" | "skip"
    reason: str


def descendants(stages: list[Stage], roots: set[str]) -> set[str]:
    out = set(roots)
    for s in stages:  # stages are in topological order, so one pass suffices
        if out.intersection(s.upstream):
            out.add(s.name)
    return out


def plan(stages: list[Stage], cfg: PipelineConfig, store: Store, only: set[str] | None = None,
         start: str | None = None, force: set[str] | None = None) -> list[Step]:
    names = [s.name for s in stages]
    for n in list(only or ()) + ([start] if start else []) + list(force or ()):
        if n not in names:
            raise PlanError(f"unknown stage {n!r} (stages: {', '.join(names)})")
    selected = set(names) if only is None else set(only)
    if start:
        selected &= descendants(stages, {start})
    forced = descendants(stages, set(force or ())) & selected if force else set()
    selected |= forced

    steps: dict[str, Step] = {}
    for s in stages:
        missing_inputs = [i for i in s.upstream if i not in steps]
        if missing_inputs:
            raise PlanError(f"stage {s.name!r} consumes {missing_inputs[0]!r}, which is declared after it")
        key = cache_key(s, cfg.stages[s.name], {role: steps[i].key for role, i in s.inputs.items()})
        art = store.artifact(s.name, key)
        done = bool(art.manifest) and art.manifest.get("key") == key
        upstream_runs = [i for i in s.upstream if steps[i].action == "run"]
        if s.name not in selected:
            action, reason = ("cached", "not selected; cached artifact used") if done else ("skip", "not selected")
        elif s.name in forced:
            action, reason = "run", "forced" if s.name in (force or ()) else "downstream of a forced stage"
        elif done and not upstream_runs:
            action, reason = "cached", f"manifest {art.manifest.get('created_at', '')}"
        elif upstream_runs:
            action, reason = "run", f"upstream {upstream_runs[0]!r} runs"
        else:
            partial = art.sizes()[0]
            action, reason = "run", (f"resuming: {partial} partial files" if partial else "no cached artifact")
        steps[s.name] = Step(s, key, art, action, reason)

    for st in steps.values():
        if st.action != "run":
            continue
        for i in st.stage.upstream:
            if steps[i].action == "skip":
                raise PlanError(f"stage {st.stage.name!r} needs {i!r}, which has no cached artifact for this "
                                f"config: include it (--stages {i},{st.stage.name}) or run without --stages")
    return list(steps.values())


def format_plan(steps: list[Step]) -> str:
    width = max(len(s.stage.name) for s in steps)
    lines = ["plan:"]
    for s in steps:
        lines.append(f"  {s.stage.name:<{width}}  {s.action:<6}  {s.key}  ({s.reason})")
    return "\n".join(lines)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=5, cwd=__file__.rsplit("/", 2)[0])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def execute(steps: list[Step], cfg: PipelineConfig, store: Store, run_id: str,
            before_stage: Callable[[Stage], None] = lambda s: None) -> dict[str, Any]:
    """Run every "run" step once its inputs are ready; services of input stages stay up until the run ends.

    Up to ``cfg.run.parallel_stages`` stages run at once, each in a driver thread that mostly
    waits on Ray (the work itself runs in Ray tasks, actors and Ray Train workers), so branches
    that share no input (the two model families) overlap. Stages start in plan order. After a
    failure no new stage starts; those already running finish and keep their manifests (a rerun
    of the same command resumes from them), then the first error is raised.
    """
    version = code_version()
    by_name = {s.stage.name: s for s in steps}
    rows = {st.stage.name: _row(st, 0.0) for st in steps if st.action != "run"}
    pending = [st for st in steps if st.action == "run"]
    ready = {st.stage.name for st in steps if st.action != "run"}
    run_art = store.run_dir(run_id)
    run_art.write_json("config.json", cfg.to_dict())
    t_run = time.time()
    parallel = max(1, cfg.run.parallel_stages)
    finished: queue.Queue[tuple[Step, float | None, BaseException | None]] = queue.Queue()
    errors: list[BaseException] = []
    with contextlib.ExitStack() as services:
        started: set[str] = set()
        running = 0
        while pending or running:
            for st in list(pending):
                if errors or running >= parallel:
                    break
                if not all(i in ready for i in st.stage.upstream):
                    continue
                pending.remove(st)
                for i in st.stage.upstream:  # started here, in the main thread, and only once
                    up = by_name[i]
                    if up.stage.service and i not in started:
                        services.enter_context(up.stage.service(up.artifact, cfg.stages[i]))
                        started.add(i)
                before_stage(st.stage)
                running += 1
                if parallel == 1:  # in the main thread: Ctrl-C interrupts the stage itself
                    _run_step(st, cfg, by_name, version, run_id, finished)
                else:  # daemon: an interrupted driver exits without waiting for Ray calls to return
                    threading.Thread(target=_run_step, args=(st, cfg, by_name, version, run_id, finished),
                                     name=f"stage-{st.stage.name}", daemon=True).start()
            if not running:
                break  # an error stopped new starts and nothing is left running
            st, wall, err = finished.get()
            running -= 1
            if err is not None:
                errors.append(err)
                log.error("[%s] failed: %s: %s", st.stage.name, type(err).__name__, err)
                continue
            ready.add(st.stage.name)
            rows[st.stage.name] = _row(st, wall)
    if errors:
        raise errors[0]
    summary = {"run_id": run_id, "root": store.uri, "wall_s": round(time.time() - t_run, 3),
               "stages": [rows[st.stage.name] for st in steps]}
    run_art.write_json("summary.json", summary)
    return summary


def _run_step(st: Step, cfg: PipelineConfig, by_name: dict[str, Step], version: str, run_id: str,
              finished: queue.Queue) -> None:
    """Run one stage and write its manifest last; report (step, wall, error) on ``finished``."""
    try:
        stage_cfg = cfg.stages[st.stage.name]
        if st.reason.startswith("forced") or st.reason.startswith("downstream"):
            st.artifact.clear()  # stale shards of an older run must not survive a forced rerun
        log.info("[%s] running (%s) -> %s", st.stage.name, st.reason, st.artifact.uri)
        t0 = time.time()
        inputs = {role: by_name[i].artifact for role, i in st.stage.inputs.items()}
        counts = st.stage.fn(inputs, stage_cfg, st.artifact) or {}
        wall = time.time() - t0
        st.artifact.write_json("config.json", to_dict(stage_cfg))
        write_manifest(st.artifact, {
            "stage": st.stage.name, "key": st.key, "version": st.stage.version,
            "config": to_dict(stage_cfg), "inputs": {role: by_name[i].key for role, i in st.stage.inputs.items()},
            "upstream": dict(st.stage.inputs),
            "code_version": version, "counts": counts, "wall_s": round(wall, 3),
            "resources": st.stage.resources(stage_cfg), "run_id": run_id})
        log.info("[%s] done in %.1fs: %s", st.stage.name, wall, _fmt_counts(counts))
    except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
        finished.put((st, None, e))
        return
    finished.put((st, wall, None))


def _row(st: Step, wall: float) -> dict[str, Any]:
    m = st.artifact.manifest
    return {"stage": st.stage.name, "action": st.action, "reason": st.reason, "key": st.key,
            "uri": st.artifact.uri if m else None, "wall_s": round(wall, 3) if st.action == "run" else m.get("wall_s"),
            "counts": m.get("counts", {}), "resources": m.get("resources", {}), "files": m.get("files"),
            "bytes": m.get("bytes")}


def _fmt_counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list))) or "-"
