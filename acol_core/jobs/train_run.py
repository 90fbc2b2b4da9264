"""The Ray Train run: the core's train loop on N workers, data streamed from Parquet by Ray Data.

One machine::

    acol train --data runs/demo/data --model acol --backbone tiny --storage runs/train --workers 2

A cluster (the head's address in RAY_ADDRESS, storage on S3)::

    ray job submit --working-dir . -- acol train --data s3://bucket/mri --model acol --backbone vgg16 \
        --delta 0.6 --storage s3://bucket/runs --workers 8 --gpus-per-worker 1
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acol_core.config import TrainConfig

__all__ = ["RunOptions", "TrainRunResult", "build_datasets", "run_training", "train_loop_per_worker"]

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
_COLUMNS = ["image_id", "image", "label", "mask", "anatomy_mask", "fullsup", "split"]


@dataclass
class RunOptions:
    """Where and how a training run executes (everything but the model/optimiser config)."""

    data: str
    storage: str
    name: str = "acol-train"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    max_failures: int = 0
    keep_checkpoints: int = 2
    score_metric: str = "val_pxap"
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainRunResult:
    run_uri: str
    checkpoint_uri: str | None
    model_uri: str | None
    metrics: dict[str, Any]


def _decode(batch: dict[str, np.ndarray], in_channels: int, size: int, augment: bool, with_masks: bool) -> dict:
    from acol_core.data.transforms import augment_batch, decode_rows

    out = decode_rows(batch, in_channels, size, with_masks=with_masks)
    if augment:
        out = augment_batch(out, np.random.default_rng())
    return out


def build_datasets(data_uri: str, config: TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """Lazy Ray Datasets for ``train`` (decoded + augmented per epoch) and ``val`` (decoded, with masks)."""
    import pyarrow.dataset as pads
    import ray.data

    from acol_core.data.shards import open_dataset

    dataset = open_dataset(data_uri)
    fs = dataset.filesystem
    paths = dataset.shard_paths()
    datasets = {}
    for split, augment in (("train", config.augment), ("val", False)):
        if not dataset.manifest.split_counts.get(split):
            continue
        ds = ray.data.read_parquet(
            paths, filesystem=fs, columns=_COLUMNS, filter=pads.field("split") == split, shuffle=None
        )
        datasets[split] = ds.map_batches(
            _decode,
            fn_kwargs={
                "in_channels": config.in_channels, "size": config.image_size, "augment": augment,
                "with_masks": split != "train",
            },
            batch_format="numpy",
            batch_size=64,
        )
    return datasets, list(dataset.class_names)


def _restore_state() -> dict | None:
    import ray.train

    from acol_core.train import load_checkpoint_bytes

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint_bytes((Path(folder) / STATE_FILE).read_bytes())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: wires Ray's data shards, DDP and reporting into ``fit``."""
    import ray.train
    import ray.train.torch
    import torch

    from acol_core.export import export_bytes
    from acol_core.train import checkpoint_bytes, fit

    config = TrainConfig.from_dict(loop_config["train"])
    class_names: list[str] = loop_config["class_names"]
    rank = ray.train.get_context().get_world_rank()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config.get("has_val") else None

    def train_batches(epoch: int) -> Iterable[dict]:
        return train_shard.iter_batches(
            batch_size=config.batch_size, batch_format="numpy",
            local_shuffle_buffer_size=4 * config.batch_size, local_shuffle_seed=config.seed * 1000 + epoch,
        )

    val_batches: Callable[[], Iterable[dict]] | None = None
    if val_shard is not None and rank == 0:
        def val_batches() -> Iterable[dict]:
            return val_shard.iter_batches(batch_size=64, batch_format="numpy")

    def report(epoch: int, metrics: dict[str, float], state: Callable[[], dict]) -> None:
        due = (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs
        if rank != 0 or not due:
            ray.train.report(metrics, checkpoint=None)
            return
        snapshot = state()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / STATE_FILE).write_bytes(checkpoint_bytes(snapshot))
            blob = export_bytes(_StateModule(snapshot["model"]), config, class_names, epoch=epoch)
            (Path(folder) / MODEL_FILE).write_bytes(blob)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    fit(
        config,
        train_batches=train_batches,
        val_batches=val_batches,
        hooks=[report],
        resume=_restore_state(),
        device=ray.train.torch.get_device(),
        prepare=ray.train.torch.prepare_model,
    )


class _StateModule:
    """Just enough of an nn.Module for ``export_bytes``: a state dict."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _ray_init() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # Local run: no dashboard, so `make demo` and tests need no free ports beyond Ray's own.
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)


def run_training(config: TrainConfig, options: RunOptions) -> TrainRunResult:
    """Run (or resume, same name + storage) one TorchTrainer; returns where the results are."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from acol_core.storage import join, resolve

    _ray_init()
    datasets, class_names = build_datasets(options.data, config)
    if "train" not in datasets:
        raise ValueError(f"{options.data}: the dataset has no 'train' rows")
    if len(class_names) != config.num_classes:
        config = config.replace(num_classes=len(class_names))
    fs, storage_path = resolve(options.storage)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    has_val = "val" in datasets
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=options.keep_checkpoints,
        checkpoint_score_attribute=options.score_metric if has_val else None,
        checkpoint_score_order="max",
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config.to_dict(), "class_names": class_names, "has_val": has_val},
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=options.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=checkpoint_config,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    best = None
    if result.best_checkpoints:
        best = result.best_checkpoints[-1][0] if not has_val else max(
            result.best_checkpoints, key=lambda cm: cm[1].get(options.score_metric, float("-inf"))
        )[0]
    run_uri = join(options.storage, options.name)
    checkpoint_uri = _checkpoint_uri(options.storage, storage_path, best.path) if best else None
    return TrainRunResult(
        run_uri=run_uri,
        checkpoint_uri=checkpoint_uri,
        model_uri=join(checkpoint_uri, MODEL_FILE) if checkpoint_uri else None,
        metrics=dict(result.metrics or {}),
    )


def _checkpoint_uri(storage_uri: str, storage_path: str, checkpoint_path: str) -> str:
    """Map the checkpoint's filesystem path back onto the user's storage URI."""
    from acol_core.storage import join

    relative = os.path.relpath(checkpoint_path, storage_path)
    return join(storage_uri, *Path(relative).parts)
