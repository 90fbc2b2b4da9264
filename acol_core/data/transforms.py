"""Decoding and augmentation: Parquet rows (PNG bytes) -> fixed-size float batches.

The same functions run inside Ray Data's ``map_batches`` (cluster) and in a plain loop (tests, demo),
so a batch is a dict of numpy arrays, never torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from acol_core.data.codec import decode_png

__all__ = [
    "IGNORE",
    "INPUT_NORMS",
    "NORMALIZATION",
    "augment_batch",
    "bias_field",
    "check_intensity",
    "decode_rows",
    "intensity_augment",
    "describe_norm",
    "prepare_image",
    "standardize",
    "table_to_arrays",
]

IGNORE = 255


def _resize(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize C×H×W (float) or H×W (uint8 mask, nearest) to size×size."""
    if arr.shape[-2:] == (size, size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=(size, size), mode=mode, **kwargs)[0]
    out = out[0] if squeeze else out
    return out.numpy().astype(arr.dtype if mode == "nearest" else np.float32)


def prepare_image(image: np.ndarray, in_channels: int, size: int) -> np.ndarray:
    """uint8/uint16 H×W[×C] -> float32 C×size×size in [0, 1] with the model's channel count."""
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    x = image.astype(np.float32) / scale
    x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)
    if x.shape[0] == 4:  # RGBA: drop alpha
        x = x[:3]
    if x.shape[0] != in_channels:
        if in_channels == 1:
            x = x.mean(axis=0, keepdims=True)
        elif x.shape[0] == 1:
            x = np.repeat(x, in_channels, axis=0)
        else:
            raise ValueError(f"image has {x.shape[0]} channels, model expects {in_channels}")
    return _resize(x, size, "bilinear")


NORMALIZATION = "scale to [0, 1] by the dtype's maximum, then (x - 0.5) / 0.25"

