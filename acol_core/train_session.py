"""One training run on N workers, decided without Ray: its options, the checks before any worker starts,
the config fitted to the dataset, what every worker is sent, each worker's epoch schedule, and the result.

``acol_core.jobs.train_run.run_training`` runs it on Ray Train; everything here is plain Python over the
dataset's manifest and storage URIs, so it imports and is tested without Ray.

Examples:
    >>> plan = plan_run(TrainConfig(model="acol", backbone="tiny"), RunOptions(data="d", storage="s"))  # doctest: +SKIP
    >>> plan.loop_config(has_val=True)["score_metric"]  # doctest: +SKIP
    'val_pxap'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acol_core.balance import ClassBalance
from acol_core.config import ConfigError, TrainConfig

__all__ = [
    "VAL_CACHE_BYTES",
    "RunOptions",
    "RunPlan",
    "TrainRunResult",
    "check_run_inputs",
    "check_run_name",
    "checkpoint_due",
    "fit_config_to_dataset",
    "plan_run",
    "read_train_class_counts",
    "shuffle_buffer_rows",
    "shuffle_seed",
    "summarize_run",
    "val_fits_in_memory",
]

# Rank 0 reads the decoded val rows once, before training, when they fit in this: a Ray Data execution
# per epoch cost ~3 s of start-up for the demo's 120 val rows (a third of a tiny-backbone epoch).
VAL_CACHE_BYTES = 256 * 2**20
_SHUFFLE_ROWS = 512  # rows in each worker's local shuffle buffer (at least)
_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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


@dataclass(frozen=True)
class RunPlan:
    """What a run trains, decided in the driver before any worker starts."""

    config: TrainConfig  # fitted to the dataset: class count, input channels, class balance
    class_names: list[str]
    balance: ClassBalance
    score_metric: str  # the selection rule's localisation metric
    val_rows: int

    def loop_config(self, has_val: bool) -> dict[str, Any]:
        """The plain dict every worker is sent (Ray Train's ``train_loop_config``)."""
        return {
            "train": self.config.to_dict(),
            "class_names": list(self.class_names),
            "has_val": has_val,
            "val_rows": self.val_rows,
            "score_metric": self.score_metric,
            "class_balance": self.balance.to_dict(),
        }


# --------------------------------------------------------------------------- the driver, before Ray


def check_run_name(name: str, what: str = "run") -> str:
    """``name`` if it is a plain folder name (it becomes ``<storage>/<name>``: no '/', not '..'), else raise."""
    if not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
        raise ConfigError(f"{what} name must be a plain folder name (no '/', not '..'), got {name!r}")
    return name


def check_run_inputs(config: TrainConfig, options: RunOptions) -> None:
    """Fail in the driver with one clear line, before Ray starts workers that would fail obscurely."""
    from acol_core.models import list_models
    from acol_core.storage import check_reachable

    if options.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {options.workers}")
    if options.cpus_per_worker <= 0 or options.gpus_per_worker < 0:
        raise ConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
    if config.model not in list_models():
        raise ConfigError(f"unknown model {config.model!r} (known: {', '.join(list_models())})")
    if options.placement_strategy not in _PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {options.placement_strategy!r}"
        )
    # The name is a folder under the storage: one plain path component, so a run stays inside it.
    check_run_name(options.name)
    check_reachable(options.storage)
    if config.pretrained:
        from acol_core.models.pretrained import check_pretrained

        check_pretrained(config.pretrained)


def read_train_class_counts(data_uri: str, manifest: Any) -> list[int]:
    """Train rows per class: the manifest's counts, else (an older manifest) the train labels, read once."""
    from acol_core.balance import train_class_counts
    from acol_core.data.shards import open_dataset

    counts = train_class_counts(manifest.counts.get("split_class", {}), manifest.class_names)
    if sum(counts) == manifest.split_counts.get("train", 0):
        return counts
    labels = open_dataset(data_uri, verify=False).read_table("train", columns=["label"])["label"]
    values = np.asarray(labels.to_numpy(zero_copy_only=False))
    return [int((values == k).sum()) for k in range(len(manifest.class_names))]


