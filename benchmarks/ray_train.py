"""Ray Train overhead: train images/s under a 1-worker TorchTrainer / ``fit`` in this process, same data.

Both sides train the same config on the same phantom dataset for ``epochs`` epochs; the figure is the
median ``train_images_per_s`` over the epochs after the first (the first pays compilation, Ray Data's
start-up and the first blocks). Under Ray the worker streams and decodes rows through Ray Data, and
each epoch's stream starts while the previous epoch validates (``EpochPrefetcher``).

Two in-process sides: ``in_process`` decodes the rows up front and only augments inside the timed loop
(the filed target, >= 0.95: everything Ray adds on the way to the step, decoding included), and
``in_process_decoding`` does Ray's per-epoch work in the loop itself (decode each batch's PNGs from the
Parquet table, standardise, augment), so ``ray_over_in_process_decoding`` prices Ray's own machinery.
``..._within_epoch`` leaves out each epoch's wait for its first batch on both sides.

Threads: on a CPU the step and Ray Data's decoding share the cores. The target ratios run torch at one
thread fewer than the cores on both sides (the loader keeps a core, as it keeps the CPUs on a GPU
machine); ``..._all_cores`` repeats them with torch on every core, where Ray's decoding (done before the
clock started in-process) takes its time from the step.
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
from acol_core.data.transforms import augment_batch, decode_rows, table_to_arrays
from acol_core.train import fit, iterate_minibatches, select_device

from .common import ratio

__all__ = ["run"]


def _steady(history: list[dict[str, float]], after_first_batch: bool = False) -> float:
    """Median train images/s of the epochs after the first; ``after_first_batch``: without each epoch's
    wait for its first batch (Ray Data starts a new execution every epoch)."""
    values = []
    for h in history:
        if "train_images_per_s" not in h:
            continue
        ips, images = h["train_images_per_s"], h["train_images"]
        if after_first_batch:
            ips = images / max(images / ips - h["train_first_batch_s"], 1e-9)
        values.append(ips)
    return statistics.median(values[1:] or values)


def _compare(
    workdir: Path, uri: str, config: TrainConfig, arrays: dict[str, np.ndarray], rows: dict[str, list]
) -> dict[str, Any]:
    """Both in-process sides and the Ray run at ``config.num_threads``: their images/s and ratios."""
    import ray

    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    batch, size = config.batch_size, config.image_size

    def batches(epoch: int):
        return iterate_minibatches(arrays, batch, np.random.default_rng(epoch), config.augment)

    def decoding_batches(epoch: int):
        rng = np.random.default_rng(epoch)
        order = rng.permutation(len(rows["label"]))
        for start in range(0, len(order), batch):
            pick = order[start : start + batch]
            out = decode_rows({k: [rows[k][i] for i in pick] for k in rows}, 1, size, with_masks=False)
            yield augment_batch(out, rng) if config.augment else out

    local = fit(config, train_batches=batches)
    decoding = fit(config, train_batches=decoding_batches)
    # The same device on both sides: fit() takes select_device()'s, the Ray worker a GPU if there is one.
    gpus = 1.0 if select_device().type == "cuda" else 0.0
    name = f"t{config.num_threads}"
    options = RunOptions(
        data=uri, storage=str(workdir / "ray_runs"), name=name, workers=1, gpus_per_worker=gpus
    )
    try:
        result = run_training(config, options)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    local_ips, ray_ips = _steady(local.history), _steady(result.history)
    decoding_ips = _steady(decoding.history)
    return {
        "ratios": {
            "within_epoch": ratio(_steady(result.history, True), _steady(local.history, True)),
            "": ratio(ray_ips, local_ips),
            "decoding": ratio(ray_ips, decoding_ips),
        },
        "details": {
            "ray_images_per_s": ray_ips,
            "in_process_images_per_s": local_ips,
            "in_process_decoding_images_per_s": decoding_ips,
            "ray_images_per_s_after_first_batch": _steady(result.history, after_first_batch=True),
            "ray_first_batch_wait_s": [h["train_first_batch_s"] for h in result.history[1:]],
        },
    }


def run(
    workdir: Path, subjects: int, slices: int, size: int, batch: int, epochs: int, threads: int
) -> dict[str, Any]:
    """Ratios at torch threads = ``threads`` - 1 on a CPU (a core left to the loader, the filed target)
    and at ``threads`` (``..._all_cores``: the step and Ray Data's decoding share every core)."""
    import torch

    # Same threads on both sides: a Ray worker's torch otherwise takes OMP_NUM_THREADS from its CPU share
    # (1 thread at 0.5 CPU), while this process has torch's default.
    threads = threads or torch.get_num_threads()
    uri = str(workdir / "ray_train_ds")
    prepare_dataset("phantom", uri, num_subjects=subjects, slices_per_subject=slices, size=size)
    arrays = table_to_arrays(open_dataset(uri).read_table(split="train"), 1, size)
    rows = open_dataset(uri).read_table(split="train").select(["image", "label"]).to_pydict()  # PNG bytes
    # On a CPU the step and the loader share the cores: with every core in torch, Ray Data's decoding
    # (which the in-process side did before the clock started) takes time from the step. A GPU run
    # leaves the CPUs to the loader; a CPU run that leaves it one core measures what Ray itself costs.
    cpu = select_device().type == "cpu"
    settings = {"": max(1, threads - 1) if cpu else threads}
    if cpu and threads > 1:
        settings["_all_cores"] = threads
    ratios: dict[str, float | None] = {}
    details: dict[str, Any] = {
        "train_rows": len(arrays["label"]),
        "input": size,
        "batch": batch,
        "epochs": epochs,
    }
    # A short private temp dir: Ray's socket paths must stay under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ.setdefault("RAY_TMPDIR", ray_tmp)
    for suffix, count in settings.items():
        config = TrainConfig(
            backbone="tiny", image_size=size, epochs=epochs, batch_size=batch, num_threads=count, amp="off"
        )
        out = _compare(workdir, uri, config, arrays, rows)
        for key, value in out["ratios"].items():
            ratios["ray_over_in_process" + (f"_{key}" if key else "") + suffix] = value
        details[f"threads{suffix or '_target'}"] = {"torch_threads_each_side": count, **out["details"]}
    details["device"] = str(select_device())
    return {"ratios": ratios, "targets": {"ray_over_in_process": ">= 0.95"}, "details": details}
