"""``root/<class>/<image>`` folders, with optional masks at the same relative paths under another folder.

Every file under the root is one input. A mask for ``cls/a/img.jpg`` is looked up as
``<masks>/cls/a/img.png``, then ``<masks>/cls/a/img.jpg``; images without one get no mask and no boxes.
Anatomy masks (off-target structures such as the skull, for the off-target share) come from the
``anatomy_masks`` folder, matched the same way by file stem: ``<anatomy_masks>/cls/a/img.png``, then
``<anatomy_masks>/cls/a/img.jpg``; pixels > 0 (or the object value of a 0/1/255 mask) are anatomy. With
that folder every image needs one: an image without it, or with one of another size, is rejected.
The subject of an image is its file stem, or what ``subject_pattern`` (a regex searched in the relative
path; group ``subject``, else group 1, else the whole match) picks out.

Examples:
    >>> src = ImageFolderSource("data/cats_dogs", masks="data/cats_dogs_masks")  # doctest: +SKIP
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from acol_core.data.codec import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from acol_core.data.schema import MASK_OBJECT, Record, Reject
from acol_core.data.sources.base import (
    DataSourceError,
    InputError,
    InputRef,
    InputRoot,
    SourceBase,
    binarize_mask,
)
from acol_core.localize import boxes_from_mask

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderSource"]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pbm"}
)


class ImageFolderSource(SourceBase):
    """Class-per-folder images.

    Args:
        root: the folder (path or URI) holding one sub-folder per class.
        masks: optional folder with masks at the same relative paths.
        anatomy_masks: optional folder with an anatomy mask for every image, at the same relative paths.
        subject_pattern: regex that extracts the subject id from the relative path.
        class_names: the classes, in label order (default: the sub-folder names, sorted); files in
            other folders are rejected.
        max_pixels: images (and masks) larger than this are rejected.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str,
        masks: str | None = None,
        anatomy_masks: str | None = None,
        subject_pattern: str | None = None,
        class_names: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = InputRoot(root)
        self.masks = InputRoot(masks, "masks folder") if masks else None
        self.anatomy = InputRoot(anatomy_masks, "anatomy masks folder") if anatomy_masks else None
        self.pattern = re.compile(subject_pattern) if subject_pattern else None
        self.max_pixels = int(max_pixels)
        self.class_names = tuple(class_names) if class_names else tuple(self.root.list_dirs())
        if not self.class_names:
            raise DataSourceError(f"no class folders under {root} (expected root/<class>/<image>)")
        self._files = self.root.list_files()
        if not self._files:
            raise DataSourceError(f"no files under {root}")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "root": self.root.uri,
            "masks": self.masks.uri if self.masks else None,
            "anatomy_masks": self.anatomy.uri if self.anatomy else None,
            "subject_pattern": self.pattern.pattern if self.pattern else None,
            "max_pixels": self.max_pixels,
        }

    def _subject(self, rel: str) -> str | None:
        if self.pattern is None:
            return posixpath.splitext(posixpath.basename(rel))[0]
        match = self.pattern.search(rel)
        if match is None:
            return None
        if "subject" in match.groupdict():
            return match.group("subject")
        return match.group(1) if match.re.groups else match.group(0)

    def list_inputs(self) -> list[InputRef]:
        return [InputRef(rel, self._subject(rel) or rel) for rel in self._files]

    def read_input(self, key: str) -> list[Record] | Reject:
        try:
            return [self._read(key)]
        except (InputError, ImageDecodeError) as exc:
            return Reject(key, str(exc))

    def _read(self, rel: str) -> Record:
        self.root.full_path(rel)  # escape checks come before anything else about the file
        parts = rel.split("/")
        if len(parts) < 2:
            raise InputError("not inside a class folder")
        if parts[0] not in self.class_names:
            raise InputError(f"unknown class {parts[0]!r} (classes: {', '.join(self.class_names)})")
        if posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"unsupported file type: {posixpath.basename(rel)}")
        subject = self._subject(rel)
        if subject is None:
            raise InputError(f"subject pattern {self.pattern.pattern!r} does not match")
        image = decode_image(self.root.read_bytes(rel), self.max_pixels)
        mask = self._mask(self.masks, rel, image.shape[:2], "mask")
        anatomy = self._mask(self.anatomy, rel, image.shape[:2], "anatomy mask")
        if self.anatomy is not None and anatomy is None:
            raise InputError(f"no anatomy mask for {rel} in {self.anatomy.uri}")
        return Record(
            image_id=rel,
            image=image,
            label=self.class_names.index(parts[0]),
            mask=mask,
            boxes=None if mask is None else boxes_from_mask(mask, order="raster"),
            subject_id=subject,
            source=rel,
            anatomy_mask=None if anatomy is None else (anatomy == MASK_OBJECT).astype(np.uint8),
        )

    def _mask(
        self, folder: InputRoot | None, rel: str, shape: tuple[int, ...], what: str
    ) -> np.ndarray | None:
        """The binarised mask for image ``rel`` in ``folder`` (by stem), or None when it has none."""
        if folder is None:
            return None
        stem = posixpath.splitext(rel)[0]
        for candidate in (f"{stem}.png", rel):
            if folder.exists(candidate):
                try:
                    decoded = decode_image(folder.read_bytes(candidate), self.max_pixels, keep_palette=True)
                except ImageDecodeError as exc:
                    raise InputError(f"{what} {candidate}: {exc}") from None
                mask = binarize_mask(decoded, f"{what} {candidate}")
                if mask.shape != tuple(shape):
                    raise InputError(f"{what} shape {mask.shape} does not match image shape {tuple(shape)}")
                return mask
        return None
