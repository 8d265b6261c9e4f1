"""Pipeline configuration: frozen dataclasses loaded from YAML, overridable from the CLI.

A pipeline config file has three sections::

    run:    {root: runs/demo, name: demo}
    ray:    {address: null, num_cpus: null}
    stages: {download: {...}, filter: {...}}

Each stage owns one frozen dataclass (declared next to its code); validation turns the YAML
into those dataclasses before any cluster work starts, and every error is one line naming
the key: ``stages.download.image_size: expected int, got 'big'``, or for a misspelt one
``stages.download.image_sise: unknown key (did you mean 'image_size'?; known keys: ...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
import types
import typing
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the problem."""


@dataclass(frozen=True)
class RunConfig:
    root: str = "runs/demo"  # local path or s3://bucket/prefix
    name: str = "demo"
    # Optional $/hour per resource, e.g. {"CPU": 0.04, "GPU:H100": 4.0}, for cost accounting.
    prices: dict[str, float] = field(default_factory=dict)
    # The machines the run is planned for: a Ray cluster-launcher YAML whose available_node_types
    # `--preflight` fits every stage to (relative paths: from the repository root).
    cluster: str = "cluster/aws.yaml"
    # Stages that share no input run at once, up to this many (the two model families' branches).
    parallel_stages: int = 1

    def validate(self) -> None:
        check([("parallel_stages", self.parallel_stages >= 1, "must be >= 1")])


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # RAY_ADDRESS wins when set (as under `ray job submit`)
    num_cpus: int | None = None  # only for a local Ray started by the pipeline
    # Workers inherit these so that plain s3:// URIs resolve to the same endpoint everywhere.
    env: dict[str, str] = field(default_factory=dict)


def path_field(default: str = "", *, must_exist: bool = True) -> Any:
    """A config field holding a local path or URI that is checked before any work starts."""
    return field(default=default, metadata={"path": True, "must_exist": must_exist})


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def build(cls: type, data: Any, where: str) -> Any:
    """Make dataclass ``cls`` from a mapping, checking every key and type; ``where`` names it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise unknown_name(f"{where}.{unknown[0]}", unknown[0], "key", known)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}"
        kwargs[name] = _coerce(hints[name], value, key)
        if known[name].metadata.get("path") and known[name].metadata.get("must_exist") and kwargs[name]:
            _check_path(kwargs[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from e
    return obj


def unknown_name(key: str, name: Any, kind: str, known: Iterable[str]) -> ConfigError:
    """``<key>: unknown <kind> (did you mean 'x'?; known <kind>s: ...)``, the hint when one is close."""
    known = sorted(known)
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f"did you mean {by_lower[close[0]]!r}?; " if close else ""
    return ConfigError(f"{key}: unknown {kind} ({hint}known {kind}s: {', '.join(known)})")


def check(checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError("key: problem")`` for the first failed ``(key, ok, problem)``; ``build``
    prefixes the section, so the user reads ``stages.<stage>.<key>: <problem>``."""
    for key, ok, msg in checks:
        if not ok:
            raise ValueError(f"{key}: {msg}")


