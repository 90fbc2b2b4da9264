"""Seed statistics and paired comparisons: pure numpy, no Ray, no I/O.

A claim that one method beats another needs either a mean over seeds with its spread or a paired interval
on the same images. This module gives both:

- ``mean_sd`` / ``summarize_seeds``: per metric the mean, the sample standard deviation (ddof=1; ``None``
  with fewer than two runs) and the number of runs, over the metric dicts of several runs of one recipe;
- ``paired_bootstrap``: the percentile bootstrap interval of any statistic of resampled row indices;
- ``paired_bootstrap_pxap``: the interval of PxAP(a) − PxAP(b) for two models' maps of the same images,
  resampling images (with replacement) with a fixed seed. PxAP is recomputed per resample from per-image
  pixel histograms (``pixel_histograms``), so 2,000 resamples cost a few matrix products, not 2,000
  passes over the maps. ``pxap_from_histograms`` equals ``acol_core.metrics.pxap`` on the same maps.

Examples:
    >>> summarize_seeds([{"pxap": 0.5}, {"pxap": 0.7}, {"pxap": 0.6}])["pxap"]
    {'mean': 0.6, 'sd': 0.1, 'n': 3}
    >>> maps = np.array([[[0.9, 0.1]], [[0.8, 0.3]]]); masks = np.array([[[1, 0]], [[1, 0]]])
    >>> paired_bootstrap_pxap(maps, 1.0 - maps, masks, n_boot=200, seed=0)["diff"]
    0.583333333333
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from acol_core.metrics import cam_thresholds

__all__ = [
    "flatten_metrics",
    "mean_sd",
    "paired_bootstrap",
    "paired_bootstrap_histograms",
    "paired_bootstrap_pxap",
    "pixel_histograms",
    "pxap_from_histograms",
    "summarize_seeds",
]

IGNORE = 255  # mask value left out of every pixel metric
_CHUNK = 256  # resamples per matrix product (bounds memory at _CHUNK × images)


def _round(value: float) -> float:
    # 12 significant digits: sums of floats such as 0.5 + 0.7 + 0.6 print as the number a reader expects.
    return float(f"{value:.12g}")


def mean_sd(values: Iterable[float]) -> dict[str, Any]:
    """Mean, sample sd (ddof=1, ``None`` for n < 2) and n of finite ``values``; ``None`` mean when n = 0.

    Examples:
        >>> mean_sd([1.0, 2.0, 3.0])
        {'mean': 2.0, 'sd': 1.0, 'n': 3}
        >>> mean_sd([0.4])
        {'mean': 0.4, 'sd': None, 'n': 1}
    """
    x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": _round(float(x.mean())),
        "sd": _round(float(x.std(ddof=1))) if n > 1 else None,
        "n": n,
    }


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a.b.c": value}`` (booleans and lists left out).

    Examples:
        >>> flatten_metrics({"overall": {"pxap": 0.5, "curve": [1, 2]}, "ok": True, "rows": 3})
        {'overall.pxap': 0.5, 'rows': 3.0}
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def summarize_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric (dotted path of each numeric leaf) ``{"mean", "sd", "n"}`` over the runs' metric dicts.

    A metric missing from some runs is summarised over the runs that have it (its ``n`` says how many).
    """
    flat = [flatten_metrics(run) for run in runs]
    names = sorted({name for f in flat for name in f})
    return {name: mean_sd(f[name] for f in flat if name in f) for name in names}


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float],
    n_rows: int,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap of ``statistic(index)``: rows resampled with replacement, ``n_boot`` times.

    ``statistic`` receives an int array of row indices (all rows, in order, for the point estimate) and
    returns a float, e.g. the difference of two models' metric on those rows: both models see the same
    resampled rows, which is what makes the comparison paired.

    Examples:
        >>> a = np.array([0.9, 0.8, 0.7, 0.9]); b = np.array([0.5, 0.6, 0.4, 0.5])
        >>> out = paired_bootstrap(lambda i: float(a[i].mean() - b[i].mean()), 4, n_boot=500, seed=1)
        >>> out["diff"], out["low"] > 0
        (0.325, True)
    """
    if n_rows < 1:
        raise ValueError("paired_bootstrap needs at least one row")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_rows, n_rows)) for _ in range(n_boot)], dtype=np.float64)
    return _interval(float(statistic(np.arange(n_rows))), values, n_rows, n_boot, seed, confidence)


def _interval(
    diff: float, values: np.ndarray, n_rows: int, n_boot: int, seed: int, confidence: float
) -> dict[str, Any]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail]) if n_boot else (math.nan, math.nan)
    return {
        "diff": _round(diff),
        "low": _round(float(low)),
        "high": _round(float(high)),
        "confidence": confidence,
        "n_rows": n_rows,
        "n_boot": n_boot,
        "seed": seed,
    }


def pixel_histograms(
    maps: Iterable[Any], masks: Iterable[Any], step: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, object and background pixel counts per CAM-threshold bin (255 left out).

    Bin 0 holds scores below every threshold, bin k scores in ``[τ_{k-1}, τ_k)`` for the thresholds
    ``cam_thresholds(step)`` followed by 1.0 (PxAP's). Returns two int64 arrays of shape images × bins.
    """
    thresholds = np.append(cam_thresholds(step), 1.0)
    bins = len(thresholds) + 1
    pos, neg = [], []
    for cam, mask in zip(maps, masks, strict=True):
        scores = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64), nan=0.0), 0.0, 1.0)
        m = np.asarray(mask)
        if scores.shape != m.shape:
            raise ValueError(f"map shape {scores.shape} differs from mask shape {m.shape}")
        index = np.searchsorted(thresholds, scores, side="right")
        pos.append(np.bincount(index[m == 1], minlength=bins))
        neg.append(np.bincount(index[(m != 1) & (m != IGNORE)], minlength=bins))
    shape = (0, bins)
    return (
        np.array(pos, dtype=np.int64).reshape(-1, bins) if pos else np.zeros(shape, np.int64),
        np.array(neg, dtype=np.int64).reshape(-1, bins) if neg else np.zeros(shape, np.int64),
    )


