"""The dataset's row schema: one Parquet row per 2-D image (DESIGN.md, "The Parquet dataset").

Sources produce ``Record`` objects (numpy arrays); ``record_to_row`` validates one and encodes its
images as PNG. Columns:

``image_id`` unique, stable id (input path, or ``subject/zNNN`` for volumes); ``image`` PNG, uint8 or
uint16, 1..4 channels; ``height``/``width``; ``label`` class index or -1; ``labels`` all class indices
of the image; ``mask`` PNG (0 background, 1 object, 255 ignore) or null; ``boxes`` inclusive
[x0, y0, x1, y1] per object or null (no box annotation; [] = annotated, no object); ``split``
train/val/test; ``fullsup`` ground truth usable for model selection; ``subject_id``; ``slice_index``;
``source`` where the row came from (input path relative to the input root); ``anatomy_mask`` PNG of an
extra structure (skull) or null.

Volumes: ``volume_shape`` (3 ints) and ``affine`` (16 floats, row-major 4×4) describe the RAS-canonical
grid the slice was cut from; ``slice_index`` is the slice's index on that grid's last (axial) axis. See
``acol_core.data.sources.nifti.restack`` for putting slices back into a volume. Both are null for 2-D
sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from acol_core.data.codec import encode_png

__all__ = [
    "MASK_BACKGROUND",
    "MASK_IGNORE",
    "MASK_OBJECT",
    "NO_LABEL",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SPLITS",
    "Record",
    "Reject",
    "record_to_row",
]

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
NO_LABEL = -1
MASK_BACKGROUND, MASK_OBJECT, MASK_IGNORE = 0, 1, 255

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("boxes", pa.list_(pa.list_(pa.int32()))),
        pa.field("split", pa.string(), nullable=False),
        pa.field("fullsup", pa.bool_(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("anatomy_mask", pa.binary()),
        pa.field("volume_shape", pa.list_(pa.int32())),
        pa.field("affine", pa.list_(pa.float64())),
    ],
    metadata={"acol.schema_version": str(SCHEMA_VERSION)},
)


@dataclass
class Record:
    """One 2-D image with its annotations, before encoding.

    ``labels`` defaults to ``[label]`` (or [] without a label), ``subject_id`` to ``image_id``.
    ``split`` may stay None until the preparation assigns one.
    """

    image_id: str
    image: np.ndarray
    label: int = NO_LABEL
    labels: list[int] | None = None
    mask: np.ndarray | None = None
    boxes: list[list[int]] | None = None
    split: str | None = None
    fullsup: bool = False
    subject_id: str | None = None
    slice_index: int = 0
    source: str = ""
    anatomy_mask: np.ndarray | None = None
    volume_shape: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None


@dataclass(frozen=True)
class Reject:
    """An input that produced no row, and why."""

    source: str
    reason: str


def _check_mask(name: str, mask: np.ndarray, shape: tuple[int, int], allowed: tuple[int, ...]) -> None:
    if mask.dtype != np.uint8 or mask.shape != shape:
        raise ValueError(f"{name} must be uint8 of shape {shape}, got {mask.dtype} {mask.shape}")
    bad = np.setdiff1d(np.unique(mask), allowed)
    if bad.size:
        raise ValueError(f"{name} has values {bad.tolist()[:5]} outside {allowed}")


def _check_boxes(boxes: list[list[int]], height: int, width: int) -> list[list[int]]:
    out = []
    for box in boxes:
        x0, y0, x1, y1 = (int(v) for v in box)
        if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
            raise ValueError(f"box {[x0, y0, x1, y1]} is not inside a {width}×{height} image")
        out.append([x0, y0, x1, y1])
    return out


def record_to_row(record: Record) -> dict[str, Any]:
    """Validate a Record and encode it as a dict of the schema's columns."""
    image = np.asarray(record.image)
    if image.ndim not in (2, 3):
        raise ValueError(f"{record.image_id}: image must be H×W or H×W×C, got shape {image.shape}")
    height, width = image.shape[:2]
    if record.split not in SPLITS:
        raise ValueError(f"{record.image_id}: split must be one of {SPLITS}, got {record.split!r}")
    if record.label < NO_LABEL:
        raise ValueError(f"{record.image_id}: label must be >= -1, got {record.label}")
    labels = record.labels if record.labels is not None else ([record.label] if record.label >= 0 else [])
    mask = None
    if record.mask is not None:
        _check_mask("mask", record.mask, (height, width), (MASK_BACKGROUND, MASK_OBJECT, MASK_IGNORE))
        mask = encode_png(record.mask)
    anatomy = None
    if record.anatomy_mask is not None:
        _check_mask("anatomy_mask", record.anatomy_mask, (height, width), (0, 1))
        anatomy = encode_png(record.anatomy_mask)
    boxes = None if record.boxes is None else _check_boxes(record.boxes, height, width)
    affine = None
    if record.affine is not None:
        affine = [float(v) for v in np.asarray(record.affine, dtype=np.float64).reshape(16)]
    return {
        "image_id": record.image_id,
        "image": encode_png(image),
        "height": int(height),
        "width": int(width),
        "label": int(record.label),
        "labels": [int(v) for v in labels],
        "mask": mask,
        "boxes": boxes,
        "split": record.split,
        "fullsup": bool(record.fullsup),
        "subject_id": record.subject_id if record.subject_id is not None else record.image_id,
        "slice_index": int(record.slice_index),
        "source": record.source,
        "anatomy_mask": anatomy,
        "volume_shape": None if record.volume_shape is None else [int(v) for v in record.volume_shape],
        "affine": affine,
    }
