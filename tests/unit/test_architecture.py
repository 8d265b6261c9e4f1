"""The floors of the code base (README "Layout"), checked on the source: each package imports
only from the floors below it, no import circle anywhere, no file over 500 lines, and the
held-out fraction is one config field, the shard stage's."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("genmodels", "pipeline", "data_prep", "workflows")
# What each package may import from the project (besides itself).
ALLOWED = {"genmodels": set(), "pipeline": set(), "data_prep": {"pipeline", "genmodels"},
           "workflows": {"pipeline", "genmodels", "data_prep"}}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Project modules each module imports (at any depth of its code), `from pkg import sub` as pkg.sub."""
    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in subs if n in mods] + ([node.module] if any(n not in mods for n in subs) else [])
            else:
                continue
            targets |= {resolve(n) for n in names if n.split(".")[0] in PACKAGES}
        graph[mod] = targets - {mod, ""}
    return graph


def test_each_package_imports_only_from_the_floors_below():
    graph = _imports(_modules())
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not upward, upward


def test_no_import_circle():
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (found := visit(t, path + [m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (cycle := visit(m, [])) is None, " -> ".join(cycle)


def test_no_file_over_the_limit():
    files = [*_modules().values(), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_heldout_fraction_is_declared_once_by_the_shard_stage():
    from workflows.full_pipeline import STAGES

    def fields(cls, prefix=""):  # nested configs too (a training stage's ``train:`` section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name], prefix + f.name + ".")

    owners = [f"{s.name}.{name}" for s in STAGES for name in fields(s.config) if name.endswith("heldout_fraction")]
    assert owners == ["shard.heldout_fraction"]
    assert any("train.lr" in n for s in STAGES for n in fields(s.config))  # nested sections were walked
