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
(``_SUCCESS.json`` last). ``localize_plain`` runs the same ``Localizer`` in a plain loop, in process.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from acol_core import storage
from acol_core.data.codec import decode_png, encode_png
from acol_core.data.schema import SPLITS
from acol_core.data.transforms import prepare_image, standardize
from acol_core.errors import RunFailure, one_line
from acol_core.export import ExportedInfo, load_exported, read_export_info
from acol_core.gating import check_gate, gate_maps
from acol_core.localize import cam_to_mask, normalize_cam, predicted_boxes, resize_map
from acol_core.predictions import (
    PREDICTION_SCHEMA,
    PredictionsInfo,
    check_output,
    commit_predictions,
    empty_predictions,
    encode_cam,
    encode_mask,
    predictions_to_nifti,
    quantize_cam,
    staging_uri,
    volume_plan,
)
from acol_core.train import autocast, flush_denormals, select_device

__all__ = [
    "ACTOR_RESTARTS",
    "DEFAULT_THRESHOLD",
    "GATE_COLUMNS",
    "INPUT_COLUMNS",
    "LocalizeError",
    "LocalizeResult",
    "Localizer",
    "localize_plain",
    "localize_rows",
    "model_threshold",
    "parse_splits",
    "run_localize",
]

DEFAULT_THRESHOLD = 0.5
ACTOR_RESTARTS = 3  # per actor; a lost batch is retried as often
INPUT_COLUMNS = ["image_id", "image", "label", "subject_id", "slice_index"]
GATE_COLUMNS = {"none": [], "anatomy": ["anatomy_mask"]}  # what each gate reads besides INPUT_COLUMNS


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


def parse_splits(split: str | Sequence[str]) -> list[str]:
    """``"test"``, ``"val,test"`` or ``"all"`` -> a list of split names."""
    names = split.split(",") if isinstance(split, str) else list(split)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(SPLITS)
    bad = [n for n in names if n not in SPLITS]
    if bad or not names:
        raise ValueError(
            f"split must be one or more of {', '.join(SPLITS)} (comma-separated) or 'all', got {split!r}"
        )
    return sorted(set(names), key=SPLITS.index)


def model_threshold(info: ExportedInfo, threshold: float | None = None) -> float:
    """The CAM threshold: the one given, else the export's ``extra["threshold"]``, else 0.5."""
    value = threshold if threshold is not None else info.extra.get("threshold", DEFAULT_THRESHOLD)
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- the per-batch work


def _maps_at_image_size(
    raw: np.ndarray, sizes: Sequence[tuple[int, int]], anatomy: Sequence[np.ndarray | None] | None = None
) -> list[np.ndarray]:
    """Feature-resolution maps -> normalised maps at each image's own height × width; with ``anatomy``
    (one mask or None per map), gated by ``acol_core.gating.gate_cam``."""
    maps = [normalize_cam(resize_map(m, size)) for m, size in zip(raw, sizes, strict=True)]
    return maps if anatomy is None else gate_maps(maps, anatomy, "anatomy").maps


def _anatomy_masks(rows: Mapping[str, Sequence[Any]], gate: str) -> list[np.ndarray | None] | None:
    """Decoded anatomy masks (None where a row has none) when ``gate`` is ``anatomy``, else None."""
    if check_gate(gate) == "none":
        return None
    values = rows.get("anatomy_mask")
    if values is None:
        return [None] * len(rows["image_id"])
    return [None if v is None else decode_png(bytes(v)) for v in values]


