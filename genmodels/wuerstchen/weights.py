"""Name mapping between our Würstchen modules and the public v2 checkpoints (diffusers layout).

kinds: "stage_c" <-> `WuerstchenPrior`, "stage_b" <-> `WuerstchenDiffNeXt`,
"stage_a" <-> `PaellaVQModel`. Only dict keys change; tensors are passed through untouched
(ours keep the checkpoints' shapes, e.g. GRN gamma (1, 1, 1, C)). Reading files is left to
the caller. The semantic compressor has no diffusers model (the v2 pipelines take its output).

The mapping is two explicit parts, both easy to edit:
  * `BLOCK_RENAMES`: parameter names inside one block (ours -> diffusers), prefix match;
  * per-kind functions for the container paths (indices differ because diffusers keeps flat
    lists: the prior interleaves [Res, Timestep, Attn] and DiffNeXt levels hold the
    resampler at index 0 (down) or last (up)).
Unknown keys raise KeyError rather than being dropped silently.
"""
import re

from torch import Tensor

# ours -> diffusers, inside ResBlock / TimestepBlock / AttnBlock (common.py) and MixingBlock (stage_a.py)
BLOCK_RENAMES = {
    "res": [("depthwise.", "depthwise."), ("mlp.", "channelwise.")],
    "time": [("mapper.", "mapper.")],
    "attn": [
        ("kv_mapper.", "kv_mapper."),
        ("q_proj.", "attention.to_q."),
        ("k_proj.", "attention.to_k."),
        ("v_proj.", "attention.to_v."),
        ("out_proj.", "attention.to_out.0."),
    ],
    "mix": [("depthwise.", "depthwise.1."), ("mlp.", "channelwise."), ("gammas", "gammas")],
}
# DiffNeXt blocks are typed by their parameter names, since diffusers keeps no type in the path.
_ANY_BLOCK = BLOCK_RENAMES["res"] + BLOCK_RENAMES["time"] + BLOCK_RENAMES["attn"]


def _rename(rest: str, table: list[tuple[str, str]], inverse: bool) -> str:
    for ours, theirs in table:
        src, dst = (theirs, ours) if inverse else (ours, theirs)
        if rest.startswith(src):
            return dst + rest[len(src):]
    raise KeyError(rest)


def _max_index(keys, pattern: str) -> dict[str, int]:
    """For a regex with groups (outer, inner), the largest inner index per outer index."""
    out: dict[str, int] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), -1), int(m.group(2)))
    return out


# ---------------------------------------------------------------- Stage C <-> WuerstchenPrior
_C_TOP = [("proj_in.", "projection."), ("text_mapper.", "cond_mapper."), ("proj_out.", "out.1.")]
_C_SLOT = {"res": 0, "time": 1, "attn": 2}


def _stage_c_key(k: str, inverse: bool) -> str:
    if not inverse:
        m = re.match(r"blocks\.(\d+)\.(res|time|attn)\.(.*)", k)
        if m:
            i, kind, rest = int(m.group(1)), m.group(2), m.group(3)
            return f"blocks.{3 * i + _C_SLOT[kind]}.{_rename(rest, BLOCK_RENAMES[kind], False)}"
    else:
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            kind = next(n for n, s in _C_SLOT.items() if s == i % 3)
            return f"blocks.{i // 3}.{kind}.{_rename(rest, BLOCK_RENAMES[kind], True)}"
    return _rename(k, _C_TOP, inverse)


# ---------------------------------------------------------------- Stage B <-> WuerstchenDiffNeXt
_B_TOP = [("text_mapper.", "clip_mapper."), ("stem.", "embedding."), ("head.", "clf.")]