def _pxap_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """PxAP of each row of summed histograms (rows × bins), as ``acol_core.metrics.pxap`` computes it."""
    pos, neg = np.atleast_2d(pos), np.atleast_2d(neg)
    tp = np.flip(np.cumsum(np.flip(pos, 1), 1), 1)[:, 1:].astype(np.float64)
    fp = np.flip(np.cumsum(np.flip(neg, 1), 1), 1)[:, 1:].astype(np.float64)
    n_pos = pos.sum(1, keepdims=True).astype(np.float64)
    predicted = tp + fp
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    recall = np.where(n_pos > 0, tp / np.maximum(n_pos, 1), 0.0)
    recall_step = recall - np.concatenate([recall[:, 1:], np.zeros((len(recall), 1))], 1)
    return np.sum(precision * recall_step, 1)


def pxap_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """PxAP of the images whose ``pixel_histograms`` are ``pos`` and ``neg`` (images × bins)."""
    return float(_pxap_rows(np.asarray(pos).sum(0), np.asarray(neg).sum(0))[0])


def paired_bootstrap_pxap(
    maps_a: Iterable[Any],
    maps_b: Iterable[Any],
    masks: Sequence[Any],
    n_boot: int = 2000,
    seed: int = 0,
    step: float = 0.01,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Bootstrap interval of PxAP(a) − PxAP(b) over images: both models' maps of the same images.

    Returns ``{"diff", "low", "high", "pxap_a", "pxap_b", "confidence", "n_rows", "n_boot", "seed"}``.
    """
    pos_a, neg_a = pixel_histograms(maps_a, masks, step)
    pos_b, neg_b = pixel_histograms(maps_b, masks, step)
    return paired_bootstrap_histograms((pos_a, neg_a), (pos_b, neg_b), n_boot, seed, confidence)


def paired_bootstrap_histograms(
    hist_a: tuple[np.ndarray, np.ndarray],
    hist_b: tuple[np.ndarray, np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``paired_bootstrap_pxap`` from per-image histograms already computed (``pixel_histograms``)."""
    (pos_a, neg_a), (pos_b, neg_b) = hist_a, hist_b
    n = len(pos_a)
    if n < 1:
        raise ValueError("paired_bootstrap_pxap needs at least one image")
    if pos_b.shape != pos_a.shape:
        raise ValueError(f"the two models' histograms differ in shape: {pos_a.shape} vs {pos_b.shape}")
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - start)
        # Resample counts per image: weights (k × images) @ histograms (images × bins) = summed histograms.
        draws = rng.integers(0, n, (k, n))
        weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
        a = _pxap_rows(weights @ pos_a, weights @ neg_a)
        b = _pxap_rows(weights @ pos_b, weights @ neg_b)
        diffs.append(a - b)
    values = np.concatenate(diffs) if diffs else np.zeros(0)
    pxap_a, pxap_b = pxap_from_histograms(pos_a, neg_a), pxap_from_histograms(pos_b, neg_b)
    out = _interval(pxap_a - pxap_b, values, n, n_boot, seed, confidence)
    return {**out, "pxap_a": _round(pxap_a), "pxap_b": _round(pxap_b)}