def _check_path(value: str, key: str) -> None:
    if "://" in value:  # remote inputs are checked by the stage that reads them
        return
    if not os.path.exists(os.path.expanduser(value)):
        raise ConfigError(f"{key}: file not found: {value}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class PipelineConfig:
    run: RunConfig
    ray: RayConfig
    stages: dict[str, Any]  # stage name -> that stage's frozen config dataclass

    def to_dict(self) -> dict[str, Any]:
        return {"run": to_dict(self.run), "ray": to_dict(self.ray),
                "stages": {k: to_dict(v) for k, v in self.stages.items()}}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` pairs to a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: overrides look like key.subkey=value")
        value = yaml.safe_load(raw) if raw else ""
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SECTIONS = ("run", "ray", "stages")


def merged(path: str | None, overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The YAML at ``path`` with the overrides merged in, not yet validated, and the names of the
    overrides moved under ``stages`` (``download.x=1`` means ``stages.download.x=1``)."""
    raw: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"--config: file not found: {path}")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level")
    over = parse_overrides(overrides)
    moved = set()
    for k in list(over):
        if k not in SECTIONS:
            over.setdefault("stages", {})[k] = _merge(over.get("stages", {}).get(k, {}), over.pop(k))
            moved.add(k)
    return _merge(raw, over), moved


def load(path: str | None, overrides: list[str], stage_configs: dict[str, type]) -> PipelineConfig:
    """Read YAML, apply overrides, and validate against every stage's config class.

    Overrides may name a stage section directly (``download.image_size=64``) or with
    the ``stages.`` prefix; ``run.*`` and ``ray.*`` address the other two sections.
    """
    raw, moved = merged(path, overrides)
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        if unknown[0] in stage_configs:
            raise ConfigError(f"{unknown[0]}: a stage's settings go under 'stages:' (stages.{unknown[0]})")
        raise unknown_name(str(unknown[0]), unknown[0], "section", SECTIONS)
    stages_raw = raw.get("stages") or {}
    if not isinstance(stages_raw, dict):
        raise ConfigError("stages: expected a mapping of stage name to settings")
    bad = sorted(set(stages_raw) - set(stage_configs), key=str)
    if bad:
        if bad[0] in moved and difflib.get_close_matches(bad[0], SECTIONS, n=1, cutoff=0.6):  # `rn.root=x`
            raise unknown_name(bad[0], bad[0], "section", SECTIONS)
        raise unknown_name(f"stages.{bad[0]}", bad[0], "stage", stage_configs)
    stages = {name: build(cls, stages_raw.get(name), f"stages.{name}") for name, cls in stage_configs.items()}
    return PipelineConfig(run=build(RunConfig, raw.get("run"), "run"),
                          ray=build(RayConfig, raw.get("ray"), "ray"), stages=stages)


# Set by `ray job submit` for the entrypoint: its runtime_env names the uploaded working dir.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def is_remote_address(address: str | None) -> bool:
    """Whether a Ray address (``RAY_ADDRESS`` / ``ray.address``) names another machine than this one:
    not empty, ``auto``/``local``, loopback, or one of this host's own names and addresses."""
    if not address or address in ("auto", "local"):
        return False
    try:
        host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname or ""
    except ValueError:
        return True
    if host in ("localhost", "::1", "0.0.0.0", "") or host.startswith("127."):
        return False
    try:  # a head started on this machine advertises the machine's own address
        name = socket.gethostname()
        own = {name.lower(), *socket.gethostbyname_ex(name)[2]}
    except OSError:
        own = set()
    return host not in own


def check_run_root(cfg: PipelineConfig, environ: Mapping[str, str]) -> None:
    """Refuse a relative ``run.root`` where it would not land where the user looks for it.

    Under ``ray job submit --working-dir`` the entrypoint runs in a copy of the working dir inside
    Ray's session dir, which is deleted with the session; on a remote cluster a relative path is
    also a different directory on every node. An absolute path (a shared filesystem) or s3:// is
    fine everywhere.
    """
    root = cfg.run.root
    if root.startswith("s3://") or os.path.isabs(os.path.expanduser(root.removeprefix("file://"))):
        return
    address = environ.get("RAY_ADDRESS") or cfg.ray.address
    try:
        job_dir = (json.loads(environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        job_dir = None
    fix = "use s3://... or an absolute path every node shares"
    if is_remote_address(address):
        named = "RAY_ADDRESS" if environ.get("RAY_ADDRESS") else "ray.address"
        raise ConfigError(f"run.root: relative path {root!r} under a remote Ray cluster ({named}={address}) "
                          f"would be written inside the job's working dir on the head node and lost; {fix}")
    if job_dir:
        raise ConfigError(f"run.root: relative path {root!r} under `ray job submit --working-dir` would be written "
                          f"inside the job's copy of the working dir in Ray's session dir and lost; {fix}")
