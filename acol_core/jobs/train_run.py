"""The Ray Train run: the core's train loop on N workers, data streamed from Parquet by Ray Data.

One machine (starts a local Ray in this process)::

    acol train --data runs/demo/data --model acol --backbone tiny --storage runs/train --workers 2

A cluster (``ray job submit`` sets RAY_ADDRESS for the entrypoint; storage on S3)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol train --data s3://bucket/mri \
        --model acol --backbone vgg16 --delta 0.6 --storage s3://bucket/runs --workers 8 --gpus-per-worker 1

Every epoch each worker streams its share of the ``train`` rows (``get_dataset_shard("train")``,
decoded and augmented in Ray Data ``map_batches`` tasks, locally shuffled with a per-epoch seed);
rank 0 scores the ``val`` rows and reports a checkpoint: ``state.pt`` (model, optimiser, scheduler,
epoch: what resuming needs), ``model.safetensors`` (the self-describing export ``localize`` loads) and
``history.json`` (the metrics of every epoch so far). A run with the same name and storage resumes
from its latest checkpoint; ``max_failures`` restarts the worker group after a worker dies.

Training is class-balanced when the train split is imbalanced (``acol_core.balance``: minority rows
repeated in the train stream, or loss weights; the decision is in the result and the export's metadata), and the checkpoint kept as best is the one
``acol_core.selection.select_epoch`` picks: the best val localisation among the epochs that classify
(val balanced accuracy) within a margin of the best, or the last epoch when val is too small.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acol_core.config import ConfigError, TrainConfig
from acol_core.errors import RunFailure, UserError, one_line
from acol_core.export import MODEL_FILE
from acol_core.faults import fault_env, injected_fault
from acol_core.jobs import parquet_reader_v1, ray_init

__all__ = [
    "HISTORY_FILE",
    "MODEL_FILE",
    "RETENTION_METRIC",
    "STATE_FILE",
    "CheckpointError",
    "RunOptions",
    "TrainRunResult",
    "TrainingError",
    "build_datasets",
    "load_checkpoint_state",
    "read_checkpoint_epochs",
    "run_training",
    "train_loop_per_worker",
]

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
# Ray keeps checkpoints ranked by this reported number (selection.retention_score), not by a raw metric.
RETENTION_METRIC = "retention_score"
_COLUMNS = ["image", "label", "mask", "anatomy_mask", "fullsup"]
_VAL_BATCH = 64
_FAULT_DELAY_S = 3.0
_SHUFFLE_ROWS = 512  # rows in each worker's local shuffle buffer (at least)
# Rank 0 reads the decoded val rows once, before training, when they fit in this: a Ray Data execution
# per epoch cost ~3 s of start-up for the demo's 120 val rows (a third of a tiny-backbone epoch).
VAL_CACHE_BYTES = 256 * 2**20
_CHECKPOINT_DIR = re.compile(r"^checkpoint_\d")  # Ray Train's names: checkpoint_<timestamp>


class CheckpointError(UserError, ValueError):
    """A ``state.pt`` this code did not write (a pickle with objects in it) or a damaged one."""


class TrainingError(RunFailure, RuntimeError):
    """The Ray Train run failed after its restarts (a worker kept dying, storage went away, ...).

    The run's registered checkpoints stay where they are: the same command resumes from the latest.
    """


@dataclass
class RunOptions:
    """Where and how a training run executes (everything but the model/optimiser config).

    Args:
        keep_checkpoints: how many checkpoints to keep, the selection rule's latest choices (the
            latest checkpoint is always kept too, for resuming); None keeps all.
        score_metric: the localisation metric of the selection rule (``acol_core.selection``); None:
            ``val_pxap`` when the dataset has ``fullsup`` rows, else ``val_balanced_accuracy``.
        deterministic: the same rows in the same order on the same worker every run (Ray Data keeps
            block order; costs some throughput). With ``augment=False`` two runs with one seed then give
            the same weights, resumed or not.
        placement_strategy: Ray's placement-group strategy for the workers (see the field).
        extra_env: environment variables for the train workers (on a cluster whose nodes lack them).
        callbacks: Ray Train ``UserCallback``s, passed to ``RunConfig(callbacks=...)`` (the sweep's trial
            reporter is one; Train V2 takes user callbacks only there).
        progress: called in this process with each epoch's metrics (plus ``epochs``, the plan) as rank 0
            reports them, e.g. ``acol_core.console.EpochProgress``.
    """

    data: str
    storage: str
    name: str = "acol-train"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    max_failures: int = 1
    keep_checkpoints: int | None = 2
    score_metric: str | None = None
    deterministic: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    progress: Callable[[dict[str, Any]], None] | None = None
    # How Ray places the workers' bundles: PACK (default), SPREAD (over nodes, best effort: a run that
    # lost a node restarts on the rest) or STRICT_SPREAD (one worker per node).
    placement_strategy: str = "PACK"


@dataclass
class TrainRunResult:
    """Where a finished run's outputs are (URIs on the run's storage) and its metrics."""

    run_uri: str
    checkpoint_uri: str | None  # the checkpoint the selection rule keeps
    model_uri: str | None  # model.safetensors inside it
    latest_checkpoint_uri: str | None
    metrics: dict[str, Any]  # the kept checkpoint's metrics
    history: list[dict[str, float]]  # every epoch's metrics, from the latest checkpoint
    selection: dict[str, Any] = field(default_factory=dict)  # selection.Selection.to_dict()
    class_balance: dict[str, Any] = field(default_factory=dict)  # balance.ClassBalance.to_dict()


# --------------------------------------------------------------------------- data


def _decode(
    batch: dict[str, np.ndarray],
    in_channels: int,
    size: int,
    augment: bool,
    with_masks: bool,
    intensity: float = 0.0,
    norm: str = "phantom",
) -> dict:
    from acol_core.data.transforms import augment_batch, decode_rows

    out = decode_rows(batch, in_channels, size, with_masks=with_masks, norm=norm)
    if augment:
        # Unseeded on purpose: each epoch re-runs this task, so each epoch sees new augmentations.
        out = augment_batch(out, np.random.default_rng(), intensity=intensity, norm=norm)
    return out


def _repeat_rows(batch: dict[str, np.ndarray], factors: list[float]) -> dict[str, np.ndarray]:
    """Each row as many times as its class's sampling factor (``balance.repeat_counts``), before
    decoding, so that every copy is decoded and augmented on its own."""
    from acol_core.balance import repeat_counts

    # Unseeded on purpose, like the augmentation: each epoch re-runs this task and draws anew.
    counts = repeat_counts(batch["label"], factors, np.random.default_rng())
    index = np.repeat(np.arange(len(counts)), counts)
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def build_datasets(data_uri: str, config: TrainConfig, deterministic: bool = False) -> dict[str, Any]:
    """Lazy Ray Datasets: ``train`` (decoded, augmented) and ``val`` (decoded, with masks), if present.

    The split is selected with a predicate expression (``Dataset.filter(expr=...)``): Ray 2.60 refuses
    ``read_parquet(filter=...)`` and pushes this expression down to the Parquet scan instead.
    Without ``deterministic`` the shard files are read in a new random order every epoch. With
    ``config.sampling_factors`` (class_balance sampler) the train rows are repeated by class before they
    are decoded; the workers' local shuffle then spreads the copies over the epoch.
    """
    import ray.data
    from ray.data.expressions import col, lit

    from acol_core.data.shards import open_dataset

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
                _repeat_rows,
                fn_kwargs={"factors": list(config.sampling_factors)},
                batch_format="numpy",
                batch_size=_VAL_BATCH,
            )
        datasets[split] = ds.map_batches(
            _decode,
            fn_kwargs={
                "in_channels": config.channels,
                "size": config.image_size,
                "augment": augment,
                "with_masks": split != "train",
                "intensity": config.intensity_augment,
                "norm": config.effective_input_norm,
            },
            batch_format="numpy",
            batch_size=_VAL_BATCH,
        )
    return datasets


# --------------------------------------------------------------------------- the worker


def load_checkpoint_state(data: bytes, where: str) -> dict:
    """A ``state.pt``'s contents: tensors and plain values only, never unpickled objects.

    Raises:
        CheckpointError: one line naming ``where``, for a foreign pickle or a damaged file.
    """
    import pickle

    from acol_core.train import load_checkpoint_bytes

    try:
        return load_checkpoint_bytes(data)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{where}: not a checkpoint this code wrote, or damaged ({type(exc).__name__}: {reason})"
        ) from exc


def _restore() -> tuple[dict | None, list[dict[str, float]]]:
    """The latest checkpoint's state and metric history (a restarted or resumed run), else (None, [])."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as folder:
        where = f"{checkpoint.path}/{STATE_FILE}"
        state = load_checkpoint_state((Path(folder) / STATE_FILE).read_bytes(), where)
        history_path = Path(folder) / HISTORY_FILE
        history = json.loads(history_path.read_text()) if history_path.exists() else []
    return state, history


