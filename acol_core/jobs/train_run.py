"""The Ray Train run: the core's train loop on N workers, data streamed from Parquet by Ray Data.

One machine (starts a local Ray in this process)::

    acol train --data runs/demo/data --model acol --backbone tiny --storage runs/train --workers 2

A cluster (``ray job submit`` sets RAY_ADDRESS for the entrypoint; storage on S3)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol train --data s3://bucket/mri \
        --model acol --backbone vgg16 --delta 0.6 --storage s3://bucket/runs --workers 8 --gpus-per-worker 1

Every epoch each worker streams its share of the ``train`` rows (``get_dataset_shard("train")``,
decoded and augmented in Ray Data ``map_batches`` tasks, locally shuffled with a per-epoch seed);
rank 0 scores the ``val`` rows and reports a checkpoint (``acol_core.checkpoints``: ``state.pt``,
``model.safetensors``, ``history.json``). A run with the same name and storage resumes from its latest
checkpoint; ``max_failures`` restarts the worker group after a worker dies. What the run trains and
returns is decided without Ray (``acol_core.train_session``); this module is the Ray wiring.

Training is class-balanced when the train split is imbalanced (``acol_core.balance``: minority rows
repeated in the train stream, or loss weights; the decision is in the result and the export's metadata), and the checkpoint kept as best is the one
``acol_core.selection.select_epoch`` picks: the best val localisation among the epochs that classify
(val balanced accuracy) within a margin of the best, or the last epoch when val is too small.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from acol_core.checkpoints import read_checkpoint, read_history, write_checkpoint
from acol_core.config import TrainConfig
from acol_core.errors import RunFailure, one_line
from acol_core.faults import fault_env, injected_fault, kill_after_batches
from acol_core.jobs import parquet_reader_v1, ray_init
from acol_core.train_session import (
    RunOptions,
    TrainRunResult,
    checkpoint_due,
    plan_run,
    shuffle_buffer_rows,
    shuffle_seed,
    summarize_run,
    val_fits_in_memory,
)

__all__ = [
    "RETENTION_METRIC",
    "TrainingError",
    "build_datasets",
    "run_training",
    "train_loop_per_worker",
]

# Ray keeps checkpoints ranked by this reported number (selection.retention_score), not by a raw metric.
RETENTION_METRIC = "retention_score"
_COLUMNS = ["image", "label", "mask", "anatomy_mask", "fullsup"]
_VAL_BATCH = 64


class TrainingError(RunFailure, RuntimeError):
    """The Ray Train run failed after its restarts (a worker kept dying, storage went away, ...).

    The run's registered checkpoints stay where they are: the same command resumes from the latest.
    """


# --------------------------------------------------------------------------- data


def build_datasets(data_uri: str, config: TrainConfig, deterministic: bool = False) -> dict[str, Any]:
    """Lazy Ray Datasets: ``train`` (decoded, augmented) and ``val`` (decoded, with masks), if present.

    The split is selected with a predicate expression (``Dataset.filter(expr=...)``): Ray 2.60 refuses
    ``read_parquet(filter=...)`` and pushes this expression down to the Parquet scan instead.
    Without ``deterministic`` the shard files are read in a new random order every epoch. With
    ``config.sampling_factors`` (class_balance sampler) the train rows are repeated by class before they
    are decoded (``balance.repeat_rows``); the workers' local shuffle then spreads the copies over the epoch.
    """
    import ray.data
    from ray.data.expressions import col, lit

    from acol_core.balance import repeat_rows
    from acol_core.data.shards import open_dataset
    from acol_core.data.transforms import decode_batch

    # The manifest proves the dataset complete; hashing every shard here would read it all twice.
    dataset = open_dataset(data_uri, verify=False)
    counts = dataset.manifest.split_counts
    shuffle = None if deterministic else ray.data.FileShuffleConfig(seed=config.seed)
    datasets = {}
    for split, augment in (("train", config.augment), ("val", False)):
        if not counts.get(split):
            continue
        with parquet_reader_v1():
            ds = ray.data.read_parquet(dataset.shard_paths(), filesystem=dataset.filesystem, shuffle=shuffle)
        ds = ds.filter(expr=col("split") == lit(split)).select_columns(_COLUMNS)
        if split == "train" and config.sampling_factors is not None:
            ds = ds.map_batches(
                repeat_rows,
                fn_kwargs={"factors": list(config.sampling_factors)},
                batch_format="numpy",
                batch_size=_VAL_BATCH,
            )
        datasets[split] = ds.map_batches(
            decode_batch,
            fn_kwargs={
                "in_channels": config.channels,
                "size": config.image_size,
                "augment": augment,
                "with_masks": split != "train",
                "intensity": config.intensity_augment,
                "norm": config.effective_input_norm,
                "harmonize": config.harmonize,
            },
            batch_format="numpy",
            batch_size=_VAL_BATCH,
        )
    return datasets


# --------------------------------------------------------------------------- the worker


def _restore() -> tuple[dict | None, list[dict[str, float]]]:
    """The latest checkpoint's state and metric history (a restarted or resumed run), else (None, [])."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as folder:
        return read_checkpoint(Path(folder), checkpoint.path)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: wires Ray's data shards, DDP and reporting into ``fit``."""
    import ray.train
    import ray.train.torch

    from acol_core.selection import retention_score
    from acol_core.train import EpochPrefetcher, fit

    config = TrainConfig.from_dict(loop_config["train"])
    class_names: list[str] = loop_config["class_names"]
    fault = injected_fault("train")  # TEST ONLY (acol_core.faults)
    progress_queue = loop_config.get("_progress")
    rank = ray.train.get_context().get_world_rank()
    train_shard = ray.train.get_dataset_shard("train")

    def shard_batches(epoch: int) -> Iterable[dict]:
        return train_shard.iter_batches(
            batch_size=config.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer_rows(config),
            local_shuffle_seed=shuffle_seed(config, epoch, rank),
        )

    has_val = bool(loop_config.get("has_val"))
    val_cached = has_val and val_fits_in_memory(config, loop_config.get("val_rows", 0))
    # Each epoch's Ray Data execution starts while the previous epoch validates and checkpoints, unless
    # validation itself reads through Ray Data: two executions at once (the val read and the next
    # epoch's stream) stalled each other for ~25 s on 2 CPUs.
    prefetch = EpochPrefetcher(shard_batches, config.epochs) if val_cached or not has_val else None
    source = prefetch or shard_batches

    def train_batches(epoch: int) -> Iterable[dict]:
        batches = source(epoch)
        if fault and fault["rank"] == rank and fault["epoch"] == epoch:
            return kill_after_batches(batches, fault)
        return batches

    val_batches: Callable[[], Iterable[dict]] | None = None
    if has_val and rank == 0:
        val_shard = ray.train.get_dataset_shard("val")
        if val_cached:
            # Read once, before training (other ranks wait for this one at DDP set-up).
            cache = list(val_shard.iter_batches(batch_size=_VAL_BATCH, batch_format="numpy"))

            def val_batches() -> Iterable[dict]:
                return iter(cache)

        else:

            def val_batches() -> Iterable[dict]:
                return val_shard.iter_batches(batch_size=_VAL_BATCH, batch_format="numpy")

    resume, history = _restore()
    if prefetch is not None and not has_val:
        # The first epoch's stream starts while fit builds the model and DDP connects the workers.
        prefetch.start(0 if resume is None else int(resume["epoch"]) + 1)

    def report(epoch: int, metrics: dict[str, float], state: Callable[[], dict]) -> None:
        # Every rank reports (Train V2 waits for all); only rank 0 carries the checkpoint and its metrics.
        history.append(dict(metrics))
        if progress_queue is not None and rank == 0:
            _publish_progress(progress_queue, {**metrics, "epochs": config.epochs})
        if rank != 0 or not checkpoint_due(config, epoch):
            ray.train.report(metrics, checkpoint=None)
            return
        metrics = {**metrics, RETENTION_METRIC: retention_score(history, loop_config["score_metric"])}
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(
                Path(folder), state(), config, class_names, history, loop_config.get("class_balance")
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    fit(
        config,
        train_batches=train_batches,
        val_batches=val_batches,
        hooks=[report],
        resume=resume,
        device=ray.train.torch.get_device(),
        prepare=ray.train.torch.prepare_model,
    )


def _publish_progress(queue: Any, metrics: dict[str, Any]) -> None:
    """Hand an epoch's metrics to the driver's display; a display that is gone never fails training."""
    try:
        queue.put_nowait(metrics)
    except Exception:  # noqa: BLE001 - a full or dead queue only loses a progress line
        pass


class _ProgressRelay:
    """A Ray queue that rank 0 puts each epoch's metrics on, drained into ``callback`` by a thread of the
    driver while ``fit`` blocks (Train V2 gives the driver nothing before the run ends)."""

    def __init__(self, callback: Callable[[dict], None] | None) -> None:
        self.callback = callback
        self.queue: Any = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if callback is not None:
            from ray.util.queue import Queue

            self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})

    def _drain(self, block: bool) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(block=block, timeout=0.5) if block else self.queue.get_nowait()
            except Empty:
                return
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more to show
                return
            self.callback(item)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._drain(block=True)

    def __enter__(self) -> _ProgressRelay:
        if self.queue is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.queue is None:
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self._drain(block=False)
        self.queue.shutdown(force=True)


