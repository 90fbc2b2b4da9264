"""wsolevaluation's metadata layout (clovaai/wsolevaluation, ``metadata/<dataset>/<split>/``).

Files, one record per line, ``<image_id>`` being the image's path under the images root:

- ``image_ids.txt``: ``<image_id>``
- ``class_labels.txt``: ``<image_id>,<class index>``
- ``image_sizes.txt`` (optional): ``<image_id>,<width>,<height>``
- ``localization.txt`` (optional), either boxes ``<image_id>,<x0>,<y0>,<x1>,<y1>`` (one line per box)
  or masks ``<image_id>,<mask path>,<ignore mask path>`` (one line per instance; the ignore path only
  on the first, OpenImages). Masks are unioned; the ignore region minus the objects becomes 255.

``metadata`` is either one such folder or a folder of ``train``/``val``/``test`` ones, whose split is
kept. Class names come from ``class_names`` or ``class_names.txt`` (one per line, in index order);
otherwise they are the indices as strings.

Examples:
    >>> src = WsolMetadataSource("CUB_200_2011/images", metadata="metadata/CUB")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acol_core import storage
from acol_core.data.codec import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from acol_core.data.schema import MASK_IGNORE, MASK_OBJECT, SPLITS, Record, Reject
from acol_core.data.sources.base import (
    DataSourceError,
    InputError,
    InputRef,
    InputRoot,
    SourceBase,
    binarize_mask,
)

__all__ = ["WsolMetadataSource"]


@dataclass
class _SplitMeta:
    split: str | None
    image_ids: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    boxes: dict[str, list[list[int]]] = field(default_factory=dict)
    masks: dict[str, list[str]] = field(default_factory=dict)
    ignores: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _lines(folder: InputRoot, name: str, required: bool) -> list[str] | None:
    if not folder.exists(name):
        if required:
            raise DataSourceError(f"{name} missing in metadata folder {folder.uri}")
        return None
    try:
        text = folder.read_bytes(name).decode("utf-8")
    except InputError:
        text = ""  # an empty optional file means no entries
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{name} in {folder.uri} is not UTF-8 text: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_split(folder: InputRoot, split: str | None) -> _SplitMeta:
    meta = _SplitMeta(split, _lines(folder, "image_ids.txt", True) or [])
    for line in _lines(folder, "class_labels.txt", True) or []:
        image_id, _, label = line.rpartition(",")
        meta.labels[image_id or line] = label
    for line in _lines(folder, "image_sizes.txt", False) or []:
        image_id, *rest = line.split(",")
        try:
            meta.sizes[image_id] = (int(rest[0]), int(rest[1]))
        except (ValueError, IndexError):
            meta.errors[image_id] = f"malformed image_sizes line: {line!r}"
    for line in _lines(folder, "localization.txt", False) or []:
        _add_localization(meta, line)
    return meta


def _add_localization(meta: _SplitMeta, line: str) -> None:
    image_id, *rest = line.split(",")
    if len(rest) == 4:
        try:
            meta.boxes.setdefault(image_id, []).append([int(float(v)) for v in rest])
        except ValueError:
            meta.errors[image_id] = f"malformed box line: {line!r}"
    elif len(rest) == 2:
        meta.masks.setdefault(image_id, []).append(rest[0])
        if rest[1]:
            meta.ignores[image_id] = rest[1]
    else:
        meta.errors[image_id] = f"malformed localization line: {line!r}"


class WsolMetadataSource(SourceBase):
    """Images listed by wsolevaluation metadata files.

    Args:
        root: the images root; image ids are paths under it.
        metadata: the metadata folder (default: ``root``), flat or with train/val/test sub-folders.
        mask_root: where mask paths in localization.txt start (default: ``root``).
        class_names: class names in index order; labels outside them are rejected.
        max_pixels: images larger than this are rejected.
    """

    name = "wsol-metadata"

    def __init__(
        self,
        root: str,
        metadata: str | None = None,
        mask_root: str | None = None,
        class_names: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = InputRoot(root)
        self.meta_root = InputRoot(metadata, "metadata folder") if metadata else self.root
        self.mask_root = InputRoot(mask_root, "mask root") if mask_root else self.root
        self.max_pixels = int(max_pixels)
        self._splits = self._read_layout()
        if not any(m.image_ids for m in self._splits.values()):
            raise DataSourceError(f"no image ids in metadata {self.meta_root.uri}")
        self.class_names = tuple(class_names) if class_names else self._default_class_names()
        self._first: dict[str, tuple[str | None, int]] = {}
        for split, meta in self._splits.items():
            for index, image_id in enumerate(meta.image_ids):
                self._first.setdefault(image_id, (split, index))

    def _read_layout(self) -> dict[str | None, _SplitMeta]:
        if self.meta_root.exists("image_ids.txt"):
            return {None: _read_split(self.meta_root, None)}
        found = {}
        for split in SPLITS:
            if self.meta_root.exists(f"{split}/image_ids.txt"):
                folder = InputRoot(storage.join(self.meta_root.uri, split), "metadata folder")
                found[split] = _read_split(folder, split)
        if not found:
            raise DataSourceError(
                f"no image_ids.txt in {self.meta_root.uri} nor in its train/val/test folders"
            )
        return found

    def _default_class_names(self) -> tuple[str, ...]:
        if self.meta_root.exists("class_names.txt"):
            return tuple(_lines(self.meta_root, "class_names.txt", True) or [])
        labels = [int(v) for m in self._splits.values() for v in m.labels.values() if v.strip().isdigit()]
        return tuple(str(i) for i in range(max(labels) + 1)) if labels else ()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "root": self.root.uri,
            "metadata": self.meta_root.uri,
            "mask_root": self.mask_root.uri,
            "splits": [s for s in self._splits if s is not None],
            "max_pixels": self.max_pixels,
        }

    def list_inputs(self) -> list[InputRef]:
        return [
            InputRef(f"{split or ''}|{index}", image_id, split)
            for split, meta in self._splits.items()
            for index, image_id in enumerate(meta.image_ids)
        ]

    def read_input(self, key: str) -> list[Record] | Reject:
        split_name, _, index = key.partition("|")
        meta = self._splits[split_name or None]
        image_id = meta.image_ids[int(index)]
        try:
            first = self._first[image_id]
            if first != (meta.split, int(index)):
                raise InputError(f"duplicate image id (first listed in split {first[0]!r})")
            return [self._read(meta, image_id)]
        except (InputError, ImageDecodeError) as exc:
            return Reject(image_id, str(exc))

    def _label(self, meta: _SplitMeta, image_id: str) -> int:
        if image_id not in meta.labels:
            raise InputError("no entry in class_labels.txt")
        text = meta.labels[image_id]
        try:
            label = int(text)
        except ValueError:
            raise InputError(f"malformed class label {text!r}") from None
        if not 0 <= label < len(self.class_names):
            raise InputError(f"unknown class label {label} (classes 0..{len(self.class_names) - 1})")
        return label

    def _read(self, meta: _SplitMeta, image_id: str) -> Record:
        if image_id in meta.errors:
            raise InputError(meta.errors[image_id])
        label = self._label(meta, image_id)
        image = decode_image(self.root.read_bytes(image_id), self.max_pixels)
        height, width = image.shape[:2]
        if image_id in meta.sizes and meta.sizes[image_id] != (width, height):
            w, h = meta.sizes[image_id]
            raise InputError(f"image is {width}×{height} but image_sizes.txt says {w}×{h}")
        boxes = _clip_boxes(meta.boxes[image_id], width, height) if image_id in meta.boxes else None
        mask = self._mask(meta, image_id, (height, width)) if image_id in meta.masks else None
        return Record(
            image_id=image_id,
            image=image,
            label=label,
            mask=mask,
            boxes=boxes,
            split=meta.split,
            subject_id=image_id,
            source=image_id,
        )

    def _read_mask(self, rel: str, shape: tuple[int, int]) -> np.ndarray:
        try:
            decoded = decode_image(self.mask_root.read_bytes(rel), self.max_pixels, keep_palette=True)
        except ImageDecodeError as exc:
            raise InputError(f"mask {rel}: {exc}") from None
        mask = binarize_mask(decoded, f"mask {rel}")
        if mask.shape != shape:
            raise InputError(f"mask {rel} shape {mask.shape} does not match image shape {shape}")
        return mask == MASK_OBJECT

    def _mask(self, meta: _SplitMeta, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        objects = np.zeros(shape, bool)
        for rel in meta.masks[image_id]:
            objects |= self._read_mask(rel, shape)
        out = objects.astype(np.uint8)
        if image_id in meta.ignores:
            ignore = self._read_mask(meta.ignores[image_id], shape)
            out[ignore & ~objects] = MASK_IGNORE
        return out


def _clip_boxes(boxes: list[list[int]], width: int, height: int) -> list[list[int]]:
    """Clip boxes into the image (CUB's x0+w can reach the width); refuse inverted or outside ones."""
    out = []
    for x0, y0, x1, y1 in boxes:
        if x0 > x1 or y0 > y1 or x0 >= width or y0 >= height or x1 < 0 or y1 < 0:
            raise InputError(f"box {[x0, y0, x1, y1]} is inverted or outside the {width}×{height} image")
        out.append([max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)])
    return out
