"""Batch localization: an exported model over a dataset split, with Ray Data or a plain loop.

One machine (a local Ray starts in this process)::

    acol localize --model runs/train/acol-train/checkpoint_x/model.safetensors --data runs/data \
        --output runs/pred --split test --actors 2

A cluster (``ray job submit`` sets RAY_ADDRESS; each actor takes one GPU when the cluster has GPUs)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol localize \
        --model s3://bucket/runs/model.safetensors --data s3://bucket/mri --output s3://bucket/pred --actors 8

Ray Data reads the dataset's shards (split filtered in the scan), an actor pool holds the model (loaded
once per actor from its URI) and runs ``Localizer`` on batches; ``write_parquet`` writes to a staging
folder inside the output, which ``acol_core.predictions.commit_predictions`` then commits
(``_SUCCESS.json`` last). ``Localizer`` and its plain in-process loop ``localize_plain`` are Ray-free,
in ``acol_core.batch_localize``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from acol_core import storage
from acol_core.batch_localize import (
    INPUT_COLUMNS,
    Localizer,
    model_threshold,
    parse_splits,
    ungated_rows,
)
from acol_core.errors import RunFailure, one_line
from acol_core.export import ExportedInfo, read_export_info
from acol_core.faults import fault_env
from acol_core.gating import check_gate
from acol_core.predictions import (
    PredictionsInfo,
    check_output,
    commit_predictions,
    predictions_to_nifti,
    staging_uri,
    volume_plan,
    watch_staged_rows,
)

__all__ = [
    "ACTOR_RESTARTS",
    "LocalizeError",
    "LocalizeOptions",
    "LocalizeResult",
    "run_localize",
]

ACTOR_RESTARTS = 3  # per actor; a lost batch is retried as often


class LocalizeError(RunFailure, RuntimeError):
    """The Ray Data job failed (actors kept dying, a batch kept failing); nothing was committed."""


@dataclass
class LocalizeResult:
    output: str
    info: PredictionsInfo
    seconds: float
    nifti_files: list[str] = field(default_factory=list)
    gate: str = "none"
    ungated_rows: int = 0  # with gate "anatomy": rows without an anatomy mask, whose maps are not gated

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "rows": self.info.num_rows,
            "files": len(self.info.files),
            "splits": self.info.splits,
            "threshold": self.info.threshold,
            "model": self.info.model,
            "checkpoint": self.info.checkpoint,
            "seconds": round(self.seconds, 2),
            "nifti_files": len(self.nifti_files),
            "gate": self.gate,
            "ungated_rows": self.ungated_rows,
        }


# --------------------------------------------------------------------------- Ray Data job


@dataclass
class _Checked:
    """What the driver verified before any Ray work: the model's identity and the rows to expect."""

    model_uri: str
    info: ExportedInfo
    checksum: str
    threshold: float
    splits: list[str]
    rows: int
    shard_paths: list[str]
    filesystem: Any
    class_names: list[str]
    gate: str = "none"
    ungated_rows: int = 0


def _check(
    model_uri: str,
    data_uri: str,
    output_uri: str,
    split: str | Sequence[str],
    threshold: float | None,
    gate: str = "none",
) -> _Checked:
    """Fail in the driver with one clear line, before Ray starts actors that would fail obscurely."""
    from acol_core.data.shards import DatasetError, open_dataset

    gate = check_gate(gate)
    dataset = open_dataset(data_uri, verify=False)
    splits = parse_splits(split)
    rows = sum(dataset.manifest.split_counts.get(s, 0) for s in splits)
    data = storage.read_bytes(model_uri)
    info = read_export_info(data)
    names = dataset.class_names
    if names and len(names) != info.config.num_classes:
        raise DatasetError(f"dataset has {len(names)} classes, the model {info.config.num_classes}")
    check_output(output_uri, data_uri)
    return _Checked(
        model_uri=storage.absolute(model_uri),
        info=info,
        checksum=hashlib.sha256(data).hexdigest(),
        threshold=model_threshold(info, threshold),
        splits=splits,
        rows=rows,
        shard_paths=dataset.shard_paths(),
        filesystem=dataset.filesystem,
        class_names=list(info.class_names),
        gate=gate,
        ungated_rows=ungated_rows(dataset, splits, gate),
    )