# Per-channel (mean, std) applied to [0, 1] images. ``imagenet`` is what torchvision/timm weights were
# trained with; a model with another channel count than 3 (grey MRI) gets the channels' average, which
# matches ``adapt_first_conv``'s averaged RGB kernels. ``none`` leaves [0, 1] as it is.
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "phantom": ((0.5,), (0.25,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}


def _norm_stats(norm: str, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if norm not in INPUT_NORMS:
        raise ValueError(f"input norm must be one of {', '.join(INPUT_NORMS)}, got {norm!r}")
    stats = INPUT_NORMS[norm]
    if stats is None:
        return None
    mean, std = (np.asarray(v, dtype=np.float32) for v in stats)
    if len(mean) != channels:
        mean, std = np.full(channels, mean.mean(), np.float32), np.full(channels, std.mean(), np.float32)
    return mean, std


def describe_norm(norm: str) -> str:
    """The export's human-readable record of an input normalisation."""
    if norm == "phantom":
        return NORMALIZATION
    _norm_stats(norm, 1)  # validates the name
    stats = INPUT_NORMS[norm]
    if stats is None:
        return "scale to [0, 1] by the dtype's maximum"
    mean, std = stats
    return f"scale to [0, 1] by the dtype's maximum, then (x - mean) / std per channel, mean {list(mean)}, std {list(std)} ({norm})"


def standardize(images: np.ndarray, norm: str = "phantom") -> np.ndarray:
    """A fixed affine map of N×C×H×W [0, 1] images (``INPUT_NORMS[norm]``; phantom: ``NORMALIZATION``).

    Not a per-image z-score: that leaks global statistics (a lesion shifts the whole image's mean and
    std, so the background's normalised level alone gives the label away, and the class map learns
    the background). Sources normalise intensities per volume when they prepare the dataset.
    """
    stats = _norm_stats(norm, images.shape[1] if images.ndim == 4 else 1)
    if stats is None:
        return images.astype(np.float32)
    mean, std = stats
    shape = (1, -1, 1, 1) if images.ndim == 4 else (-1, 1, 1)
    return ((images - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def _mask_or_ignore(data: Any, size: int) -> np.ndarray:
    if data is None or (isinstance(data, float) and np.isnan(data)):
        return np.full((size, size), IGNORE, dtype=np.uint8)
    mask = decode_png(bytes(data))
    if mask.ndim == 3:
        mask = mask[..., 0]
    return _resize(mask.astype(np.uint8), size, "nearest")


def decode_rows(
    rows: Mapping[str, Sequence[Any]],
    in_channels: int,
    size: int,
    with_masks: bool = True,
    norm: str = "phantom",
) -> dict[str, np.ndarray]:
    """Decode a batch of dataset rows.

    Returns ``image`` N×C×S×S float32 (standardised by ``norm``), ``label`` int64, and with ``with_masks``
    ``mask`` / ``anatomy_mask`` N×S×S uint8 (255 where a row has none), ``fullsup`` bool.
    """
    images = [prepare_image(decode_png(bytes(b)), in_channels, size) for b in rows["image"]]
    out: dict[str, np.ndarray] = {
        "image": standardize(np.stack(images), norm)
        if images
        else np.zeros((0, in_channels, size, size), np.float32),
        "label": np.asarray(rows["label"], dtype=np.int64),
    }
    if with_masks:
        n = len(images)
        out["mask"] = np.stack([_mask_or_ignore(m, size) for m in rows.get("mask", [None] * n)]).reshape(
            n, size, size
        )
        anatomy = rows.get("anatomy_mask", [None] * n)
        out["anatomy_mask"] = np.stack([_mask_or_ignore(m, size) for m in anatomy]).reshape(n, size, size)
        out["fullsup"] = np.asarray(rows.get("fullsup", [False] * n), dtype=bool)
    return out


def augment_batch(
    batch: dict[str, np.ndarray],
    rng: np.random.Generator,
    max_shift: float = 0.08,
    intensity: float = 0.0,
    norm: str = "phantom",
) -> dict:
    """Random horizontal flip and small translation, applied alike to images and masks; then, with
    ``intensity`` > 0, ``intensity_augment`` on the images only (masks are left as they are).

    With ``intensity`` 0 the random draws, and so the result, are those of the geometric part alone.
    """
    intensity = check_intensity(intensity)
    out = dict(batch)
    images = batch["image"].copy()
    masks = {k: batch[k].copy() for k in ("mask", "anatomy_mask") if k in batch}
    n, _, h, w = images.shape
    for i in range(n):
        if rng.random() < 0.5:
            images[i] = images[i, :, :, ::-1]
            for m in masks.values():
                m[i] = m[i, :, ::-1]
        dy, dx = (int(v) for v in rng.integers(-int(max_shift * h), int(max_shift * h) + 1, size=2))
        if dy or dx:
            images[i] = np.roll(images[i], (dy, dx), axis=(-2, -1))
            for m in masks.values():
                m[i] = np.roll(m[i], (dy, dx), axis=(-2, -1))
    out["image"] = intensity_augment(images, rng, intensity, norm) if intensity > 0 else images
    out.update(masks)
    return out


def check_intensity(strength: float) -> float:
    """Return ``strength`` as a float if it lies in [0, 1], else raise ValueError."""
    value = float(strength)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"intensity augmentation strength must lie in [0, 1], got {strength!r}")
    return value


# Ranges at strength 1. A scanner, coil and sequence change the intensities of a head, not its shape:
# a smooth multiplicative bias field (coil sensitivity; TorchIO's RandomBiasField: order 3,
# coefficients up to 0.5), a global gain, a monotone change of tissue contrast (another sequence or
# site: fat, bone and grey/white matter move relative to each other), gamma (log γ within ±0.3, as
# TorchIO's RandomGamma) and Rician noise (magnitude images of complex Gaussian noise).
_BIAS_ORDER, _BIAS_COEFF = 3, 0.5
_GAIN, _LOG_GAMMA, _CONTRAST_KNOT, _NOISE_SIGMA = 0.2, 0.3, 0.1, 0.05


def bias_field(
    h: int, w: int, rng: np.random.Generator, order: int = _BIAS_ORDER, coeff: float = _BIAS_COEFF
) -> np.ndarray:
    """A smooth multiplicative field exp(Σ c_ij x^i y^j), i + j <= ``order``, c_ij ~ U(−coeff, coeff)."""
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    log_field = np.zeros((h, w))
    for i in range(order + 1):
        for j in range(order + 1 - i):
            log_field += rng.uniform(-coeff, coeff) * x**i * y**j
    return np.exp(log_field).astype(np.float32)


def intensity_augment(
    images: np.ndarray, rng: np.random.Generator, strength: float = 1.0, norm: str = "phantom"
) -> np.ndarray:
    """Per image: contrast remap, gamma, bias field, gain and Rician noise, at ``strength`` in [0, 1].

    ``images`` are standardised N×C×H×W (``standardize`` with ``norm``); each is mapped back to [0, 1],
    changed, clipped to [0, 1] and standardised again, so the output range is the input's. Strength 0 returns a copy.
    Nothing here knows where the skull is: every transform acts on the whole image alike (the bias field
    smoothly), as a scanner does.
    """
    strength = check_intensity(strength)
    out = images.astype(np.float32, copy=True)
    if strength == 0 or out.size == 0:
        return out
    knots = np.linspace(0.0, 1.0, 5)
    n, c, h, w = out.shape
    stats = _norm_stats(norm, c)
    mean, std = (
        (np.zeros((c, 1, 1)), np.ones((c, 1, 1))) if stats is None else (s.reshape(-1, 1, 1) for s in stats)
    )
    for i in range(n):
        x = np.clip(out[i] * std + mean, 0.0, 1.0)
        inner = knots[1:-1] + rng.uniform(-1, 1, size=3) * _CONTRAST_KNOT * strength
        x = np.interp(x, knots, np.concatenate([[0.0], np.sort(inner), [1.0]])).astype(np.float32)
        x = x ** np.float32(np.exp(rng.uniform(-1, 1) * _LOG_GAMMA * strength))
        x = x * bias_field(h, w, rng, coeff=_BIAS_COEFF * strength)
        x = x * np.float32(1.0 + rng.uniform(-1, 1) * _GAIN * strength)
        sigma = rng.uniform(0, _NOISE_SIGMA * strength)
        real = x + rng.normal(0.0, sigma, size=x.shape)
        x = np.sqrt(real**2 + rng.normal(0.0, sigma, size=x.shape) ** 2)
        out[i] = (np.clip(x, 0.0, 1.0) - mean) / std
    return out


def table_to_arrays(
    table: Any, in_channels: int, size: int, with_masks: bool = True
) -> dict[str, np.ndarray]:
    """Decode a whole (small) pyarrow table in memory; the plain-process path of tests and the demo."""
    columns = [c for c in ("image", "label", "mask", "anatomy_mask", "fullsup") if c in table.column_names]
    arrays = decode_rows(table.select(columns).to_pydict(), in_channels, size, with_masks=with_masks)
    arrays["image_id"] = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    return arrays
