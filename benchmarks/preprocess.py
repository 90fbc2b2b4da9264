"""Preprocessing: phantom slices/s into Parquet shards, against one PNG file per slice, and 1 vs 2 tasks.

Ratios:
- ``parquet_over_png_files``: ``prepare_dataset`` slices/s / a naive baseline that renders the same
  slices from the same source and writes each as a PNG file with Pillow (no masks, no manifest).
- ``two_over_one_task``: slices/s of ``run_shard`` over the plan's shards in a warm 2-process pool / the
  same shards one after the other in this process (plan + start + finish included on both sides; on a
  2-CPU machine shared with other work, well under 2).
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from acol_core.data.prepare import finish_dataset, plan_dataset, prepare_dataset, run_shard, start_dataset
from acol_core.data.sources import get_source

from .common import compare, ratio

__all__ = ["run"]


def _png_files(workdir: Path, options: dict[str, Any]) -> int:
    out = workdir / "png_baseline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    src = get_source("phantom", seed=0, **options)
    count = 0
    for ref in src.list_inputs():
        for record in src.read_input(ref.key):
            img = np.asarray(record.image)
            if img.dtype != np.uint8:
                img = (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8) if img.dtype.kind == "f" else img
            Image.fromarray(img).save(out / (record.image_id.replace("/", "_") + ".png"))
            count += 1
    return count


def _sharded(uri: str, options: dict[str, Any], rows_per_shard: int, pool: ProcessPoolExecutor | None) -> int:
    plan = plan_dataset("phantom", uri, rows_per_shard=rows_per_shard, **options)
    start_dataset(plan)
    if pool is None:
        results = [run_shard(plan, i) for i in range(plan.num_shards)]
    else:
        results = list(pool.map(run_shard, [plan] * plan.num_shards, range(plan.num_shards)))
    manifest = finish_dataset(plan, results)
    return int(sum(manifest.split_counts.values()))


def run(workdir: Path, subjects: int, slices: int, size: int, warmup: int, repeats: int) -> dict[str, Any]:
    options = {"num_subjects": subjects, "slices_per_subject": slices, "size": size}
    total = subjects * slices
    uri = str(workdir / "prep_parquet")
    files = compare(
        lambda: prepare_dataset("phantom", uri, **options),
        lambda: _png_files(workdir, options),
        warmup,
        repeats,
    )
    # Shards of a quarter of the rows, so two tasks have work to split.
    per_shard = max(1, total // 4)
    # The pool starts once, outside the timing (a long preprocessing run pays the start-up once too);
    # spawn, because a forked child would inherit torch's thread pools from this process.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as executor:
        pool = compare(
            lambda: _sharded(str(workdir / "prep_two"), options, per_shard, executor),
            lambda: _sharded(str(workdir / "prep_one"), options, per_shard, None),
            max(1, warmup),
            repeats,
        )
    return {
        "ratios": {"parquet_over_png_files": files.b_s / files.a_s, "two_over_one_task": pool.b_s / pool.a_s},
        "details": {
            "slices": total,
            "input": size,
            "parquet_slices_per_s": ratio(total, files.a_s),
            "png_files_slices_per_s": ratio(total, files.b_s),
            "one_task_slices_per_s": ratio(total, pool.b_s),
            "two_tasks_slices_per_s": ratio(total, pool.a_s),
            "rows_per_shard": per_shard,
        },
    }