def _gpus_per_actor(requested: float | None) -> float:
    import ray

    if requested is not None:
        return float(requested)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _threads_per_actor(requested: int | None, actors: int, gpus: float) -> int:
    """torch threads in each actor: ``requested``, else 1 with a GPU (the model runs there), else the
    smallest node's CPUs shared among the actors (all of them on one CPU machine with 1 actor).

    An actor's ``num_cpus`` is a scheduling share, not a thread count: at the default 0.5, one thread
    left half of a 2-CPU machine idle (the readers and writers are light: decoding runs in the actor).
    """
    import ray

    if requested is not None:
        return int(requested)
    if gpus > 0:
        return 1
    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(min(cpus, default=1.0)) // actors)


def _build(
    checked: _Checked,
    actors: int,
    batch_size: int,
    gpus: float,
    cpus: float,
    threads: int,
    gt_maps: bool,
) -> Any:
    import ray.data
    from ray.data.expressions import col

    from acol_core.jobs import parquet_reader_v1

    with parquet_reader_v1():
        ds = ray.data.read_parquet(checked.shard_paths, filesystem=checked.filesystem)
    # Ray 2.60 refuses read_parquet(filter=...); an expression filter is pushed down to the scan.
    ds = ds.filter(expr=col("split").is_in(checked.splits)).select_columns(INPUT_COLUMNS)
    return ds.map_batches(
        Localizer,
        fn_constructor_kwargs={
            "model_uri": checked.model_uri,
            "threshold": checked.threshold,
            "expected_sha256": checked.checksum,
            "gt_maps": gt_maps,
            "device": "cuda" if gpus > 0 else "cpu",
            "num_threads": threads,
            "gate": checked.gate,
        },
        # concurrency= is deprecated in Ray 2.60: a fixed-size pool is an ActorPoolStrategy.
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus,
        # Ray Data's default is to restart actors and retry their batches forever: a batch that kills
        # every actor it reaches (a decoder crash, an OOM) would then hang the job instead of failing it.
        # (Passed as remote args, which Ray 2.60 marks deprecated without a named replacement yet.)
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
        # TEST ONLY: a test's ACOL_TEST_FAULT reaches the actors (acol_core.faults); nothing otherwise.
        **({"runtime_env": {"env_vars": fault_env()}} if fault_env() else {}),
    )


@dataclass
class LocalizeOptions:
    """What to localize, where the predictions go, and how the actor pool runs.

    Args:
        model: the ``.safetensors`` export (path or s3://).
        data: dataset URI written by ``acol prepare``.
        output: predictions folder to (re)write (path or s3://).
        split: ``test``, ``val,test`` or ``all``.
        threshold: CAM threshold; None: the export's, else 0.5.
        actors: actor pool size (each holds one model copy).
        gpus_per_actor: None: 1 when the Ray cluster has GPUs, else 0.
        cpus_per_actor: fractional by default: Ray Data's read and write tasks need CPUs too (on a
            2-CPU machine, actors at 1 CPU each leave none to the readers and the run stalls).
        threads_per_actor: torch CPU threads per actor; None: 1 with GPUs, else the smallest node's
            CPUs // ``actors`` (actors packed on one node use its cores, never more).
        nifti_out: also write one mask and one CAM volume per subject there (NIfTI datasets).
        nifti_orientation: ``original`` (the source file's axes and affine) or ``canonical`` (RAS).
        progress: called as ``progress(rows_done, rows_total)`` while files are written.
        gate: ``none``, or ``anatomy``: zero the maps on each row's ``anatomy_mask`` (skull/scalp) and
            renormalise (``acol_core.gating``); rows without a mask keep their maps, and the result
            (and the predictions' ``extra``) counts them as ``ungated_rows``, with a warning.
    """

    model: str
    data: str
    output: str
    split: str | Sequence[str] = "test"
    threshold: float | None = None
    actors: int = 1
    batch_size: int = 32
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 0.5
    threads_per_actor: int | None = None
    gt_maps: bool = True
    nifti_out: str | None = None
    nifti_orientation: str = "original"
    progress: Callable[[int, int], None] | None = None
    gate: str = "none"


