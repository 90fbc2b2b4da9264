"""Preprocessing: slices/s into Parquet shards against one PNG file per slice, and 1 vs 2 tasks, per source.

Sources: ``phantom`` (generated in the task) and ``nifti`` (the same phantom subjects written once,
before timing, as BraTS-layout volumes: ``<subject>/<subject>-t1c.nii.gz`` + ``-seg.nii.gz``).
Ratios, ``<source>`` = phantom or nifti:
- ``parquet_over_png_files_<source>``: ``prepare_dataset`` slices/s / a naive baseline that reads the
  same inputs (renders the phantom; loads each volume with nibabel and scales it to uint8) and writes
  each slice as a PNG file with Pillow (no masks, no manifest, no splits).
- ``two_over_one_task_<source>``: slices/s of ``run_shard`` over the plan's shards in a warm 2-process
  pool / the same shards one after the other in this process (plan + start + finish included on both
  sides; on a 2-CPU machine shared with other work, well under 2).
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from acol_core.data.phantom import PhantomConfig, generate_phantom
from acol_core.data.prepare import finish_dataset, plan_dataset, prepare_dataset, run_shard, start_dataset
from acol_core.data.sources import get_source
from acol_core.data.sources.nifti import from_display, to_display

from .common import compare, ratio

__all__ = ["SOURCES", "run", "write_nifti_inputs"]

SOURCES = ("phantom", "nifti")


def write_nifti_inputs(root: Path, subjects: int, slices: int, size: int) -> int:
    """The phantom's subjects as one T1c volume and one segmentation per subject; returns the slice count."""
    volumes: dict[str, list[Any]] = {}
    for item in generate_phantom(PhantomConfig(num_subjects=subjects, slices_per_subject=slices, size=size)):
        volumes.setdefault(item.subject_id, []).append(item)
    for subject, items in volumes.items():
        items.sort(key=lambda s: s.slice_index)
        # Display-oriented slices back onto a canonical (RAS, identity affine) grid: x, y, z.
        image = np.stack([from_display(s.image) for s in items], axis=-1).astype(np.float32)
        seg = np.stack([from_display(s.tumour_mask) for s in items], axis=-1).astype(np.uint8)
        folder = root / subject.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{folder.name}-t1c.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{folder.name}-seg.nii.gz")
    return sum(len(items) for items in volumes.values())


def _png_files_phantom(out: Path, options: dict[str, Any]) -> int:
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


def _png_files_nifti(out: Path, input_root: Path) -> int:
    count = 0
    for path in sorted(input_root.glob("*/*-t1c.nii.gz")):
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        lo, hi = float(volume.min()), float(volume.max())
        scaled = ((volume - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
        for z in range(scaled.shape[2]):
            Image.fromarray(to_display(scaled[:, :, z])).save(out / f"{path.parent.name}_{z}.png")
            count += 1
    return count


def _png_files(workdir: Path, source: str, options: dict[str, Any], input_root: Path) -> int:
    out = workdir / f"png_baseline_{source}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return _png_files_phantom(out, options) if source == "phantom" else _png_files_nifti(out, input_root)


def _source_args(source: str, options: dict[str, Any], input_root: Path) -> dict[str, Any]:
    return dict(options) if source == "phantom" else {"input_uri": str(input_root)}


def _sharded(
    uri: str, source: str, args: dict[str, Any], rows_per_shard: int, pool: ProcessPoolExecutor | None
) -> int:
    plan = plan_dataset(source, uri, rows_per_shard=rows_per_shard, **args)
    start_dataset(plan)
    if pool is None:
        results = [run_shard(plan, i) for i in range(plan.num_shards)]
    else:
        results = list(pool.map(run_shard, [plan] * plan.num_shards, range(plan.num_shards)))
    manifest = finish_dataset(plan, results)
    return int(sum(manifest.split_counts.values()))


def _one_source(
    workdir: Path,
    source: str,
    options: dict[str, Any],
    input_root: Path,
    executor: ProcessPoolExecutor,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    args = _source_args(source, options, input_root)
    uri = str(workdir / f"prep_{source}")
    slices = prepare_dataset(source, uri, **args).split_counts  # also the warm-up of the first import
    total = int(sum(slices.values()))
    files = compare(
        lambda: prepare_dataset(source, uri, **args),
        lambda: _png_files(workdir, source, options, input_root),
        warmup,
        repeats,
    )
    # Shards of a quarter of the rows, so two tasks have work to split.
    per_shard = max(1, total // 4)
    pool = compare(
        lambda: _sharded(str(workdir / f"prep_two_{source}"), source, args, per_shard, executor),
        lambda: _sharded(str(workdir / f"prep_one_{source}"), source, args, per_shard, None),
        max(1, warmup),
        repeats,
    )
    ratios = {
        f"parquet_over_png_files_{source}": files.b_s / files.a_s,
        f"two_over_one_task_{source}": pool.b_s / pool.a_s,
    }
    details = {
        "slices": total,
        "parquet_slices_per_s": ratio(total, files.a_s),
        "png_files_slices_per_s": ratio(total, files.b_s),
        "one_task_slices_per_s": ratio(total, pool.b_s),
        "two_tasks_slices_per_s": ratio(total, pool.a_s),
        "rows_per_shard": per_shard,
    }
    return ratios, details


def run(
    workdir: Path,
    subjects: int,
    slices: int,
    size: int,
    warmup: int,
    repeats: int,
    sources: tuple[str, ...] = SOURCES,
) -> dict[str, Any]:
    options = {"num_subjects": subjects, "slices_per_subject": slices, "size": size}
    input_root = workdir / "nifti_inputs"
    if "nifti" in sources:
        write_nifti_inputs(input_root, subjects, slices, size)
    ratios: dict[str, float] = {}
    details: dict[str, Any] = {"input": size, "subjects": subjects, "slices_per_subject": slices}
    # The pool starts once, outside the timing (a long preprocessing run pays the start-up once too);
    # spawn, because a forked child would inherit torch's thread pools from this process.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as executor:
        for source in sources:
            r, d = _one_source(workdir, source, options, input_root, executor, warmup, repeats)
            ratios |= r
            details[source] = d
    return {"ratios": ratios, "details": details}