def _inject_fault(batches: Iterable[dict], fault: dict[str, Any]) -> Iterator[dict]:
    """TEST ONLY (``acol_core.faults``): die by SIGKILL (no cleanup, like an OOM kill) after
    ``after_batches`` batches, once."""
    marker = Path(fault["marker"])
    for index, batch in enumerate(batches):
        if index == int(fault["after_batches"]) and not marker.exists():
            marker.touch()  # first: the restarted attempt must run through
            # A crash mid-epoch, not at its start: Train V2's controller collects reports by polling,
            # and a worker killed within a moment of its last report (an epoch start with no wait
            # for data) can take that report with it; the run then redoes the epoch.
            time.sleep(_FAULT_DELAY_S)
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def _write_checkpoint(
    folder: Path,
    state: dict,
    config: TrainConfig,
    class_names: list[str],
    history: list[dict[str, float]],
    class_balance: dict[str, Any] | None = None,
) -> None:
    from acol_core.export import export_bytes
    from acol_core.train import checkpoint_bytes

    (folder / STATE_FILE).write_bytes(checkpoint_bytes(state))
    model_bytes = export_bytes(
        _StateModule(state["model"]),
        config,
        class_names,
        epoch=int(state["epoch"]),
        class_balance=class_balance or {},
    )
    (folder / MODEL_FILE).write_bytes(model_bytes)
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))


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
            # Shards hold rows in subject order: a window of a few batches gave batches of a few subjects
            # each, and the phantom's models learned far more slowly than with a full shuffle in-process.
            local_shuffle_buffer_size=max(4 * config.batch_size, _SHUFFLE_ROWS),
            # Seeded by epoch (not by how often this worker group iterated): a resumed epoch sees the
            # order the uninterrupted run would have seen.
            local_shuffle_seed=config.seed * 1000 + epoch * 10 + rank,
        )

    has_val = bool(loop_config.get("has_val"))
    size = config.image_size
    row_bytes = config.channels * size * size * 4 + 2 * size * size + 16
    val_cached = has_val and loop_config.get("val_rows", 0) * row_bytes <= VAL_CACHE_BYTES
    # Each epoch's Ray Data execution starts while the previous epoch validates and checkpoints, unless
    # validation itself reads through Ray Data: two executions at once (the val read and the next
    # epoch's stream) stalled each other for ~25 s on 2 CPUs.
    prefetch = EpochPrefetcher(shard_batches, config.epochs) if val_cached or not has_val else None
    source = prefetch or shard_batches

    def train_batches(epoch: int) -> Iterable[dict]:
        batches = source(epoch)
        if fault and fault["rank"] == rank and fault["epoch"] == epoch:
            return _inject_fault(batches, fault)
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
        due = (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs
        if rank != 0 or not due:
            ray.train.report(metrics, checkpoint=None)
            return
        metrics = {**metrics, RETENTION_METRIC: retention_score(history, loop_config["score_metric"])}
        with tempfile.TemporaryDirectory() as folder:
            _write_checkpoint(
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


class _StateModule:
    """Just enough of an nn.Module for ``export_bytes``: a state dict."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


# --------------------------------------------------------------------------- the driver


def _worker_env(extra_env: dict[str, str]) -> dict[str, Any] | None:
    """The workers' runtime env: ``extra_env``, and a test's ``ACOL_TEST_FAULT`` (``acol_core.faults``)."""
    env = {**extra_env, **fault_env()}
    return {"env_vars": env} if env else None


def check_run_name(name: str, what: str = "run") -> str:
    """``name`` if it is a plain folder name (it becomes ``<storage>/<name>``: no '/', not '..'), else raise."""
    if not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
        raise ConfigError(f"{what} name must be a plain folder name (no '/', not '..'), got {name!r}")
    return name


def _check_inputs(config: TrainConfig, options: RunOptions) -> None:
    """Fail in the driver with one clear line, before Ray starts workers that would fail obscurely."""
    from acol_core.models import list_models
    from acol_core.storage import check_reachable

    if options.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {options.workers}")
    if options.cpus_per_worker <= 0 or options.gpus_per_worker < 0:
        raise ConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
    if config.model not in list_models():
        raise ConfigError(f"unknown model {config.model!r} (known: {', '.join(list_models())})")
    if options.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(
            f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {options.placement_strategy!r}"
        )
    # The name is a folder under the storage: one plain path component, so a run stays inside it.
    check_run_name(options.name)
    check_reachable(options.storage)
    if config.pretrained:
        from acol_core.models.pretrained import check_pretrained

        check_pretrained(config.pretrained)


def run_training(config: TrainConfig, options: RunOptions) -> TrainRunResult:
    """Run (or resume: same name + storage) one TorchTrainer; returns where the results are."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from acol_core.balance import apply_class_balance
    from acol_core.data.shards import read_manifest
    from acol_core.selection import BALANCED_ACCURACY
    from acol_core.storage import resolve

    _check_inputs(config, options)
    manifest = read_manifest(options.data)
    if not manifest.split_counts.get("train"):
        raise ValueError(f"{options.data}: the dataset has no 'train' rows")
    if len(manifest.class_names) != config.num_classes:
        config = config.replace(
            num_classes=len(manifest.class_names), class_weights=None, sampling_factors=None
        )
    if config.in_channels is None:
        # Datasets prepared before the manifest recorded channels: 1 (images are then averaged).
        config = config.replace(in_channels=int(manifest.preparation.get("channels", 1)))
    config, balance = apply_class_balance(config, _train_class_counts(options.data, manifest))
    ray_init()
    datasets = build_datasets(options.data, config, options.deterministic)
    has_val = "val" in datasets
    score = options.score_metric or ("val_pxap" if manifest.counts.get("fullsup") else BALANCED_ACCURACY)
    fs, storage_path = resolve(options.storage)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker} | ({"GPU": options.gpus_per_worker} if use_gpu else {})
    execution = ray.data.ExecutionOptions(preserve_order=options.deterministic)
    loop_config = {
        "train": config.to_dict(),
        "class_names": list(manifest.class_names),
        "has_val": has_val,
        "val_rows": manifest.split_counts.get("val", 0),
        "score_metric": score,
        "class_balance": balance.to_dict(),
    }
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
    summary = _summarize(result, options, score)
    summary.class_balance = balance.to_dict()
    return summary


def _summarize(result: Any, options: RunOptions, score: str) -> TrainRunResult:
    from acol_core.selection import select_epoch
    from acol_core.storage import join, uri_for_path

    def uri(checkpoint: Any) -> str | None:
        return uri_for_path(options.storage, checkpoint.path) if checkpoint else None

    history: list[dict[str, float]] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            path = Path(folder) / HISTORY_FILE
            history = json.loads(path.read_text()) if path.exists() else []
    kept = {int(m.get("epoch", -1)): (c, m) for c, m in (result.best_checkpoints or [])}
    selection = select_epoch(history, metric=score, available=kept)
    best, best_metrics = kept.get(selection.epoch, (None, {})) if selection.epoch is not None else (None, {})
    best_uri = uri(best)
    return TrainRunResult(
        run_uri=join(options.storage, options.name),
        checkpoint_uri=best_uri,
        model_uri=join(best_uri, MODEL_FILE) if best_uri else None,
        latest_checkpoint_uri=uri(result.checkpoint),
        metrics=dict(best_metrics),
        history=history,
        selection=selection.to_dict(),
    )


def _train_class_counts(data_uri: str, manifest: Any) -> list[int]:
    """Train rows per class: the manifest's counts, else (an older manifest) the train labels, read once."""
    from acol_core.balance import train_class_counts
    from acol_core.data.shards import open_dataset

    counts = train_class_counts(manifest.counts.get("split_class", {}), manifest.class_names)
    if sum(counts) == manifest.split_counts.get("train", 0):
        return counts
    labels = open_dataset(data_uri, verify=False).read_table("train", columns=["label"])["label"]
    values = np.asarray(labels.to_numpy(zero_copy_only=False))
    return [int((values == k).sum()) for k in range(len(manifest.class_names))]


def read_checkpoint_epochs(run_uri: str) -> dict[str, int]:
    """``{checkpoint folder name: epoch}`` for the complete checkpoints under a run (from ``state.pt``).

    A folder without all of a checkpoint's files (an upload cut short by a storage outage or a killed
    driver; Ray never registered it) is skipped: it is not a checkpoint to resume from. Ray resumes from
    what its ``checkpoint_manager_snapshot.json`` registered, which a folder's presence does not prove:
    the workers of a killed driver may finish an upload nobody registers.
    """
    from acol_core.storage import join, list_dir, read_bytes

    epochs = {}
    for name in list_dir(run_uri):
        folder = join(run_uri, name)
        if _CHECKPOINT_DIR.match(name) and {STATE_FILE, MODEL_FILE, HISTORY_FILE} <= set(list_dir(folder)):
            state_uri = join(folder, STATE_FILE)
            epochs[name] = int(load_checkpoint_state(read_bytes(state_uri), state_uri)["epoch"])
    return epochs
