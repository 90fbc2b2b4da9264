"""Data path: phantom Parquet rows -> decoded, augmented batches, against the train step and raw decode.

Ratios:
- ``loader_over_train_<backbone>``: loader images/s / ACoL train-step images/s at the same input size;
  >= 3 means one loader process keeps the step fed with room to spare.
- ``loader_over_raw_png``: loader images/s / ``decode_png`` images/s in a tight loop over the same bytes
  (below 1: what resizing, standardising, masks and augmentation add to the bare decode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from acol_core.data.codec import decode_png
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import augment_batch, decode_rows

from .common import median_time, ratio
from .train_cost import make_step

__all__ = ["run"]

_COLUMNS = ["image", "label", "mask", "anatomy_mask", "fullsup"]


def run(
    workdir: Path,
    subjects: int,
    slices: int,
    size: int,
    batch: int,
    backbones: tuple[str, ...],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    uri = str(workdir / "data_path_ds")
    prepare_dataset("phantom", uri, num_subjects=subjects, slices_per_subject=slices, size=size)
    rows = open_dataset(uri).read_table(split="train").select(_COLUMNS).to_pydict()
    n = len(rows["label"])
    rng = np.random.default_rng(0)

    def load_all() -> None:
        for start in range(0, n, batch):
            part = {k: v[start : start + batch] for k, v in rows.items()}
            augment_batch(decode_rows(part, 1, size), rng)

    def raw_decode() -> None:
        for data in rows["image"]:
            decode_png(bytes(data))

    loader_s = median_time(load_all, warmup, repeats)
    raw_s = median_time(raw_decode, warmup, repeats)
    loader_ips, raw_ips = ratio(n, loader_s), ratio(n, raw_s)
    ratios = {"loader_over_raw_png": ratio(loader_ips, raw_ips)}
    details: dict[str, Any] = {
        "rows": n,
        "input": size,
        "batch": batch,
        "loader_images_per_s": loader_ips,
        "raw_png_images_per_s": raw_ips,
    }
    for backbone in backbones:
        step = make_step("acol", backbone, batch, size, device)
        train_ips = ratio(batch, median_time(step, warmup, repeats))
        ratios[f"loader_over_train_{backbone}"] = ratio(loader_ips, train_ips)
        details[f"train_images_per_s_{backbone}"] = train_ips
    return {"ratios": ratios, "targets": {"loader_over_train_*": ">= 3"}, "details": details}
