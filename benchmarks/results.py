"""Shared by the benchmark scripts: where results go and which device produced them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(RESULTS), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(bench: str, figures: dict[str, Any], path: str = RESULTS) -> None:
    """Append one machine-readable line: benchmark name, device, commit, time, figures."""
    line = {"bench": bench, "device": device_name(), "commit": _commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    with open(path, "a") as f:
        f.write(json.dumps(line, default=float) + "\n")
