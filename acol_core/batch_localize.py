"""Batch localization without Ray: an exported model over dataset rows, a batch at a time.

``Localizer`` loads the model once (from its URI) and turns a batch of dataset rows into a predictions
table (``localize_rows``); ``localize_plain`` runs it over a split in this process. The Ray Data job
(``acol_core.jobs.localize_job``) runs the same ``Localizer`` in an actor pool.

Example::

    table = localize_plain("runs/model.safetensors", "runs/data", split="test")
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from acol_core import storage
from acol_core.data.codec import decode_png, encode_png
from acol_core.data.harmonize import harmonize_batch
from acol_core.data.schema import SPLITS
from acol_core.data.transforms import anatomy_masks, prepare_image, standardize
from acol_core.export import ExportedInfo, load_exported
from acol_core.faults import injected_fault
from acol_core.gating import check_gate, gate_maps
from acol_core.localize import cam_to_mask, normalize_cam, predicted_boxes, resize_map
from acol_core.predictions import PREDICTION_SCHEMA, empty_predictions, encode_cam, encode_mask, quantize_cam
from acol_core.train import autocast, flush_denormals, select_device

__all__ = [
    "DEFAULT_THRESHOLD",
    "INPUT_COLUMNS",
    "Localizer",
    "localize_plain",
    "localize_rows",
    "model_threshold",
    "parse_splits",
    "ungated_rows",
]

DEFAULT_THRESHOLD = 0.5
# anatomy_mask: what the anatomy gate and brain harmonisation (`data.harmonize`) read; null when absent.
INPUT_COLUMNS = ["image_id", "image", "label", "subject_id", "slice_index", "anatomy_mask"]


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


def ungated_rows(dataset: Any, splits: Sequence[str], gate: str) -> int:
    """Rows of the splits that ``gate`` leaves as they are (``anatomy``: no anatomy mask); ``dataset``
    is an ``acol_core.data.shards`` dataset."""
    if gate == "none":
        return 0
    return sum(dataset.read_table(split=s, columns=["anatomy_mask"]).column(0).null_count for s in splits)


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
    inputs = np.stack([prepare_image(im, cfg.channels, cfg.image_size) for im in images])
    if cfg.harmonize != "none":
        inputs = harmonize_batch(inputs, anatomy_masks(rows, cfg.image_size), cfg.harmonize)
    x = torch.from_numpy(standardize(inputs, info.input_norm))
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
    """

    def __init__(
        self,
        model_uri: str,
        threshold: float | None = None,
        expected_sha256: str | None = None,
        gt_maps: bool = True,
        device: str = "auto",
        num_threads: int = 0,
        gate: str = "none",
    ) -> None:
        self._fault = injected_fault("localize")  # TEST ONLY (acol_core.faults)
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
    """TEST ONLY (``acol_core.faults``): SIGKILL this process unless ``marker_dir`` already counts
    ``times`` deaths."""
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
        table = dataset.read_table(split=name, columns=INPUT_COLUMNS)
        for start in range(0, table.num_rows, batch_size):
            tables.append(localizer(table.slice(start, batch_size).to_pydict()))
    return pa.concat_tables(tables) if tables else empty_predictions()