# --------------------------------------------------------------------------- the driver


def _worker_env(extra_env: dict[str, str]) -> dict[str, Any] | None:
    """The workers' runtime env: ``extra_env``, and a test's ``ACOL_TEST_FAULT`` (``acol_core.faults``)."""
    env = {**extra_env, **fault_env()}
    return {"env_vars": env} if env else None


def run_training(config: TrainConfig, options: RunOptions) -> TrainRunResult:
    """Run (or resume: same name + storage) one TorchTrainer; returns where the results are."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from acol_core.storage import resolve

    plan = plan_run(config, options)
    ray_init()
    datasets = build_datasets(options.data, plan.config, options.deterministic)
    fs, storage_path = resolve(options.storage)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker} | ({"GPU": options.gpus_per_worker} if use_gpu else {})
    execution = ray.data.ExecutionOptions(preserve_order=options.deterministic)
    loop_config = plan.loop_config(has_val="val" in datasets)
    relay = _ProgressRelay(options.progress)
    if relay.queue is not None:
        loop_config["_progress"] = relay.queue
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=options.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=options.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=options.keep_checkpoints,
                checkpoint_score_attribute=RETENTION_METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            worker_runtime_env=_worker_env(options.extra_env),
            callbacks=list(options.callbacks) or None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=execution),
    )
    try:
        with relay:
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(
            f"run {options.name!r} failed: {one_line(exc)} (its checkpoints are kept under "
            f"{options.storage}: run the same command again to resume)"
        ) from exc
    history: list[dict[str, float]] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            history = read_history(Path(folder))
    kept = [(c.path if c else None, m) for c, m in (result.best_checkpoints or [])]
    latest = result.checkpoint.path if result.checkpoint else None
    return summarize_run(options, plan.score_metric, history, kept, latest, plan.balance)