def _stage_b_key(k: str, inverse: bool, n_levels: int, n_up_blocks: dict[str, int]) -> str:
    if not inverse:
        m = re.match(r"(down|up)\.(\d+)\.(blocks\.(\d+)\.|resample\.|sem_mapper\.)(.*)", k)
        if not m:
            return _rename(k, _B_TOP, False)
        side, i, part, rest = m.group(1), int(m.group(2)), m.group(3), m.group(5)
        if part == "sem_mapper.":
            return f"effnet_mappers.{i if side == 'down' else n_levels + i}.{rest}"
        if part == "resample.":  # down: first entry of the level; up: after the blocks
            return f"{side}_blocks.{i}.{0 if side == 'down' else n_up_blocks[str(i)]}.{rest}"
        j = int(m.group(4)) + (1 if side == "down" and i > 0 else 0)
        return f"{side}_blocks.{i}.{j}.{_rename(rest, _ANY_BLOCK, False)}"
    m = re.match(r"effnet_mappers\.(\d+)\.(.*)", k)
    if m:
        i = int(m.group(1))
        side, i = ("down", i) if i < n_levels else ("up", i - n_levels)
        return f"{side}.{i}.sem_mapper.{m.group(2)}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(\d+)\.(.*)", k)
    if not m:
        return _rename(k, _B_TOP, True)
    side, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    # Resamplers are the only entries whose parameters sit under a numeric child ("1.weight").
    if re.match(r"\d+\.", rest):
        return f"{side}.{i}.resample.{rest}"
    j -= 1 if side == "down" and i > 0 else 0
    return f"{side}.{i}.blocks.{j}.{_rename(rest, _ANY_BLOCK, True)}"


# ---------------------------------------------------------------- Stage A <-> PaellaVQModel
_A_TOP = [
    ("in_block.", "in_block."),
    ("quantizer.codebook.", "vquantizer.embedding."),
    ("from_latent.", "up_blocks.0.0."),
    ("out_block.", "out_block."),
]


def _stage_a_key(k: str, inverse: bool, n_down: int) -> str:
    if not inverse:
        m = re.match(r"(down|up)\.(\d+)\.(.*)", k)
        if m:
            side, i, rest = m.group(1), int(m.group(2)), m.group(3)
            i += 1 if side == "up" else 0  # diffusers up_blocks.0 is the latent 1x1 conv
            rest = rest if rest in ("weight", "bias") else _rename(rest, BLOCK_RENAMES["mix"], False)
            return f"{side}_blocks.{i}.{rest}"
        if k.startswith("to_latent."):
            return f"down_blocks.{n_down}.{k[len('to_latent.'):]}"
        return _rename(k, _A_TOP, False)
    m = re.match(r"(down|up)_blocks\.(\d+)\.(.*)", k)
    if not m or k.startswith("up_blocks.0."):
        return _rename(k, _A_TOP, True)
    side, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if side == "down" and i == n_down:
        return f"to_latent.{rest}"
    i -= 1 if side == "up" else 0
    rest = rest if rest in ("weight", "bias") else _rename(rest, BLOCK_RENAMES["mix"], True)
    return f"{side}.{i}.{rest}"


# ---------------------------------------------------------------- public API
def _convert(kind: str, sd: dict[str, Tensor], inverse: bool) -> dict[str, Tensor]:
    keys = list(sd)
    if kind == "stage_c":
        def fn(k):
            return _stage_c_key(k, inverse)
    elif kind == "stage_b":
        if inverse:
            n_levels = _max_index(keys, r"(down)_blocks\.(\d+)\.")["down"] + 1
            n_up = {}  # not needed from diffusers: resamplers are recognized by their "N.weight" names
        else:
            n_levels = _max_index(keys, r"(down)\.(\d+)\.")["down"] + 1
            n_up = {i: n + 1 for i, n in _max_index(keys, r"up\.(\d+)\.blocks\.(\d+)\.").items()}
        def fn(k):
            return _stage_b_key(k, inverse, n_levels, n_up)
    elif kind == "stage_a":
        if inverse:
            n_down = _max_index(keys, r"(down)_blocks\.(\d+)\.")["down"]
        else:
            n_down = _max_index(keys, r"(down)\.(\d+)\.")["down"] + 1
        def fn(k):
            return _stage_a_key(k, inverse, n_down)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected stage_a, stage_b or stage_c")
    out = {fn(k): v for k, v in sd.items()}
    assert len(out) == len(sd), "name mapping is not one-to-one"
    return out


def map_diffusers_state_dict(kind: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers-layout state dict (WuerstchenPrior / WuerstchenDiffNeXt / PaellaVQModel) -> ours."""
    return _convert(kind, sd, inverse=True)


def to_diffusers_state_dict(kind: str, our_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (StageC / StageB / StageA) -> diffusers-layout names."""
    return _convert(kind, our_sd, inverse=False)