def run_localize(options: LocalizeOptions) -> LocalizeResult:
    """Localize every row of the split(s) with a Ray Data actor pool; commit the predictions folder."""
    import ray.data
    import ray.exceptions

    from acol_core.jobs import ray_init

    started = time.perf_counter()
    bad_threads = options.threads_per_actor is not None and options.threads_per_actor < 1
    if options.actors < 1 or options.batch_size < 1 or options.cpus_per_actor <= 0 or bad_threads:
        raise ValueError("actors, batch_size and threads_per_actor must be >= 1 and cpus_per_actor > 0")
    checked = _check(
        options.model, options.data, options.output, options.split, options.threshold, options.gate
    )
    if checked.gate != "none" and checked.ungated_rows:
        logging.getLogger(__name__).warning(
            "gate %s: %d of %d rows have no anatomy mask; their maps are not gated",
            checked.gate,
            checked.ungated_rows,
            checked.rows,
        )
    plan = volume_plan(options.data, checked.splits, options.nifti_orientation) if options.nifti_out else None
    ray_init()
    gpus = _gpus_per_actor(options.gpus_per_actor)
    threads = _threads_per_actor(options.threads_per_actor, options.actors, gpus)
    staging = staging_uri(options.output)
    fs, staging_path = storage.resolve(staging)
    context = ray.data.DataContext.get_current()
    bars, data_logger = context.enable_progress_bars, logging.getLogger("ray.data")
    level = data_logger.level
    stop = threading.Event()
    watcher = None
    if options.progress is not None:
        # One progress line (ours), not Ray Data's bars and execution log lines as well.
        context.enable_progress_bars = False
        data_logger.setLevel(logging.WARNING)
        watcher = threading.Thread(
            target=watch_staged_rows, args=(staging, checked.rows, options.progress, stop), daemon=True
        )
        watcher.start()
    try:
        ds = _build(
            checked,
            options.actors,
            options.batch_size,
            gpus,
            options.cpus_per_actor,
            threads,
            options.gt_maps,
        )
        ds.write_parquet(staging_path, filesystem=fs)
    except BaseException as exc:
        storage.delete(staging)
        if isinstance(exc, ray.exceptions.RayError):
            raise LocalizeError(
                f"localizing {options.data} failed: {one_line(exc)} (nothing was committed to {options.output})"
            ) from exc
        raise
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        context.enable_progress_bars = bars
        data_logger.setLevel(level)
    info = commit_predictions(
        staging,
        options.output,
        model=checked.info.config.model,
        checkpoint=checked.checksum,
        data=storage.absolute(options.data),
        splits=checked.splits,
        threshold=checked.threshold,
        class_names=checked.class_names,
        expected_rows=checked.rows,
        extra={
            "model_uri": checked.model_uri,
            "config": checked.info.config.to_dict(),
            "gt_maps": options.gt_maps,
            "actors": options.actors,
            "threads_per_actor": threads,
            "gate": checked.gate,
            "ungated_rows": checked.ungated_rows,
        },
    )
    if options.progress is not None:
        options.progress(info.num_rows, checked.rows)
    files = (
        predictions_to_nifti(options.output, options.data, options.nifti_out, options.nifti_orientation, plan)
        if options.nifti_out
        else []
    )
    seconds = time.perf_counter() - started
    return LocalizeResult(options.output, info, seconds, files, checked.gate, checked.ungated_rows)
