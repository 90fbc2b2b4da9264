"""NIfTI volumes in the BraTS layout -> axial 2-D slices.

``root/<subject>/<anything><modality>.nii[.gz]`` per modality (``modalities=["t1c", "flair"]`` picks
the channels, at most 4) and an optional ``<anything>seg.nii[.gz]``. Each subject folder is one input.

Per volume: reoriented to RAS (``nibabel.as_closest_canonical``'s transform), every modality clipped to
its own 0.5/99.5 percentiles of the non-background voxels and scaled to uint16; axial slices (the last
axis of the canonical grid) with too little head are skipped. With a segmentation, ``seg > 0`` is the
object: a slice is "tumour" when it covers at least ``min_tumour_pixels`` pixels; a smaller tumour
section is marked ignore (255) on a "healthy" slice rather than called background.

Anatomy (the off-target structures: scalp, skull) comes from an optional brain mask per subject,
``<anything>brainmask.nii[.gz]`` (suffix: the ``brain_mask`` option; ``"none"`` turns it off), on the
modalities' grid (same shape and affine, else the subject is rejected; an empty mask is rejected too).
Voxels > 0 are brain (a non-integer mask: voxels >= 0.5). The head is derived from the image
(``head_mask``): per modality, voxels above the volume's Otsu threshold, united over modalities; the
largest 3-D connected component; holes filled in 3-D and then in every axial slice (a dark skull or CSF
ring enclosed by the scalp is head); brain voxels are head too. ``anatomy_mask`` = head minus brain, 0/1,
on every slice of a subject with a brain mask; null for subjects without one (the metrics then leave
the off-target share out rather than count it as 0).

Slices are shown with anterior up and the subject's left on the image's left: ``to_display`` and
``from_display`` convert a canonical-grid plane; ``restack`` builds a volume on the grid described by the
rows' ``volume_shape`` and ``affine`` (the canonical grid: the same voxels as the source file).

Examples:
    >>> src = NiftiSource("BraTS2023/train", modalities=["t1c", "flair"])  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import io
import posixpath
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from acol_core.data.schema import MASK_IGNORE, Record, Reject
from acol_core.data.sources.base import (
    DataSourceError,
    InputError,
    InputRef,
    InputRoot,
    SourceBase,
)
from acol_core.localize import boxes_from_mask

__all__ = [
    "NIFTI_CLASSES",
    "NiftiSource",
    "from_display",
    "head_mask",
    "load_nifti_bytes",
    "otsu_threshold",
    "restack",
    "to_display",
]

NIFTI_CLASSES = ("healthy", "tumour")
DEFAULT_MAX_VOXELS = 512 * 512 * 512


def to_display(plane: np.ndarray) -> np.ndarray:
    """Canonical-grid plane (x, y[, c]) -> image rows (anterior first) × columns (left to right)."""
    return np.flipud(np.swapaxes(plane, 0, 1))


def from_display(image: np.ndarray) -> np.ndarray:
    """Inverse of ``to_display``."""
    return np.swapaxes(np.flipud(image), 0, 1)


def restack(
    slices: Mapping[int, np.ndarray], volume_shape: Sequence[int], dtype: Any = np.uint8
) -> np.ndarray:
    """Put display-oriented 2-D slices back at their ``slice_index`` in a zero volume of ``volume_shape``."""
    volume = np.zeros(tuple(volume_shape), dtype)
    for z, image in slices.items():
        volume[:, :, z] = from_display(np.asarray(image))
    return volume


def load_nifti_bytes(data: bytes) -> nib.Nifti1Image:
    """A NIfTI-1/2 image from the bytes of a ``.nii`` or ``.nii.gz`` file (pixel data read lazily)."""
    raw = io.BytesIO(data)
    fileobj: Any = gzip.GzipFile(fileobj=raw, mode="rb") if data[:2] == b"\x1f\x8b" else raw
    head = fileobj.read(4)
    fileobj.seek(0)
    if len(head) < 4:
        raise ValueError("file too short for a NIfTI header")
    sizes = {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]}
    klass = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if klass is None:
        raise ValueError("not a NIfTI file (bad header size)")
    holder = nib.FileHolder(fileobj=fileobj)
    return klass.from_file_map({"header": holder, "image": holder})


def _match(files: list[str], suffix: str) -> list[str]:
    """Files whose name ends with ``<suffix>.nii[.gz]``; ones where the suffix starts a name part win."""
    hits = []
    for rel in files:
        name = posixpath.basename(rel).lower()
        for ext in (".nii.gz", ".nii"):
            if name.endswith(suffix.lower() + ext):
                hits.append((rel, name[: -len(suffix + ext)]))
                break
    bounded = [rel for rel, head in hits if not head or not head[-1].isalnum()]
    return bounded or [rel for rel, _ in hits]


def _normalise(volume: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to the non-background voxels' percentiles, scale to uint16 (background -> 0)."""
    background = volume.min()
    foreground = volume[volume > background]
    if foreground.size == 0:
        return np.zeros(volume.shape, np.uint16)
    lo, hi = np.percentile(foreground, percentiles)
    if hi <= lo:
        lo, hi = background, foreground.max()
    scaled = np.clip((volume - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(scaled * 65535.0).astype(np.uint16)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the histogram cut that maximises the between-class variance.

    Voxels strictly above it are foreground. A constant volume gives its one value (nothing above).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight0 = np.cumsum(counts)[:-1].astype(np.float64)
    weight1 = values.size - weight0
    mass = np.cumsum(counts * centres)[:-1]
    mean0 = mass / np.maximum(weight0, 1)
    mean1 = (mass[-1] + counts[-1] * centres[-1] - mass) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


def head_mask(volumes: Sequence[np.ndarray]) -> np.ndarray:
    """The head (foreground) of co-registered volumes; the method is in the module docstring."""
    foreground = np.zeros(volumes[0].shape, bool)
    for volume in volumes:
        foreground |= volume > otsu_threshold(volume)
    labelled, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = np.bincount(labelled.ravel())[1:]
    head = ndimage.binary_fill_holes(labelled == 1 + int(np.argmax(sizes)))
    for z in range(head.shape[2]):
        head[:, :, z] = ndimage.binary_fill_holes(head[:, :, z])
    return head


class NiftiSource(SourceBase):
    """BraTS-style subject folders of NIfTI volumes.

    Args:
        root: folder (path or URI) with one sub-folder per subject.
        modalities: file-name suffixes of the channels, e.g. ``["t1c"]`` or ``"t1c,flair"``.
        seg: suffix of the segmentation file (optional per subject).
        brain_mask: suffix of the brain mask file (optional per subject; ``"none"``: not read); with it,
            the slices get ``anatomy_mask`` = head minus brain.
        min_tumour_pixels: tumour pixels from which a slice is labelled "tumour".
        min_foreground_fraction: slices whose head covers less of the plane are skipped.
        clip_percentiles: intensity percentiles mapped to 0 and 65535.
        max_voxels: larger volumes are rejected (before their data is read).
    """

    name = "nifti"
    class_names = NIFTI_CLASSES
    rows_per_input = 100

    def __init__(
        self,
        root: str,
        modalities: Sequence[str] | str = ("t1c",),
        seg: str = "seg",
        brain_mask: str = "brainmask",
        min_tumour_pixels: int = 30,
        min_foreground_fraction: float = 0.01,
        clip_percentiles: Sequence[float] = (0.5, 99.5),
        max_voxels: int = DEFAULT_MAX_VOXELS,
    ) -> None:
        mods = modalities.split(",") if isinstance(modalities, str) else list(modalities)
        self.modalities = tuple(m.strip() for m in mods if m.strip())
        if not 1 <= len(self.modalities) <= 4:
            raise DataSourceError(f"nifti: 1 to 4 modalities are supported, got {self.modalities}")
        self.root = InputRoot(root)
        self.seg = seg
        off = str(brain_mask).strip().lower() in ("", "none")
        self.brain_mask = None if off else str(brain_mask).strip()
        self.min_tumour_pixels = int(min_tumour_pixels)
        self.min_foreground_fraction = float(min_foreground_fraction)
        lo, hi = (float(v) for v in clip_percentiles)
        self.clip_percentiles = (lo, hi)
        self.max_voxels = int(max_voxels)
        self._subjects = self.root.list_dirs()
        if not self._subjects:
            raise DataSourceError(f"no subject folders under {root} (expected root/<subject>/*.nii.gz)")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "root": self.root.uri,
            "modalities": list(self.modalities),
            "seg": self.seg,
            "brain_mask": self.brain_mask,
            "anatomy_mask": (
                "head (Otsu per modality, largest 3-D component, holes filled) minus brain mask, "
                "for subjects with a brain mask"
                if self.brain_mask
                else None
            ),
            "min_tumour_pixels": self.min_tumour_pixels,
            "min_foreground_fraction": self.min_foreground_fraction,
            "clip_percentiles": list(self.clip_percentiles),
            "orientation": "RAS canonical, axial slices, anterior up, subject's left on the left",
        }

    def list_inputs(self) -> list[InputRef]:
        return [InputRef(subject, subject) for subject in self._subjects]

    def read_input(self, key: str) -> list[Record] | Reject:
        try:
            return self._read(key)
        except InputError as exc:
            return Reject(key, str(exc))

    # ------------------------------------------------------------------ loading

    def _find(self, files: list[str], suffix: str, required: bool) -> str | None:
        hits = _match(files, suffix)
        if len(hits) > 1:
            names = ", ".join(posixpath.basename(h) for h in hits)
            raise InputError(f"ambiguous {suffix!r} files: {names}")
        if not hits and required:
            raise InputError(f"missing modality {suffix!r} (no *{suffix}.nii[.gz])")
        return hits[0] if hits else None

    def _load(self, rel: str) -> tuple[np.ndarray, np.ndarray]:
        """(float32 data, affine) on the file's own grid, after the shape/size/finite checks."""
        name = posixpath.basename(rel)
        try:
            image = load_nifti_bytes(self.root.read_bytes(rel))
        except InputError:
            raise
        except Exception as exc:  # nibabel/gzip report bad files with many exception types
            raise InputError(f"corrupt NIfTI {name}: {type(exc).__name__}: {exc}") from None
        shape = tuple(int(v) for v in image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise InputError(f"{name} is {len(image.shape)}-D {tuple(image.shape)}, expected a 3-D volume")
        if int(np.prod(shape)) > self.max_voxels:
            raise InputError(f"{name} has {int(np.prod(shape))} voxels, over the limit of {self.max_voxels}")
        try:
            data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        except Exception as exc:
            raise InputError(f"corrupt or truncated NIfTI {name}: {type(exc).__name__}: {exc}") from None
        if not np.isfinite(data).all():
            raise InputError(f"{name} has NaN/Inf voxels")
        return data, np.asarray(image.affine, dtype=np.float64)

    def _volumes(self, subject: str) -> _Subject:
        files = [f for f in self.root.list_files(subject) if posixpath.dirname(f) == subject]
        paths = [self._find(files, m, required=True) for m in self.modalities]
        seg_path = self._find(files, self.seg, required=False)
        brain_path = self._find(files, self.brain_mask, required=False) if self.brain_mask else None
        loaded = [self._load(p) for p in paths]
        data0, affine0 = loaded[0]
        ref_name = posixpath.basename(paths[0])
        for (data, affine), path in zip(loaded[1:], paths[1:], strict=True):
            _check_same_grid(data, affine, data0, affine0, posixpath.basename(path), ref_name)
        seg = None
        if seg_path is not None:
            seg, seg_affine = self._load(seg_path)
            _check_same_grid(seg, seg_affine, data0, affine0, posixpath.basename(seg_path), ref_name)
            if (seg < 0).any() or not np.array_equal(seg, np.round(seg)):
                raise InputError(
                    f"{posixpath.basename(seg_path)} is not a label map (non-integer or negative)"
                )
        brain = None
        if brain_path is not None:
            brain = self._brain(brain_path, data0, affine0, ref_name)
        return _Subject([d for d, _ in loaded], seg, brain, affine0, paths[0])

    def _brain(self, rel: str, ref: np.ndarray, ref_affine: np.ndarray, ref_name: str) -> np.ndarray:
        """The brain mask as bool on the modalities' grid; InputError when it cannot be used."""
        name = posixpath.basename(rel)
        data, affine = self._load(rel)
        _check_same_grid(data, affine, ref, ref_affine, f"brain mask {name}", ref_name)
        if (data < 0).any():
            raise InputError(f"brain mask {name} has negative values")
        brain = data > 0 if np.array_equal(data, np.round(data)) else data >= 0.5
        if not brain.any():
            raise InputError(f"brain mask {name} is empty (no brain voxel)")
        return brain

    # ------------------------------------------------------------------ slicing

    def _read(self, subject: str) -> list[Record]:
        loaded = self._volumes(subject)
        affine, first_path = loaded.affine, loaded.first_path
        ornt = nib.orientations.io_orientation(affine)
        canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, loaded.volumes[0].shape)
        volumes = [nib.orientations.apply_orientation(v, ornt) for v in loaded.volumes]
        head = np.any([v > v.min() for v in volumes], axis=0)
        stack = np.stack([_normalise(v, self.clip_percentiles) for v in volumes], axis=-1)
        seg = loaded.seg
        tumour = None if seg is None else nib.orientations.apply_orientation(seg, ornt) > 0
        anatomy = None
        if loaded.brain is not None:
            brain = nib.orientations.apply_orientation(loaded.brain, ornt).astype(bool)
            anatomy = (head_mask(volumes) | brain) & ~brain
        shape = stack.shape[:3]
        records = []
        for z in range(shape[2]):
            if head[:, :, z].mean() < self.min_foreground_fraction or not head[:, :, z].any():
                continue
            image = to_display(stack[:, :, z, :])
            records.append(
                self._record(subject, z, image, None if tumour is None else to_display(tumour[:, :, z]))
            )
            if anatomy is not None:
                records[-1].anatomy_mask = np.ascontiguousarray(to_display(anatomy[:, :, z])).astype(np.uint8)
            records[-1].volume_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
            records[-1].affine = canonical_affine
            records[-1].source = first_path
        if not records:
            raise InputError("no slice with enough foreground (empty volume)")
        return records

    def _record(self, subject: str, z: int, image: np.ndarray, tumour: np.ndarray | None) -> Record:
        image = image[:, :, 0] if image.shape[2] == 1 else image
        record = Record(
            image_id=f"{subject}/z{z:03d}",
            image=np.ascontiguousarray(image),
            subject_id=subject,
            slice_index=z,
        )
        if tumour is None:
            return record
        count = int(tumour.sum())
        mask = tumour.astype(np.uint8)
        if count >= self.min_tumour_pixels:
            record.label, record.boxes = 1, boxes_from_mask(mask, order="raster")
        else:
            record.label, record.boxes = 0, []
            mask[tumour] = MASK_IGNORE
        record.mask = mask
        return record


@dataclass
class _Subject:
    """One subject's volumes on the file grid: modalities, optional segmentation and brain mask."""

    volumes: list[np.ndarray]
    seg: np.ndarray | None
    brain: np.ndarray | None
    affine: np.ndarray
    first_path: str


def _check_same_grid(
    data: np.ndarray, affine: np.ndarray, ref: np.ndarray, ref_affine: np.ndarray, name: str, ref_name: str
) -> None:
    if data.shape != ref.shape:
        raise InputError(f"shape mismatch: {name} {data.shape} vs {ref_name} {ref.shape}")
    if not np.allclose(affine, ref_affine, atol=1e-3):
        codes = "".join(nib.orientations.aff2axcodes(affine))
        ref_codes = "".join(nib.orientations.aff2axcodes(ref_affine))
        raise InputError(f"affine mismatch: {name} ({codes}) vs {ref_name} ({ref_codes})")
