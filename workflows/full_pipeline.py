"""genmodels: image URLs → filtered, recaptioned shards → Würstchen and PaGoDA → samples, metrics, report.

    python workflows/full_pipeline.py --config workflows/configs/demo.yaml [--stages a,b]
        [--from STAGE] [--force STAGE] [--dry-run] [--preflight [--json]] [key=value ...]
    ray job submit --working-dir . -- python workflows/full_pipeline.py --config workflows/configs/cluster.yaml

Every stage is cached by a key over its config and its inputs' keys; rerunning the same
command resumes where the last run stopped. This file is the table of contents.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import stages as data_stages  # noqa: E402
from pipeline import config as config_mod  # noqa: E402
from pipeline import runner  # noqa: E402
from pipeline.stage import LOG_FORMAT, Stage  # noqa: E402
from pipeline.store import Store  # noqa: E402
from workflows import evaluate, oracle, pagoda, report, text_clip, wuerstchen  # noqa: E402

log = logging.getLogger("genmodels")

# The table of contents. Each family owns its rows (inputs named by role); evaluate reads every
# family's generators through the same face (workflows/family.py).
STAGES: list[Stage] = [*data_stages.STAGES, text_clip.STAGE, *wuerstchen.STAGES, *pagoda.STAGES, oracle.STAGE,
                       evaluate.STAGE]


def stage_table(sections: Mapping[str, Any]) -> list[Stage]:
    """``STAGES`` with PaGoDA's growth rows as the config's ``stages`` sections ask (pagoda.table_for);
    evaluate reads every generator of that table."""
    rows = pagoda.table_for(sections)
    if [s.name for s in rows] == [s.name for s in pagoda.STAGES]:
        return STAGES
    gens = {**wuerstchen.GENERATORS, **pagoda.generators(rows, pagoda.base_resolution(sections))}
    return [*data_stages.STAGES, text_clip.STAGE, *wuerstchen.STAGES, *rows, oracle.STAGE,
            dataclasses.replace(evaluate.STAGE, inputs=evaluate.generator_inputs(gens))]


def raw_sections(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The ``stages`` mapping of the YAML with the overrides merged (``config.merged``), read before
    validation only to shape the table (which growth rows exist); anything malformed is left to
    ``config.load`` to report."""
    try:
        raw, _ = config_mod.merged(path, overrides)
    except config_mod.ConfigError:
        return {}
    stages = raw.get("stages")
    return stages if isinstance(stages, dict) else {}

# Variables that Ray workers on a cluster must see as the driver does.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
               "HF_HOME", "NO_ALBUMENTATIONS_UPDATE", "DS_ACCELERATOR", "WANDB_MODE")


def projection(stages: list[Stage], cfg: config_mod.PipelineConfig, ran: set[str]) -> dict[str, dict]:
    """The preflight's projection of the stages that ran, for the report to set beside what they held;
    empty (with a warning) when the cluster file cannot be read or a stage cannot be sized."""
    from workflows import preflight  # the model libraries on the meta device: only after a run

    try:
        return preflight.projection([s for s in stages if s.name in ran], cfg)
    except ValueError as e:  # PreflightError: an unreadable cluster file, a stage that fits no node type
        log.warning("report: no projection (%s)", e)
        return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="pipeline YAML (workflows/configs/*.yaml)")
    p.add_argument("--stages", help="comma-separated stages to run; their inputs must be cached")
    p.add_argument("--from", dest="start", help="run this stage and everything downstream of it")
    p.add_argument("--force", action="append", default=[], help="rerun this stage and its downstream")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--preflight", action="store_true",
                   help="fit every stage to run.cluster's node types and price it (no Ray, meta device), then exit")
    p.add_argument("--json", action="store_true", help="--preflight: print one JSON document instead of the table")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. download.image_size=128 run.root=s3://b/p")
    return p.parse_intermixed_args(argv)  # key=value overrides may stand before or after the flags


