"""Stage ``recaption``: a LLaVA caption for every image the filter kept, beside the original.

One streaming Ray Data pass: ``read_webdataset`` over the download tars → :func:`prepare`
(keep only the filter's kept rows, decode, centre-crop to the processor's input size; CPU
tasks in front of GPU actors, inside the actor on CPU) →
:class:`~data_prep.models.LlavaCaptioner` (actor pool; ``gpus_per_actor`` per actor on
GPU with ``num_cpus=0``, bf16) → ``rows/shard=<id>/*.parquet``. On CPU the pass runs in plain Ray
tasks instead, unless ``task_rows`` is 0 (:func:`data_prep.partitions.task_pass`).
Images are not copied: the shard stage joins captions back to the download tars by ``key``.

``model: tiny`` builds a tiny random LLaVA offline (:mod:`data_prep.tiny_llava`) once per
machine under ``~/.cache/genmodels`` so the whole path runs for real on a CPU; any other value
is a hub id or a local ``save_pretrained`` directory passed to ``from_pretrained``.

Output schema of ``rows/`` (``shard`` from the hive directory): ``key``, ``sample_id``,
``caption`` (the original, cleaned), ``recaption``, ``recaption_error`` ("" or
``decode_error``/``too_large``). Exactly once as in the filter stage: a shard is done when its
files hold as many rows as the filter kept for it; incomplete shards are deleted and redone.

Counts: ``rows_in``, ``rows_out``, ``empty_recaptions``, ``errors``, ``mean_recaption_words``,
``shards``, ``shards_resumed``, ``rows_per_s``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import images, tiny_llava
from data_prep.partitions import (
    TarPassConfig,
    in_tasks_label,
    pending_shards,
    read_shard_rows,
    read_shards,
    read_tars,
    sample_columns,
    tar_shards,
    task_pass,
    write_by_shard,
)
from data_prep.progress import Phases
from pipeline.stage import actor_resources
from pipeline.store import Artifact

log = logging.getLogger("genmodels")

LLAVA_15_PROMPT = "USER: <image>\nDescribe this image in one sentence. ASSISTANT:"


@dataclass(frozen=True)
class RecaptionConfig(TarPassConfig):
    """Settings of the recaption stage (``stages.recaption``).

    model: ``llava-hf/llava-1.5-7b-hf`` (or any LLaVA checkpoint id / local directory);
        ``tiny`` = the random offline model of :mod:`data_prep.tiny_llava`.
    prompt: the full prompt in the model's chat format, containing ``<image>``.
    max_new_tokens: generation length (greedy decoding).
    batch_size: images per ``generate`` call; actors: captioner actor pool size.
    gpus_per_actor: GPUs per actor (0: CPU); GPU actors request 0 CPUs and run in bf16.
    cpus_per_actor: CPUs per actor on CPU (fractional: a 2-CPU node must keep read slots free).
    cpus_per_task: CPUs per preprocessing task (GPU actors only; CPU actors preprocess themselves).
    image_size: side of the square image handed to the processor; 0 = the processor's crop size.
    max_image_pixels: decompression-bomb guard.
    """

    model: str = "llava-hf/llava-1.5-7b-hf"
    prompt: str = LLAVA_15_PROMPT
    max_new_tokens: int = 48
    batch_size: int = 8
    cpus_per_task: float = 1.0
    image_size: int = 0
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if "<image>" not in self.prompt:
            raise ValueError(f"prompt: must contain '<image>', got {self.prompt!r}")
        for name in ("max_new_tokens", "batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task: must be > 0, got {self.cpus_per_task}")
        self.validate_pool()


def processor_size(model: str) -> int:
    """The processor's crop side. From its saved config when ``model`` is a local directory
    (``tiny`` is): importing transformers on the driver only to read one number cost seconds."""
    path = tiny_llava.resolve(model)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                saved = json.load(f)
            crop = saved.get("image_processor", saved).get("crop_size")
            if crop:
                return int(crop["height"] if isinstance(crop, dict) else crop)
    from transformers import AutoProcessor  # lazy: transformers is heavy and only needed to run the stage

    crop = AutoProcessor.from_pretrained(path).image_processor.crop_size
    return int(crop["height"] if isinstance(crop, dict) else crop.height)


# Per worker process: kept keys of each filter shard (tasks of one stage reuse their worker).
_KEPT: dict[tuple[str, str], set[str]] = {}
_KEPT_LOCK = threading.Lock()


def kept_keys(filt: Artifact, shard: str) -> set[str]:
    k = (filt.uri, shard)
    with _KEPT_LOCK:
        if k not in _KEPT:
            t = read_shard_rows(filt, "rows", shard, ["key", "keep"])
            _KEPT[k] = set(pc.filter(t.column("key"), t.column("keep")).to_pylist())
        return _KEPT[k]


def prepare(batch: dict[str, Any], *, filt: Artifact, path_to_shard: dict[str, str], size: int,
            max_pixels: int) -> dict[str, np.ndarray]:
    """Raw webdataset rows → the filter's kept rows with a ``size``² uint8 image each."""
    cols = sample_columns(batch, path_to_shard)
    keep = [i for i, (s, k) in enumerate(zip(cols["shard"], cols["key"])) if k in kept_keys(filt, s)]
    imgs, errors = [], []
    for i in keep:
        try:
            img = images.decode_rgb(cols["data"][i], max_pixels, draft=size)
            imgs.append(np.asarray(images.center_crop_resize(img, size), dtype=np.uint8))
            errors.append("")
        except images.BadImage as e:
            imgs.append(np.full((size, size, 3), 255, np.uint8))
            errors.append(e.reason)

    def pick(name: str) -> np.ndarray:
        return np.array([cols[name][i] for i in keep], dtype=object)

    return {"shard": pick("shard"), "key": pick("key"), "sample_id": pick("sample_id"), "caption": pick("caption"),
            "recaption_error": np.array(errors, dtype=object),
            "image": np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)}


