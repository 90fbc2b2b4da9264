"""Brain harmonisation of MRI inputs: the preprocessing a neuroimaging pipeline applies before a model.

Trained on raw slices, a classifier can tell tumour from healthy by *where the scan came from*: scalp and
skull appearance, the receive coil's bright periphery, the bias field, the field of view (the skull
shortcut of `acol_core.data.phantom`'s ``skull-shortcut`` preset, and of public 2-D tumour datasets
assembled from several sources). ``harmonize: brain`` (a training option, recorded in the export and
applied again by ``acol localize``) removes the two cues a brain pipeline always removes:

1. **skull stripping**: every pixel outside the brain is set to 0 (air), as BraTS-style data ship; the
   brain is the region the row's ``anatomy_mask`` (scalp + skull) encloses, i.e. the brain mask the
   source derived it from (`brain_region`);
2. **bias-field correction**: each channel is divided by its smooth local mean inside the brain
   (normalised convolution with a Gaussian of ``sigma`` = 1/8 of the image side, a low-order field
   like N4's), then scaled robustly (median and MAD of the brain) and mapped to [0, 1] with the brain's
   median at 0.5. Local contrast (a lesion against white matter) stays; a smooth gain does not.

A row without an anatomy mask (255 everywhere) keeps its whole foreground (pixels above 5 % of the
slice's maximum) as "brain": it is bias-corrected but not stripped. A slice with too small a brain
(< 16 pixels) becomes all zeros, as an empty slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["HARMONIZE_MODES", "brain_region", "check_harmonize", "harmonize_batch", "harmonize_slice"]

HARMONIZE_MODES = ("none", "brain")
_MIN_BRAIN = 16
_IGNORE = 255


def check_harmonize(mode: str) -> str:
    """Return ``mode`` if it is one of `HARMONIZE_MODES`, else raise ValueError naming them."""
    if mode not in HARMONIZE_MODES:
        raise ValueError(f"harmonize must be one of {', '.join(HARMONIZE_MODES)}, got {mode!r}")
    return mode


def brain_region(image: np.ndarray, anatomy: np.ndarray | None) -> np.ndarray:
    """H×W bool: the brain of a C×H×W [0, 1] slice given its H×W anatomy mask (1 = scalp/skull).

    The region the anatomy ring encloses (holes filled, ring removed); without a mask, or when the
    ring does not close (top and bottom slices), the foreground that is not anatomy.
    """
    foreground = image.max(axis=0) > 0.05 * max(float(image.max()), 1e-6)
    if anatomy is None or not (anatomy != _IGNORE).any():
        return foreground
    ring = anatomy == 1
    inside = ndimage.binary_fill_holes(ring) & ~ring
    if inside.sum() >= _MIN_BRAIN:
        return inside
    return foreground & ~ring


def harmonize_slice(image: np.ndarray, anatomy: np.ndarray | None, sigma: float | None = None) -> np.ndarray:
    """One C×H×W [0, 1] slice -> skull-stripped, bias-corrected, robustly scaled C×H×W in [0, 1]."""
    brain = brain_region(image, anatomy)
    out = np.zeros_like(image, dtype=np.float32)
    if brain.sum() < _MIN_BRAIN:
        return out
    sigma = sigma or image.shape[-1] / 8.0
    weight = brain.astype(np.float64)
    support = np.maximum(ndimage.gaussian_filter(weight, sigma, truncate=2.0), 1e-6)
    for c, channel in enumerate(image.astype(np.float64)):
        smooth = ndimage.gaussian_filter(channel * weight, sigma, truncate=2.0) / support
        corrected = channel / np.maximum(smooth, 1e-3)
        values = corrected[brain]
        median = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - median))) + 1e-6
        scaled = np.clip(0.5 + (corrected - median) / (6.0 * spread), 0.0, 1.0)
        out[c] = np.where(brain, scaled, 0.0)
    return out


def harmonize_batch(images: np.ndarray, anatomy: np.ndarray | None, mode: str) -> np.ndarray:
    """N×C×H×W [0, 1] images with their N×H×W anatomy masks (or None) -> harmonised by ``mode``."""
    if check_harmonize(mode) == "none" or len(images) == 0:
        return images
    slices = [
        harmonize_slice(image, None if anatomy is None else anatomy[i]) for i, image in enumerate(images)
    ]
    return np.stack(slices).astype(np.float32)