def local_ray_auth_env(environ: Mapping[str, str], home: str) -> dict[str, str]:
    """What to set before ``ray.init`` starts a local Ray so that it leaves ``~/.ray`` as it was.

    Ray 2.60 turns token auth on for a new local cluster when ``RAY_AUTH_MODE`` is unset and, with no
    token anywhere, writes a new one to ``~/.ray/auth_token``. That file outlives the run: every
    later ``ray start`` turns token auth on because of it, and ``ray status`` / ``ray job submit``
    against another cluster fail with ``InvalidAuthToken``. A token in ``RAY_AUTH_TOKEN`` (this
    process and the Ray it starts only) keeps token auth on for the local cluster and writes
    nothing. A mode or token the user chose (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, an existing ``~/.ray/auth_token``) is left alone.
    """
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return {}
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH"):
        return {}
    if os.path.exists(os.path.join(home, ".ray", "auth_token")):
        return {}
    return {"RAY_AUTH_TOKEN": secrets.token_hex(32)}


def init_ray(cfg: config_mod.PipelineConfig) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ} | dict(cfg.ray.env)
    for k, v in cfg.ray.env.items():  # the driver plans Ray Data reads too (e.g. Ray Data's own knobs)
        os.environ.setdefault(k, str(v))
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    kwargs = {} if address else {"num_cpus": cfg.ray.num_cpus, "include_dashboard": False}
    token_file = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    had_token_file = os.path.exists(token_file)
    if not address or address == "local":  # this process starts the Ray
        os.environ.update(local_ray_auth_env(os.environ, os.path.expanduser("~")))
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **kwargs)
    if not had_token_file and os.path.exists(token_file):  # a Ray that ignores RAY_AUTH_TOKEN: undo at exit
        atexit.register(_remove_token_file, token_file)
    log.info("ray: %s (%s CPUs, %s GPUs)", address or "local", ray.cluster_resources().get("CPU", 0),
             ray.cluster_resources().get("GPU", 0))


def _remove_token_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
        log.info("ray: removed %s, which this run's local Ray created", path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, **LOG_FORMAT)
    args = parse_args(argv)
    try:
        stages = stage_table(raw_sections(args.config, args.overrides))
        cfg = config_mod.load(args.config, args.overrides, {s.name: s.config for s in stages})
        pagoda.check_growth(stages, cfg.stages)
        if args.preflight:  # before the store: preflight writes nothing
            from workflows import preflight

            only = args.stages.split(",") if args.stages else None  # --stages: preflight just these
            return preflight.main([s for s in stages if only is None or s.name in only], cfg, as_json=args.json)
        config_mod.check_run_root(cfg, os.environ)  # before Store(), which creates a local root
        store = Store(cfg.run.root)
        store.check_writable()
        only = set(args.stages.split(",")) if args.stages else None
        force = {f for item in args.force for f in item.split(",") if f}
        steps = runner.plan(stages, cfg, store, only=only, start=args.start, force=force)
    except (config_mod.ConfigError, runner.PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(runner.format_plan(steps), flush=True)
    if args.dry_run:
        return 0
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    def before(st) -> None:
        if st.uses_ray:
            init_ray(cfg)

    summary = runner.execute(steps, cfg, store, run_id, before_stage=before)
    summary["report"] = report.write_report(summary, store, store.run_dir(run_id), cfg.run.prices,
                                            projection(stages, cfg, {r["stage"] for r in summary["stages"]
                                                                     if r["action"] == "run"}))
    ran = [r["stage"] for r in summary["stages"] if r["action"] == "run"]
    cached = [r["stage"] for r in summary["stages"] if r["action"] == "cached"]
    print(f"done in {summary['wall_s']:.1f}s: ran {len(ran)} stage(s) {ran}, {len(cached)} cached")
    print(f"outputs: {store.uri}")
    print(f"run summary: {store.run_dir(run_id).uri}/summary.json")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