class PreparingCaptioner:
    """CPU actors: :func:`prepare` and :class:`~data_prep.models.LlavaCaptioner` in one
    process (as :class:`data_prep.filter.PreparingScorer`: no images through the object store,
    no second set of worker processes). GPU actors keep CPU tasks in front of them."""

    def __init__(self, *, model: str, prompt: str, max_new_tokens: int, filt: Artifact,
                 path_to_shard: dict[str, str], size: int, max_pixels: int):
        from data_prep.models import LlavaCaptioner  # lazy: torch and transformers, only in the actors

        self.captioner = LlavaCaptioner(model=model, prompt=prompt, max_new_tokens=max_new_tokens)
        self.prepare = functools.partial(prepare, filt=filt, path_to_shard=path_to_shard, size=size,
                                         max_pixels=max_pixels)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.captioner(self.prepare(batch))


def caption_stats(batch: pa.Table) -> pa.Table:
    rec = batch.column("recaption").to_pylist()
    err = batch.column("recaption_error").to_pylist()
    return pa.table({"rows": [len(rec)], "empty": [sum(1 for r in rec if not r)], "errors": [sum(1 for e in err if e)],
                     "words": [sum(len(r.split()) for r in rec)]})


def stats_files(out: Artifact) -> list[dict[str, int]]:
    """:func:`caption_stats` of every ``rows/`` file, read here (two columns) with a few threads:
    cheaper than starting a Ray Data pass for four sums."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> dict[str, int]:
        with out.fs.open_input_file(out.child(name)) as f:
            return caption_stats(pq.read_table(f, columns=["recaption", "recaption_error"])).to_pylist()[0]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, out.list(".parquet", subdir="rows")))


def caption_pass(download: Artifact, shards: list[str], cfg: RecaptionConfig, model: dict[str, Any],
                 raw: dict[str, Any], out: Artifact) -> None:
    """The Ray Data pass: tars → (CPU tasks in front of GPU actors, or CPU actors that prepare
    themselves) → ``rows/``, streamed."""
    import ray  # lazy: Ray is only needed inside a running stage

    from data_prep.models import LlavaCaptioner  # lazy: torch and transformers, only in the actors

    ds = read_tars(download, shards, raw["path_to_shard"])
    if cfg.gpus_per_actor > 0:
        ds = ds.map_batches(prepare, batch_format="numpy", batch_size=max(cfg.batch_size, 32),
                            num_cpus=cfg.cpus_per_task, fn_kwargs=raw)
        fn, kwargs = LlavaCaptioner, model
    else:
        fn, kwargs = PreparingCaptioner, model | raw
    ds = ds.map_batches(fn, batch_format="numpy", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors), fn_constructor_kwargs=kwargs,
                        **actor_resources(cfg))
    write_by_shard(ds, out, "rows")


def run(inputs: dict[str, Artifact], cfg: RecaptionConfig, out: Artifact) -> dict[str, Any]:
    download, filt = inputs["download"], inputs["filter"]
    _, path_to_shard = tar_shards(download)
    expected = {s: v["kept"] for s, v in read_shards(filt).items()}
    t0 = time.time()
    phases = Phases("recaption")
    todo = pending_shards(out, "rows", expected)
    rows_todo = sum(expected[s] for s in todo)
    log.info("[recaption] %d shards, %d kept rows; captioning %d rows in %d shards with %s", len(expected),
             sum(expected.values()), rows_todo, len(todo), cfg.model)
    if todo:
        size = cfg.image_size or processor_size(cfg.model)
        model = {"model": cfg.model, "prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}
        raw = {"filt": filt, "path_to_shard": path_to_shard, "size": size, "max_pixels": cfg.max_image_pixels}
        tasks = cfg.tasks_for(rows_todo)
        with phases("caption pass (decode, LLaVA)" + in_tasks_label(tasks), rows=rows_todo):
            if tasks:
                task_pass(functools.partial(PreparingCaptioner, **model, **raw), download,
                          {s: expected[s] for s in todo}, path_to_shard, out, "rows", cfg.batch_size,
                          cfg.cpus_per_actor, tasks, "recaption")
            else:
                caption_pass(download, todo, cfg, model, raw, out)
        still = pending_shards(out, "rows", expected)
        if still:
            raise RuntimeError(f"recaption: rows incomplete after the pass for shards {still[:5]}")
    wall = time.time() - t0

    totals = {"rows": 0, "empty": 0, "errors": 0, "words": 0}
    with phases("stats"):
        for row in stats_files(out):
            for k in totals:
                totals[k] += row[k]
    counts = {"rows_in": sum(expected.values()), "rows_out": totals["rows"], "empty_recaptions": totals["empty"],
              "errors": totals["errors"], "mean_recaption_words": round(totals["words"] / max(totals["rows"], 1), 2),
              "shards": len(expected), "shards_resumed": len(expected) - len(todo),
              "rows_per_s": round(rows_todo / wall, 2) if rows_todo and wall > 0 else None,
              "phase_s": phases.seconds}
    log.info("[recaption] summary: rows in %d, rows out %d, empty %d, errors %d, %.1f rows/s", counts["rows_in"],
             counts["rows_out"], counts["empty_recaptions"], counts["errors"], counts["rows_per_s"] or 0.0)
    return counts
