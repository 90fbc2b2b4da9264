"""Score map → normalised CAM → binary mask → boxes: the project's one normalisation of maps.

Definitions follow wsolevaluation (Choe et al., CVPR 2020, ``evaluation.py``), computed with
numpy/scipy instead of OpenCV. Where this module deviates from wsolevaluation's cv2 code:

- Thresholding is ``cam >= threshold`` on the float map, compared in float64. wsolevaluation
  quantises the map to uint8 and keeps ``value > int(threshold * max)`` (cv2.THRESH_BINARY).
  With ``>=`` a pixel is "on" at threshold τ exactly when the pixel metrics (PxAP, Dice) count it
  as predicted at τ, so box and pixel metrics share one rule; at τ = 0 every pixel is on.
- A "contour" is a connected component of the mask with 8-connectivity (what cv2.findContours
  traces as one outer border). Holes yield no box of their own (cv2.RETR_TREE also returns hole
  borders as contours), and "largest" means most pixels, not cv2.contourArea's polygon area
  (which is 0 for one-pixel or one-pixel-wide blobs).
- A box is the component's inclusive pixel extent ``[x0, y0, x1, y1]``. wsolevaluation takes
  ``x + w`` from cv2.boundingRect, one pixel past the object, clipped to the image.
- A mask with no component gives no box (``[]``); wsolevaluation substitutes ``[0, 0, 0, 0]``.

Examples:
    >>> import numpy as np
    >>> cam = normalize_cam(np.array([[0.0, 2.0], [4.0, 4.0]]))
    >>> cam.tolist()
    [[0.0, 0.5], [1.0, 1.0]]
    >>> mask_to_boxes(cam_to_mask(cam, 0.5))
    [[0, 0, 1, 1]]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "as_numpy",
    "boxes_from_mask",
    "cam_to_mask",
    "localize",
    "mask_to_boxes",
    "normalize_cam",
    "resize_map",
]

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


def mask_to_boxes(mask: Any, multi_contour: bool = True) -> list[list[int]]:
    """Inclusive ``[x0, y0, x1, y1]`` boxes of the 8-connected components of a H×W mask.

    Any non-zero pixel is foreground. Boxes are sorted by component size (pixels), largest first;
    ties keep raster order. With ``multi_contour=False`` only the largest component's box is
    returned. An empty mask gives ``[]``.

    Examples:
        >>> m = np.zeros((4, 6), np.uint8); m[0, 0] = 1; m[1:3, 3:6] = 1
        >>> mask_to_boxes(m)
        [[3, 1, 5, 2], [0, 0, 0, 0]]
        >>> mask_to_boxes(m, multi_contour=False)
        [[3, 1, 5, 2]]
    """
    m = as_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {m.shape}")
    labels, count = ndimage.label(m != 0, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    if not multi_contour:
        order = order[:1]
    slices = ndimage.find_objects(labels, max_label=count)
    boxes = []
    for k in order:
        rows, cols = slices[k]
        boxes.append([int(cols.start), int(rows.start), int(cols.stop - 1), int(rows.stop - 1)])
    return boxes


def boxes_from_mask(mask: Any) -> list[list[int]]:
    """Ground-truth boxes: one per 8-connected component of the object pixels (``mask == 1``).

    Background (0) and ignore (255) pixels are not object, following the dataset's mask contract.
    """
    return mask_to_boxes(as_numpy(mask) == 1, multi_contour=True)


def localize(score_map: Any, threshold: float, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Raw map(s) → ``{"cam", "mask", "boxes"}``: resize (optional), normalise, threshold, box.

    Args:
        score_map: H×W, or N×H×W for a batch (then ``boxes`` is a list per map).
        threshold: CAM threshold in [0, 1]; pixels with ``cam >= threshold`` are object.
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
        boxes: list = mask_to_boxes(mask)
    else:
        boxes = [mask_to_boxes(m) for m in mask]
    return {"cam": cam, "mask": mask, "boxes": boxes}
