"""Networks that derive stored rows run on batches of one size, whatever batch Ray Data hands over.

oneDNN picks its convolution kernels by batch size. On the development CPU a row's output in a
batch of 1-15 differs by up to ~1e-6 from the same row's in a batch of 16 or more (Stage A's encoder,
the PaGoDA teacher; 16, 24, 32 and 64 agree bit for bit). Ray Data's batches end where its blocks
end, and that depends on the machine's load. So without this a derived row (a latent, an
inversion) would depend on how the run was scheduled, and a chaotic training run downstream
turns that last bit into different metrics (BENCHMARKS.md, eleventh session).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Column = torch.Tensor | list[Any]


def padded(column: Column, rows: int, fill: Any = None) -> Column:
    """``column`` with rows appended up to ``rows``: zeros for a tensor, else ``fill`` (``None``:
    the last row again, which is always a valid value)."""
    short = rows - len(column)
    if short <= 0:
        return column
    if isinstance(column, torch.Tensor):
        return torch.cat([column, column.new_zeros((short, *column.shape[1:]))])
    return [*column, *[column[-1] if fill is None else fill] * short]


def run_fixed(fn: Callable[..., Any], rows: int, *columns: Column, fills: tuple[Any, ...] = ()) -> Any:
    """``fn(*chunk)`` on chunks of exactly ``rows`` rows of ``columns`` (the last chunk padded by
    :func:`padded`, column ``i`` with ``fills[i]`` where given), its outputs cut back to the real
    rows and concatenated. ``fn`` returns a tensor or a dict of tensors, one row per input row."""
    n = len(columns[0])
    if n == 0:
        return fn(*columns)
    outs = []
    for i in range(0, n, rows):
        chunk = [padded(c[i:i + rows], rows, fills[j] if j < len(fills) else None) for j, c in enumerate(columns)]
        out = fn(*chunk)
        real = min(rows, n - i)
        outs.append({k: v[:real] for k, v in out.items()} if isinstance(out, dict) else out[:real])
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)