def fit_config_to_dataset(
    config: TrainConfig, data_uri: str, manifest: Any
) -> tuple[TrainConfig, ClassBalance]:
    """``config`` with the dataset's class count and channels, and its class balance resolved."""
    from acol_core.balance import apply_class_balance

    if not manifest.split_counts.get("train"):
        raise ValueError(f"{data_uri}: the dataset has no 'train' rows")
    if len(manifest.class_names) != config.num_classes:
        config = config.replace(
            num_classes=len(manifest.class_names), class_weights=None, sampling_factors=None
        )
    if config.in_channels is None:
        # Datasets prepared before the manifest recorded channels: 1 (images are then averaged).
        config = config.replace(in_channels=int(manifest.preparation.get("channels", 1)))
    return apply_class_balance(config, read_train_class_counts(data_uri, manifest))


def plan_run(config: TrainConfig, options: RunOptions) -> RunPlan:
    """Check the inputs and fit ``config`` to the dataset at ``options.data`` (reads its manifest)."""
    from acol_core.data.shards import read_manifest
    from acol_core.selection import BALANCED_ACCURACY

    check_run_inputs(config, options)
    manifest = read_manifest(options.data)
    config, balance = fit_config_to_dataset(config, options.data, manifest)
    score = options.score_metric or ("val_pxap" if manifest.counts.get("fullsup") else BALANCED_ACCURACY)
    return RunPlan(config, list(manifest.class_names), balance, score, manifest.split_counts.get("val", 0))


# --------------------------------------------------------------------------- each worker's epochs


def shuffle_buffer_rows(config: TrainConfig) -> int:
    """Rows in a worker's local shuffle buffer. Shards hold rows in subject order: a window of a few
    batches gave batches of a few subjects each, and the phantom's models learned far more slowly than
    with a full shuffle in-process."""
    return max(4 * config.batch_size, _SHUFFLE_ROWS)


def shuffle_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    """A worker's local shuffle seed: by epoch (not by how often its worker group iterated), so that a
    resumed epoch sees the order the uninterrupted run would have seen."""
    return config.seed * 1000 + epoch * 10 + rank


def val_fits_in_memory(config: TrainConfig, val_rows: int) -> bool:
    """Whether rank 0 holds the decoded val rows in memory (``VAL_CACHE_BYTES``) instead of streaming
    them every epoch."""
    size = config.image_size
    row_bytes = config.channels * size * size * 4 + 2 * size * size + 16
    return val_rows * row_bytes <= VAL_CACHE_BYTES


def checkpoint_due(config: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` writes a checkpoint: every ``checkpoint_every`` epochs, and the last."""
    return (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs


# --------------------------------------------------------------------------- the result


def summarize_run(
    options: RunOptions,
    score_metric: str,
    history: list[dict[str, float]],
    kept: list[tuple[str | None, Mapping[str, Any]]],
    latest_path: str | None,
    class_balance: ClassBalance,
) -> TrainRunResult:
    """The result of a finished run: the checkpoint the selection rule keeps among ``kept``.

    Args:
        history: every epoch's metrics, from the latest checkpoint.
        kept: ``(path, reported metrics)`` of each checkpoint still on storage; paths (and
            ``latest_path``) in the storage's filesystem, as Ray reports them.
    """
    from acol_core.export import MODEL_FILE
    from acol_core.selection import select_epoch
    from acol_core.storage import join, uri_for_path

    by_epoch = {int(m.get("epoch", -1)): (path, m) for path, m in kept}
    selection = select_epoch(history, metric=score_metric, available=by_epoch)
    best, best_metrics = (
        by_epoch.get(selection.epoch, (None, {})) if selection.epoch is not None else (None, {})
    )
    best_uri = uri_for_path(options.storage, best)
    return TrainRunResult(
        run_uri=join(options.storage, options.name),
        checkpoint_uri=best_uri,
        model_uri=join(best_uri, MODEL_FILE) if best_uri else None,
        latest_checkpoint_uri=uri_for_path(options.storage, latest_path),
        metrics=dict(best_metrics),
        history=history,
        selection=selection.to_dict(),
        class_balance=class_balance.to_dict(),
    )
