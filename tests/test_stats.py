"""Seed statistics and the paired PxAP bootstrap (``acol_core.stats``), and per-subject volume metrics
(``acol_core.subjects``) worked out by hand on two tiny subjects. Pure numpy: no dataset, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from acol_core.metrics import pxap
from acol_core.predictions import PredictionsError
from acol_core.stats import (
    mean_sd,
    paired_bootstrap,
    paired_bootstrap_pxap,
    pixel_histograms,
    pxap_from_histograms,
    summarize_seeds,
)
from acol_core.subjects import subject_metrics, subjects_csv, summarize_subjects


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.5, 0.7, 0.6], {"mean": 0.6, "sd": 0.1, "n": 3}),
        ([2.0, 4.0], {"mean": 3.0, "sd": math.sqrt(2.0), "n": 2}),  # sample sd: ddof = 1
        ([0.4], {"mean": 0.4, "sd": None, "n": 1}),
        ([], {"mean": None, "sd": None, "n": 0}),
        ([1.0, float("nan"), None, 3.0], {"mean": 2.0, "sd": math.sqrt(2.0), "n": 2}),  # not finite: left out
    ],
)
def test_mean_sd(values: list, expected: dict) -> None:
    out = mean_sd(values)
    assert out["n"] == expected["n"] and out["mean"] == pytest.approx(expected["mean"])
    assert (out["sd"] is None) == (expected["sd"] is None)
    if expected["sd"] is not None:
        assert out["sd"] == pytest.approx(expected["sd"])


def test_summarize_seeds_nested_and_missing() -> None:
    runs = [
        {"localization": {"overall": {"pxap": 0.5, "curve": [0.1]}}, "accuracy": 1.0, "gt_maps": True},
        {"localization": {"overall": {"pxap": 0.7}}, "accuracy": 0.5},
        {"localization": {"overall": {"pxap": 0.6}}},
    ]
    out = summarize_seeds(runs)
    assert set(out) == {"localization.overall.pxap", "accuracy"}  # lists and booleans are not metrics
    assert out["localization.overall.pxap"] == {"mean": 0.6, "sd": 0.1, "n": 3}
    assert out["accuracy"]["n"] == 2 and out["accuracy"]["mean"] == 0.75


def _maps(rng: np.random.Generator, n: int = 12, size: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masks = (rng.random((n, size, size)) < 0.3).astype(np.uint8)
    masks[:, 0, 0] = 255  # ignore pixels
    masks[0, 1, 1] = 1  # every image has an object pixel
    good = np.clip(masks * 0.5 + rng.random((n, size, size)) * 0.6, 0, 1)
    poor = rng.random((n, size, size))
    poor[1] = 0.25  # a constant map
    poor[2, 3, 3] = np.nan  # NaN scores count as 0
    return good, poor, masks


def test_histograms_reproduce_metrics_pxap() -> None:
    good, poor, masks = _maps(np.random.default_rng(0))
    for maps in (good, poor, np.round(good * 255) / 255):
        pos, neg = pixel_histograms(maps, masks)
        assert pos.shape == (12, 102) and pos.sum() == (masks == 1).sum()
        assert neg.sum() == (masks == 0).sum()
        assert pxap_from_histograms(pos, neg) == pytest.approx(pxap(maps, masks), abs=1e-12)
        assert pxap_from_histograms(pos[:5], neg[:5]) == pytest.approx(pxap(maps[:5], masks[:5]), abs=1e-12)


def test_paired_bootstrap_pxap_equals_the_naive_loop() -> None:
    """The histogram shortcut gives exactly the interval of recomputing PxAP on every resample."""
    good, poor, masks = _maps(np.random.default_rng(1))
    n_boot, n = 200, len(masks)
    out = paired_bootstrap_pxap(good, poor, masks, n_boot=n_boot, seed=7)
    draws = np.random.default_rng(7).integers(0, n, (n_boot, n))
    diffs = [pxap(good[d], masks[d]) - pxap(poor[d], masks[d]) for d in draws]
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert out["low"] == pytest.approx(low, abs=1e-9) and out["high"] == pytest.approx(high, abs=1e-9)
    assert out["diff"] == pytest.approx(pxap(good, masks) - pxap(poor, masks), abs=1e-9)
    assert out["low"] <= out["diff"] <= out["high"] and out["low"] > 0  # the good maps are better
    assert out["pxap_a"] == pytest.approx(pxap(good, masks), abs=1e-9)
    assert (out["n_rows"], out["n_boot"], out["seed"], out["confidence"]) == (12, 200, 7, 0.95)
    assert paired_bootstrap_pxap(good, poor, masks, n_boot=n_boot, seed=7) == out  # seeded: reproducible
    # The same maps on both sides: the difference is exactly 0 on every resample.
    same = paired_bootstrap_pxap(good, good, masks, n_boot=300, seed=0)
    assert same["diff"] == same["low"] == same["high"] == 0.0


def test_paired_bootstrap_generic_and_refusals() -> None:
    a, b = np.array([0.9, 0.8, 0.7, 0.9, 0.85]), np.array([0.5, 0.6, 0.4, 0.5, 0.55])
    out = paired_bootstrap(lambda i: float(a[i].mean() - b[i].mean()), 5, n_boot=400, seed=3)
    assert out["diff"] == pytest.approx(0.32) and 0.2 < out["low"] <= out["high"] < 0.45
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap(lambda i: 0.0, 0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(lambda i: 0.0, 3, confidence=1.5)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap_pxap([np.zeros((2, 2))], [np.zeros((3, 3))], [np.zeros((2, 2))])


# Two tiny subjects of 2×2 slices, threshold 0.5:
#   s1: slice 0 (predicted tumour)  map [[.9,.6],[.2,.1]] -> pred [[1,1],[0,0]]; GT [[1,0],[1,0]]
#       slice 1 (predicted healthy) map all .9 -> pred nothing (gated by the class); GT [[1,0],[0,255]]
#       slice 2 (predicted tumour)  map [[.1,.1],[.1,.7]]   -> pred [[0,0],[0,1]]; GT zeros (healthy slice)
#     TP 1, FP 1 + 1 = 2, FN 1 + 1 = 2 -> Dice 2/(2+2+2) = 1/3, IoU 1/5
#   s2: slices predicted healthy except slice 5 with map .6 on one pixel that is ignore (255): no GT tumour
#     -> no Dice; the ignored pixel is not a prediction: detection TN.
def _two_subjects() -> list[dict]:
    maps = [
        np.array([[0.9, 0.6], [0.2, 0.1]]),
        np.full((2, 2), 0.9),
        np.array([[0.1, 0.1], [0.1, 0.7]]),
        np.full((2, 2), 0.8),
        np.array([[0.6, 0.0], [0.0, 0.0]]),
    ]
    masks = [
        np.array([[1, 0], [1, 0]]),
        np.array([[1, 0], [0, 255]]),
        np.zeros((2, 2), np.uint8),
        np.zeros((2, 2), np.uint8),
        np.array([[255, 0], [0, 0]]),
    ]
    # Rows out of slice order, as shards may hold them.
    order = [2, 0, 4, 1, 3]
    ids = ["s1", "s1", "s1", "s2", "s2"]
    slices = [0, 1, 2, 4, 5]
    positive = [True, False, True, False, True]
    return subject_metrics(
        [ids[i] for i in order],
        [slices[i] for i in order],
        [maps[i] for i in order],
        [masks[i] for i in order],
        [positive[i] for i in order],
        0.5,
    )


def test_subject_dice_by_hand() -> None:
    s1, s2 = _two_subjects()
    assert s1 == {
        "subject_id": "s1", "slices": 3, "gt_voxels": 3, "pred_voxels": 3, "tp": 1, "fp": 2, "fn": 2,
        "dice": pytest.approx(1 / 3), "iou": pytest.approx(1 / 5), "gt_tumour": True, "pred_tumour": True,
    }  # fmt: skip
    assert s2["dice"] is None and s2["iou"] is None and not s2["gt_tumour"] and not s2["pred_tumour"]
    assert s2["pred_voxels"] == 0 and s2["slices"] == 2
    summary = summarize_subjects([s1, s2], subjects_total=3)
    assert summary["detection"] == {
        "tp": 1,
        "fp": 0,
        "fn": 0,
        "tn": 1,
        "sensitivity": 1.0,
        "specificity": 1.0,
    }
    assert summary["subjects"] == 2 and summary["subjects_with_tumour"] == 1
    assert summary["subjects_without_masks"] == 1
    assert summary["dice"] == {
        "mean": pytest.approx(1 / 3),
        "sd": None,
        "n": 1,
        "median": pytest.approx(1 / 3),
    }
    lines = subjects_csv([s1, s2]).splitlines()
    assert lines[0].startswith("subject_id,slices,gt_voxels") and lines[2].startswith(
        "s2,2,0,0,0,0,0,,,False"
    )


def test_subject_refusals_and_missing_masks() -> None:
    z = np.zeros((2, 2))
    with pytest.raises(PredictionsError, match="same slice_index"):
        subject_metrics(["a", "a"], [3, 3], [z, z], [z, z], [True, True], 0.5)
    with pytest.raises(PredictionsError, match="different sizes"):
        subject_metrics(["a", "a"], [0, 1], [z, np.zeros((3, 3))], [z, np.zeros((3, 3))], [True, True], 0.5)
    # A subject with a slice without a mask (no segmentation) is left out.
    assert subject_metrics(["a", "a"], [0, 1], [z, z], [z, None], [True, True], 0.5) == []
