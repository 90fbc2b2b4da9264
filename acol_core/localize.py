"""Score map → normalised CAM → binary mask → boxes: the project's one normalisation of maps.

Two ways to turn a map into boxes at a CAM threshold τ (``BOX_PROTOCOLS``):

- ``"wsol"`` (the default, and what every box metric uses): wsolevaluation's exactly (Choe et al.,
  CVPR 2020, ``evaluation.compute_bboxes_from_scoremaps``). The map in [0, 1] is quantised to
  ``uint8(cam · 255)`` (truncation); a pixel is on when its value is ``> int(τ · max)``, where ``max``
  is the quantised map's maximum (cv2.THRESH_BINARY relative to the peak); boxes come from OpenCV's
  contours (``cv2.findContours`` with RETR_TREE and CHAIN_APPROX_SIMPLE, so the border of a hole is a
  contour too); the single-box variant keeps the contour of largest ``cv2.contourArea`` (the first
  one on ties); each box is ``cv2.boundingRect``'s ``[x, y, x + w, y + h]`` with the right and bottom
  edges clipped to ``W - 1`` and ``H - 1`` (one pixel past the object unless at the border); a mask
  with no contour gives the box ``[0, 0, 0, 0]``.
- ``"components"``: ``cam >= τ`` on the float map (the rule of the pixel metrics), 8-connected
  components (holes give no box), largest by pixel count, inclusive pixel extents, no box when empty.

Examples:
    >>> import numpy as np
    >>> cam = normalize_cam(np.array([[0.0, 2.0], [4.0, 4.0]]))
    >>> cam.tolist()
    [[0.0, 0.5], [1.0, 1.0]]
    >>> mask_to_boxes(cam_to_mask(cam, 0.5))
    [[0, 0, 1, 1]]
    >>> m = np.zeros((6, 6)); m[1:3, 1:4] = 1.0
    >>> scoremap_boxes(m, 0.5), scoremap_boxes(m, 0.5, protocol="components")
    ([[1, 1, 4, 3]], [[1, 1, 3, 2]])
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy import ndimage

__all__ = [
    "BOX_PROTOCOLS",
    "as_numpy",
    "boxes_from_mask",
    "cam_to_mask",
    "check_protocol",
    "localize",
    "mask_to_boxes",
    "normalize_cam",
    "predicted_boxes",
    "quantize_scoremap",
    "resize_map",
    "scoremap_boxes",
    "wsol_boxes",
]

BOX_PROTOCOLS = ("wsol", "components")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def normalize_cam(score_map: Any) -> np.ndarray:
    """Min-max normalise each map (the last two axes) to [0, 1], float32.

    Only finite values set the range. ``+inf`` becomes 1, ``-inf`` and NaN become 0. A map without
    finite variation (constant, all NaN, empty) becomes all zeros: it says nothing about where
    the object is. Never raises on degenerate values.

    Args:
        score_map: H×W, N×H×W or any ``…×H×W`` array or tensor.

    Examples:
        >>> normalize_cam(np.full((2, 2), 7.0)).tolist()
        [[0.0, 0.0], [0.0, 0.0]]
        >>> normalize_cam(np.array([[np.nan, 1.0], [3.0, np.inf]])).tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """
    x = as_numpy(score_map).astype(np.float64)
    if x.ndim < 2:
        raise ValueError(f"score_map must have at least 2 dimensions (…×H×W), got shape {x.shape}")
    finite = np.isfinite(x)
    axes = (-2, -1)
    # Reductions over empty maps (H or W = 0) warn and give inf; the ratio is all-zero anyway.
    with np.errstate(invalid="ignore"):
        lo = np.where(finite, x, np.inf).min(axis=axes, keepdims=True, initial=np.inf)
        hi = np.where(finite, x, -np.inf).max(axis=axes, keepdims=True, initial=-np.inf)
    span = hi - lo
    varies = np.isfinite(span) & (span > 0)
    safe_lo = np.where(varies, lo, 0.0)
    safe_span = np.where(varies, span, 1.0)
    with np.errstate(invalid="ignore"):
        out = (np.where(finite, x, 0.0) - safe_lo) / safe_span
    out = np.where(x == np.inf, 1.0, out)
    out = np.where(finite | (x == np.inf), out, 0.0)
    out = np.where(varies, out, 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _source_index(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights of torch's bilinear sampling with ``align_corners=False``."""
    scale = in_len / out_len
    src = np.maximum((np.arange(out_len) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, src - i0


def resize_map(score_map: Any, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes to ``size = (height, width)``, float32.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    without antialiasing, in numpy; a non-finite value only spreads to its neighbours.

    Examples:
        >>> resize_map(np.array([[0.0, 1.0]]), (1, 4)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    x = as_numpy(score_map).astype(np.float64)
    out_h, out_w = (int(s) for s in size)
    if x.ndim < 2 or min(x.shape[-2:]) < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"cannot resize a map of shape {x.shape} to {(out_h, out_w)}")
    y0, y1, wy = _source_index(out_h, x.shape[-2])
    x0, x1, wx = _source_index(out_w, x.shape[-1])
    wy, wx = wy[:, None], wx[None, :]
    top = x[..., y0, :][..., x0] * (1 - wx) + x[..., y0, :][..., x1] * wx
    bottom = x[..., y1, :][..., x0] * (1 - wx) + x[..., y1, :][..., x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def cam_to_mask(cam: Any, threshold: float) -> np.ndarray:
    """uint8 0/1 mask of ``cam >= threshold`` (float64 comparison; NaN is never on), any shape."""
    with np.errstate(invalid="ignore"):
        return (as_numpy(cam).astype(np.float64) >= float(threshold)).astype(np.uint8)


def mask_to_boxes(mask: Any, multi_contour: bool = True, order: str = "size") -> list[list[int]]:
    """Inclusive ``[x0, y0, x1, y1]`` boxes of the 8-connected components of a H×W mask.

    Any non-zero pixel is foreground. With ``order="size"`` boxes are sorted by component size
    (pixels), largest first, ties in raster order; with ``order="raster"`` they come in raster order of
    each component's first pixel (the order datasets store GT boxes in). With ``multi_contour=False``
    only the first box (the largest, by default) is returned. An empty mask gives ``[]``.

    Examples:
        >>> m = np.zeros((4, 6), np.uint8); m[0, 0] = 1; m[1:3, 3:6] = 1
        >>> mask_to_boxes(m)
        [[3, 1, 5, 2], [0, 0, 0, 0]]
        >>> mask_to_boxes(m, multi_contour=False)
        [[3, 1, 5, 2]]
    """
    if order not in ("size", "raster"):
        raise ValueError(f"order must be size or raster, got {order!r}")
    m = as_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {m.shape}")
    labels, count = ndimage.label(m != 0, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    if order == "size":
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        ranked = np.argsort(-sizes, kind="stable")
    else:
        ranked = np.arange(count)
    if not multi_contour:
        ranked = ranked[:1]
    slices = ndimage.find_objects(labels, max_label=count)
    boxes = []
    for k in ranked:
        rows, cols = slices[k]
        boxes.append([int(cols.start), int(rows.start), int(cols.stop - 1), int(rows.stop - 1)])
    return boxes


def quantize_scoremap(cam: Any) -> np.ndarray:
    """wsolevaluation's ``uint8(cam · 255)`` of a map in [0, 1] (NaN → 0, values clipped first)."""
    scores = np.clip(np.nan_to_num(as_numpy(cam).astype(np.float64), nan=0.0), 0.0, 1.0)
    return (scores * 255).astype(np.uint8)


def wsol_boxes(
    quantized: np.ndarray, threshold: float, multi_contour: bool, fallback: bool = True
) -> list[list[int]]:
    """wsolevaluation's boxes of a quantised map (``quantize_scoremap``) at CAM threshold ``threshold``.

    A map with no pixel above the threshold gives ``[[0, 0, 0, 0]]`` (the metric's fallback, a box of
    one pixel that can still overlap a ground-truth box), or ``[]`` with ``fallback=False``.
    """
    height, width = quantized.shape
    cut = int(float(threshold) * float(quantized.max()))
    binary = np.where(quantized > cut, 255, 0).astype(np.uint8)
    # [-2]: OpenCV 3 returns (image, contours, hierarchy), OpenCV 4 (contours, hierarchy).
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return [[0, 0, 0, 0]] if fallback else []
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([int(x), int(y), int(min(x + w, width - 1)), int(min(y + h, height - 1))])
    return boxes


def scoremap_boxes(
    cam: Any, threshold: float, multi_contour: bool = True, protocol: str = "wsol"
) -> list[list[int]]:
    """Predicted boxes of one H×W map in [0, 1] at CAM threshold ``threshold`` (see the module docstring).

    Args:
        protocol: ``"wsol"`` (wsolevaluation's, the default) or ``"components"``.
    """
    check_protocol(protocol)
    if protocol == "wsol":
        return wsol_boxes(quantize_scoremap(cam), threshold, multi_contour)
    return mask_to_boxes(cam_to_mask(cam, threshold), multi_contour=multi_contour)


def predicted_boxes(cam: Any, threshold: float) -> list[list[int]]:
    """The boxes a predictions row stores: every contour's wsolevaluation box at τ, ``[]`` if none."""
    return wsol_boxes(quantize_scoremap(cam), threshold, multi_contour=True, fallback=False)


def check_protocol(protocol: str) -> None:
    """Raise ``ValueError`` for a box protocol other than ``BOX_PROTOCOLS``."""
    if protocol not in BOX_PROTOCOLS:
        raise ValueError(f"unknown box protocol {protocol!r}: choose one of {', '.join(BOX_PROTOCOLS)}")


def boxes_from_mask(mask: Any, order: str = "size") -> list[list[int]]:
    """Ground-truth boxes: one per 8-connected component of the object pixels (``mask == 1``), inclusive
    ``[x0, y0, x1, y1]``, in ``order`` (see ``mask_to_boxes``; sources store them in raster order).

    Background (0) and ignore (255) pixels are not object, following the dataset's mask contract.
    """
    return mask_to_boxes(as_numpy(mask) == 1, multi_contour=True, order=order)


def localize(score_map: Any, threshold: float, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Raw map(s) → ``{"cam", "mask", "boxes"}``: resize (optional), normalise, threshold, box.

    Args:
        score_map: H×W, or N×H×W for a batch (then ``boxes`` is a list per map).
        threshold: CAM threshold in [0, 1]; pixels with ``cam >= threshold`` are object in ``mask``;
            ``boxes`` are wsolevaluation's boxes of every contour at that threshold (``wsol_boxes``),
            ``[]`` where no pixel is above it.
        image_size: ``(height, width)`` to resize to before normalising, or None to keep the size.

    Examples:
        >>> out = localize(np.array([[0.0, 1.0], [0.0, 3.0]]), 0.3, image_size=(4, 4))
        >>> out["boxes"]
        [[2, 0, 3, 3]]
    """
    raw = as_numpy(score_map)
    if raw.ndim not in (2, 3):
        raise ValueError(f"score_map must be H×W or N×H×W, got shape {raw.shape}")
    if image_size is not None:
        raw = resize_map(raw, image_size)
    cam = normalize_cam(raw)
    mask = cam_to_mask(cam, threshold)
    if mask.ndim == 2:
        boxes: list = predicted_boxes(cam, threshold)
    else:
        boxes = [predicted_boxes(c, threshold) for c in cam]
    return {"cam": cam, "mask": mask, "boxes": boxes}