def _gt_class_maps(
    model: torch.nn.Module,
    x: torch.Tensor,
    pred: np.ndarray,
    labels: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    num_classes: int,
    amp: str,
    anatomy: Sequence[np.ndarray | None] | None = None,
) -> list[bytes | None]:
    """The labelled class's map (PNG) where a row's label differs from its prediction, else None.

    Where they agree the predicted class's map is the labelled class's map already: no second pass.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out: list[bytes | None] = [None] * len(pred)
    redo = np.flatnonzero((labels >= 0) & (labels < num_classes) & (labels != pred))
    if redo.size == 0:
        return out
    index = torch.from_numpy(redo).to(x.device)
    with autocast(x.device, amp):
        again = model(x[index], torch.from_numpy(labels[redo]).to(x.device))
    redo_anatomy = None if anatomy is None else [anatomy[i] for i in redo]
    maps = _maps_at_image_size(again["cam"].float().cpu().numpy(), [sizes[i] for i in redo], redo_anatomy)
    for i, m in zip(redo, maps, strict=True):
        out[i] = encode_cam(m)
    return out


@torch.no_grad()
def localize_rows(
    model: torch.nn.Module,
    info: ExportedInfo,
    rows: Mapping[str, Sequence[Any]],
    threshold: float,
    identity: tuple[str, str],
    device: torch.device,
    gt_maps: bool = True,
    gate: str = "none",
) -> pa.Table:
    """Dataset rows (``INPUT_COLUMNS``; lists or numpy arrays) -> a PREDICTION_SCHEMA table.

    The map is the predicted class's (no label is used for it). With ``gt_maps``, rows whose label
    differs from the prediction get a second forward pass with that label, stored as ``cam_gt``.
    ``gate="anatomy"`` zeroes both maps on the rows' ``anatomy_mask`` pixels (``acol_core.gating``);
    rows without one keep their maps.
    """
    n = len(rows["image_id"])
    if n == 0:
        return empty_predictions()
    cfg = info.config
    images = [decode_png(bytes(b)) for b in rows["image"]]
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    x = torch.from_numpy(
        standardize(
            np.stack([prepare_image(im, cfg.channels, cfg.image_size) for im in images]), info.input_norm
        )
    )
    x = x.to(device)
    with autocast(device, cfg.amp):
        out = model(x)
    logits = out["logits"].float()
    scores = torch.softmax(logits, dim=1).cpu().numpy()
    pred = scores.argmax(axis=1)
    anatomy = _anatomy_masks(rows, gate)
    cams = [quantize_cam(c) for c in _maps_at_image_size(out["cam"].float().cpu().numpy(), sizes, anatomy)]
    # The mask is thresholded on the stored (quantised) map, so the cam column reproduces it exactly.
    masks = [cam_to_mask(c.astype(np.float64) / 255.0, threshold) for c in cams]
    labels = rows.get("label") if gt_maps else None
    cam_gt = (
        _gt_class_maps(model, x, pred, labels, sizes, cfg.num_classes, cfg.amp, anatomy)
        if labels is not None
        else [None] * n
    )
    model_name, checkpoint = identity
    columns = {
        "image_id": [str(v) for v in rows["image_id"]],
        "pred_label": pred.astype(np.int32),
        "scores": [s.astype(np.float32).tolist() for s in scores],
        "cam": [encode_png(c) for c in cams],
        "mask": [encode_mask(m) for m in masks],
        "boxes": [predicted_boxes(c.astype(np.float64) / 255.0, threshold) for c in cams],
        "cam_gt": cam_gt,
        "model": [model_name] * n,
        "checkpoint": [checkpoint] * n,
        "subject_id": [str(v) for v in rows["subject_id"]],
        "slice_index": np.asarray(rows["slice_index"], dtype=np.int32),
        "height": np.array([h for h, _ in sizes], dtype=np.int32),
        "width": np.array([w for _, w in sizes], dtype=np.int32),
    }
    return pa.Table.from_pydict(columns, schema=PREDICTION_SCHEMA)


class Localizer:
    """The model, loaded once from its URI, applied to batches: a Ray Data actor, or a plain object.

    Args:
        model_uri: the ``.safetensors`` export (local path or s3://).
        threshold: CAM threshold; None: the export's, else 0.5.
        expected_sha256: refuse a model file that differs from the one the driver checked.
        gt_maps: also store the ground-truth class's map where it differs (``cam_gt``).
        device: ``auto`` (CUDA when visible), ``cpu``, ``cuda``.
        num_threads: torch CPU threads (0: leave torch's default).
        gate: ``none``, or ``anatomy`` (zero the maps on each row's ``anatomy_mask``).
        fault_injection: TEST ONLY. ``{"image_id", "times", "marker_dir"}``: the process SIGKILLs
            itself (no cleanup, like an OOM kill) when a batch holds that row, at most ``times`` times
            in all (counted as files in ``marker_dir``, a folder every actor can see).
    """

    def __init__(
        self,
        model_uri: str,
        threshold: float | None = None,
        expected_sha256: str | None = None,
        gt_maps: bool = True,
        device: str = "auto",
        num_threads: int = 0,
        fault_injection: dict[str, Any] | None = None,
        gate: str = "none",
    ) -> None:
        self._fault = fault_injection
        self.gate = check_gate(gate)
        if num_threads:
            torch.set_num_threads(num_threads)
        data = storage.read_bytes(model_uri)
        checksum = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and checksum != expected_sha256:
            raise RuntimeError(f"model file {model_uri} changed during the run (sha256 {checksum[:12]}…)")
        self.device = select_device(device)
        flush_denormals(self.device)
        self.model, self.info = load_exported(data, device=self.device)
        self.threshold = model_threshold(self.info, threshold)
        self.identity = (self.info.config.model, checksum)
        self.gt_maps = gt_maps

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> pa.Table:
        if self._fault and self._fault["image_id"] in [str(v) for v in batch["image_id"]]:
            _die(self._fault["marker_dir"], int(self._fault["times"]))
        return localize_rows(
            self.model, self.info, batch, self.threshold, self.identity, self.device, self.gt_maps, self.gate
        )


def _die(marker_dir: str, times: int) -> None:
    """TEST ONLY: SIGKILL this process unless ``marker_dir`` already counts ``times`` deaths."""
    import os
    import signal
    import uuid
    from pathlib import Path

    folder = Path(marker_dir)
    if len(list(folder.iterdir())) < times:
        (folder / uuid.uuid4().hex).touch()  # first: the count must survive the kill
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- plain loop


def localize_plain(
    model_uri: str,
    data_uri: str,
    split: str | Sequence[str] = "test",
    threshold: float | None = None,
    batch_size: int = 32,
    gt_maps: bool = True,
    device: str = "auto",
    gate: str = "none",
) -> pa.Table:
    """Every row of the split(s), in this process, one batch at a time: the predictions table."""
    from acol_core.data.shards import open_dataset

    dataset = open_dataset(data_uri, verify=False)
    localizer = Localizer(model_uri, threshold, gt_maps=gt_maps, device=device, gate=gate)
    tables = []
    for name in parse_splits(split):
        table = dataset.read_table(split=name, columns=INPUT_COLUMNS + GATE_COLUMNS[localizer.gate])
        for start in range(0, table.num_rows, batch_size):
            tables.append(localizer(table.slice(start, batch_size).to_pydict()))
    return pa.concat_tables(tables) if tables else empty_predictions()


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


def _absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    return storage.resolve(uri)[1] if storage.is_local(uri) else uri


def _ungated_rows(dataset: Any, splits: Sequence[str], gate: str) -> int:
    """Rows of the splits that ``gate`` leaves as they are (``anatomy``: no anatomy mask)."""
    if gate == "none":
        return 0
    return sum(dataset.read_table(split=s, columns=["anatomy_mask"]).column(0).null_count for s in splits)


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
        model_uri=_absolute(model_uri),
        info=info,
        checksum=hashlib.sha256(data).hexdigest(),
        threshold=model_threshold(info, threshold),
        splits=splits,
        rows=rows,
        shard_paths=dataset.shard_paths(),
        filesystem=dataset.filesystem,
        class_names=list(info.class_names),
        gate=gate,
        ungated_rows=_ungated_rows(dataset, splits, gate),
    )


def _watch(staging: str, total: int, progress: Callable[[int, int], None], stop: threading.Event) -> None:
    """Report rows in files the writers have finished (their Parquet footers), every half second."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(staging)
    counted: dict[str, int] = {}
    reported = -1
    while not stop.wait(0.5):
        try:
            names = storage.list_dir(staging)
        except (OSError, storage.StorageError):
            continue
        for name in names:
            if name.endswith(".parquet") and name not in counted:
                try:
                    counted[name] = pq.read_metadata(f"{path}/{name}", filesystem=fs).num_rows
                except (OSError, pa.ArrowInvalid):
                    pass  # still being written
        done = min(sum(counted.values()), total)
        if done != reported:
            progress(done, total)
            reported = done


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
    fault_injection: dict[str, Any] | None = None,
) -> Any:
    import ray.data
    from ray.data.expressions import col

    from acol_core.jobs import parquet_reader_v1

    with parquet_reader_v1():
        ds = ray.data.read_parquet(checked.shard_paths, filesystem=checked.filesystem)
    # Ray 2.60 refuses read_parquet(filter=...); an expression filter is pushed down to the scan.
    columns = INPUT_COLUMNS + GATE_COLUMNS[checked.gate]
    ds = ds.filter(expr=col("split").is_in(checked.splits)).select_columns(columns)
    return ds.map_batches(
        Localizer,
        fn_constructor_kwargs={
            "model_uri": checked.model_uri,
            "threshold": checked.threshold,
            "expected_sha256": checked.checksum,
            "gt_maps": gt_maps,
            "device": "cuda" if gpus > 0 else "cpu",
            "num_threads": threads,
            "fault_injection": fault_injection,
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
    )


def run_localize(
    model_uri: str,
    data_uri: str,
    output_uri: str,
    split: str | Sequence[str] = "test",
    threshold: float | None = None,
    actors: int = 1,
    batch_size: int = 32,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 0.5,
    threads_per_actor: int | None = None,
    gt_maps: bool = True,
    nifti_out: str | None = None,
    nifti_orientation: str = "original",
    progress: Callable[[int, int], None] | None = None,
    fault_injection: dict[str, Any] | None = None,
    gate: str = "none",
) -> LocalizeResult:
    """Localize every row of the split(s) with a Ray Data actor pool; commit the predictions folder.

    Args:
        actors: actor pool size (each holds one model copy).
        gpus_per_actor: None: 1 when the Ray cluster has GPUs, else 0.
        cpus_per_actor: fractional by default: Ray Data's read and write tasks need CPUs too (on a
            2-CPU machine, actors at 1 CPU each leave none to the readers and the run stalls).
        threads_per_actor: torch CPU threads per actor; None: 1 with GPUs, else the smallest node's
            CPUs // ``actors`` (actors packed on one node use its cores, never more).
        nifti_out: also write one mask and one CAM volume per subject there (NIfTI datasets).
        nifti_orientation: ``original`` (the source file's axes and affine) or ``canonical`` (RAS).
        progress: called as ``progress(rows_done, rows_total)`` while files are written.
        fault_injection: TEST ONLY, see ``Localizer``.
        gate: ``none``, or ``anatomy``: zero the maps on each row's ``anatomy_mask`` (skull/scalp) and
            renormalise (``acol_core.gating``); rows without a mask keep their maps, and the result
            (and the predictions' ``extra``) counts them as ``ungated_rows``, with a warning.
    """
    import ray.data
    import ray.exceptions

    from acol_core.jobs import ray_init

    started = time.perf_counter()
    bad_threads = threads_per_actor is not None and threads_per_actor < 1
    if actors < 1 or batch_size < 1 or cpus_per_actor <= 0 or bad_threads:
        raise ValueError("actors, batch_size and threads_per_actor must be >= 1 and cpus_per_actor > 0")
    checked = _check(model_uri, data_uri, output_uri, split, threshold, gate)
    if checked.gate != "none" and checked.ungated_rows:
        logging.getLogger(__name__).warning(
            "gate %s: %d of %d rows have no anatomy mask; their maps are not gated",
            checked.gate,
            checked.ungated_rows,
            checked.rows,
        )
    plan = volume_plan(data_uri, checked.splits, nifti_orientation) if nifti_out else None
    ray_init()
    gpus = _gpus_per_actor(gpus_per_actor)
    threads = _threads_per_actor(threads_per_actor, actors, gpus)
    staging = staging_uri(output_uri)
    fs, staging_path = storage.resolve(staging)
    context = ray.data.DataContext.get_current()
    bars, data_logger = context.enable_progress_bars, logging.getLogger("ray.data")
    level = data_logger.level
    stop = threading.Event()
    watcher = None
    if progress is not None:
        # One progress line (ours), not Ray Data's bars and execution log lines as well.
        context.enable_progress_bars = False
        data_logger.setLevel(logging.WARNING)
        watcher = threading.Thread(target=_watch, args=(staging, checked.rows, progress, stop), daemon=True)
        watcher.start()
    try:
        ds = _build(checked, actors, batch_size, gpus, cpus_per_actor, threads, gt_maps, fault_injection)
        ds.write_parquet(staging_path, filesystem=fs)
    except BaseException as exc:
        storage.delete(staging)
        if isinstance(exc, ray.exceptions.RayError):
            raise LocalizeError(
                f"localizing {data_uri} failed: {one_line(exc)} (nothing was committed to {output_uri})"
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
        output_uri,
        model=checked.info.config.model,
        checkpoint=checked.checksum,
        data=_absolute(data_uri),
        splits=checked.splits,
        threshold=checked.threshold,
        class_names=checked.class_names,
        expected_rows=checked.rows,
        extra={
            "model_uri": checked.model_uri,
            "config": checked.info.config.to_dict(),
            "gt_maps": gt_maps,
            "actors": actors,
            "threads_per_actor": threads,
            "gate": checked.gate,
            "ungated_rows": checked.ungated_rows,
        },
    )
    if progress is not None:
        progress(info.num_rows, checked.rows)
    files = (
        predictions_to_nifti(output_uri, data_uri, nifti_out, nifti_orientation, plan) if nifti_out else []
    )
    seconds = time.perf_counter() - started
    return LocalizeResult(output_uri, info, seconds, files, checked.gate, checked.ungated_rows)
