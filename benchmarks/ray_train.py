"""Ray Train overhead: train images/s under a 1-worker TorchTrainer / ``fit`` in this process, same data.

Both sides train the same config on the same phantom dataset for ``epochs`` epochs; the figure is the
median ``train_images_per_s`` over the epochs after the first (the first pays compilation, Ray Data's
start-up and the first blocks). Under Ray the worker streams and decodes rows through Ray Data; in
process the rows are decoded up front and only augmentation runs inside the timed loop, so the ratio
includes everything Ray adds on the way to the step (target >= 0.95).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.train import fit, iterate_minibatches, select_device

from .common import ratio

__all__ = ["run"]


def _steady(history: list[dict[str, float]]) -> float:
    values = [h["train_images_per_s"] for h in history if "train_images_per_s" in h]
    return statistics.median(values[1:] or values)


def run(
    workdir: Path, subjects: int, slices: int, size: int, batch: int, epochs: int, threads: int
) -> dict[str, Any]:
    import ray

    from acol_core.jobs.train_run import RunOptions, run_training

    uri = str(workdir / "ray_train_ds")
    prepare_dataset("phantom", uri, num_subjects=subjects, slices_per_subject=slices, size=size)
    config = TrainConfig(
        backbone="tiny", image_size=size, epochs=epochs, batch_size=batch, num_threads=threads, amp="off"
    )
    arrays = table_to_arrays(open_dataset(uri).read_table(split="train"), 1, size)

    def batches(epoch: int):
        return iterate_minibatches(arrays, batch, np.random.default_rng(epoch), config.augment)

    local = fit(config, train_batches=batches)
    # A short private temp dir: Ray's socket paths must stay under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ.setdefault("RAY_TMPDIR", ray_tmp)
    # The same device on both sides: fit() takes select_device()'s, the Ray worker a GPU if there is one.
    gpus = 1.0 if select_device().type == "cuda" else 0.0
    options = RunOptions(data=uri, storage=str(workdir / "ray_runs"), workers=1, gpus_per_worker=gpus)
    try:
        result = run_training(config, options)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    local_ips, ray_ips = _steady(local.history), _steady(result.history)
    return {
        "ratios": {"ray_over_in_process": ratio(ray_ips, local_ips)},
        "targets": {"ray_over_in_process": ">= 0.95"},
        "details": {
            "train_rows": len(arrays["label"]),
            "input": size,
            "batch": batch,
            "epochs": epochs,
            "ray_images_per_s": ray_ips,
            "in_process_images_per_s": local_ips,
            "device": str(select_device()),
        },
    }
