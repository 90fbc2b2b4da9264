"""Map → CAM → mask → boxes: hand-computed cases and degenerate maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acol_core.localize import (
    boxes_from_mask,
    cam_to_mask,
    localize,
    mask_to_boxes,
    normalize_cam,
    resize_map,
)

NAN, INF = np.nan, np.inf


@pytest.mark.parametrize(
    ("score_map", "expected"),
    [
        ([[0.0, 2.0], [4.0, 4.0]], [[0.0, 0.5], [1.0, 1.0]]),
        ([[-3.0, -1.0], [-2.0, -3.0]], [[0.0, 1.0], [0.5, 0.0]]),
        ([[7.0, 7.0], [7.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]),  # constant
        ([[NAN, NAN], [NAN, NAN]], [[0.0, 0.0], [0.0, 0.0]]),  # all NaN
        ([[NAN, 1.0], [3.0, INF]], [[0.0, 0.0], [1.0, 1.0]]),  # NaN → 0, +inf → 1
        ([[-INF, 1.0], [3.0, 2.0]], [[0.0, 0.0], [1.0, 0.5]]),  # -inf → 0
        ([[INF, 5.0], [5.0, NAN]], [[0.0, 0.0], [0.0, 0.0]]),  # no finite variation
        ([[INF, -INF], [INF, -INF]], [[0.0, 0.0], [0.0, 0.0]]),
    ],
)
def test_normalize_cam_cases(score_map: list, expected: list) -> None:
    out = normalize_cam(np.array(score_map))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_normalize_cam_is_per_map_in_a_batch() -> None:
    batch = np.stack([np.array([[0.0, 10.0]]), np.array([[5.0, 6.0]]), np.full((1, 2), 3.0)])
    out = normalize_cam(batch)
    np.testing.assert_allclose(out, [[[0, 1]], [[0, 1]], [[0, 0]]])


def test_normalize_cam_accepts_tensors_and_empty_maps() -> None:
    out = normalize_cam(torch.tensor([[1.0, 3.0]], requires_grad=True))
    np.testing.assert_allclose(out, [[0.0, 1.0]])
    assert normalize_cam(np.zeros((2, 0, 3))).shape == (2, 0, 3)
    with pytest.raises(ValueError):
        normalize_cam(np.zeros(4))


def test_resize_map_hand_case() -> None:
    np.testing.assert_allclose(resize_map(np.array([[0.0, 1.0]]), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])


@pytest.mark.parametrize("size", [(14, 18), (4, 5), (7, 9), (20, 3), (1, 1)])
def test_resize_map_matches_torch_bilinear(size: tuple[int, int]) -> None:
    x = np.random.default_rng(0).normal(size=(3, 7, 9)).astype(np.float32)
    ours = resize_map(x, size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False
    )
    assert ours.shape == (3, *size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref[0].numpy(), atol=1e-5)


def test_resize_map_keeps_nan_local() -> None:
    x = np.zeros((8, 8))
    x[0, 0] = np.nan
    out = resize_map(x, (16, 16))
    assert np.isnan(out[:2, :2]).any() and np.isfinite(out[4:, :]).all() and np.isfinite(out[:, 4:]).all()


def test_cam_to_mask_is_inclusive_and_nan_is_off() -> None:
    cam = np.array([[0.5, 0.49999], [np.nan, 1.0]], dtype=np.float32)
    mask = cam_to_mask(cam, 0.5)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(cam_to_mask(cam, 0.0), [[1, 1], [0, 1]])


def _mask(shape: tuple[int, int], *regions: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for region in regions:
        m[region] = 1
    return m


def test_mask_to_boxes_sorted_by_area_and_largest_only() -> None:
    m = _mask((6, 8), (slice(0, 1), slice(0, 1)), (slice(3, 6), slice(3, 7)), (slice(0, 2), slice(6, 8)))
    assert mask_to_boxes(m) == [[3, 3, 6, 5], [6, 0, 7, 1], [0, 0, 0, 0]]
    assert mask_to_boxes(m, multi_contour=False) == [[3, 3, 6, 5]]


def test_mask_to_boxes_uses_8_connectivity() -> None:
    diagonal = np.eye(4, dtype=np.uint8)
    assert mask_to_boxes(diagonal) == [[0, 0, 3, 3]]


def test_mask_to_boxes_hole_gives_one_box() -> None:
    ring = _mask((6, 6), (slice(1, 5), slice(1, 5)))
    ring[2:4, 2:4] = 0
    assert mask_to_boxes(ring) == [[1, 1, 4, 4]]


def test_mask_to_boxes_ties_keep_raster_order_and_empty_is_empty() -> None:
    m = _mask((4, 6), (slice(3, 4), slice(0, 2)), (slice(0, 1), slice(4, 6)))
    assert mask_to_boxes(m) == [[4, 0, 5, 0], [0, 3, 1, 3]]
    assert mask_to_boxes(np.zeros((4, 4), np.uint8)) == []
    assert mask_to_boxes(np.zeros((4, 4), np.uint8), multi_contour=False) == []
    with pytest.raises(ValueError):
        mask_to_boxes(np.zeros((2, 2, 2)))


def test_boxes_from_mask_ignores_255_and_splits_components() -> None:
    gt = np.zeros((6, 6), np.uint8)
    gt[0:2, 0:2] = 1
    gt[4:6, 3:6] = 1
    gt[2:4, :] = 255  # ignore band between the objects is not object
    assert boxes_from_mask(gt) == [[3, 4, 5, 5], [0, 0, 1, 1]]
    assert boxes_from_mask(np.full((3, 3), 255, np.uint8)) == []
    # Raster order (what sources store): by each component's first pixel, whatever its size.
    assert boxes_from_mask(gt, order="raster") == [[0, 0, 1, 1], [3, 4, 5, 5]]
    with pytest.raises(ValueError, match="order"):
        boxes_from_mask(gt, order="area")


def test_localize_resizes_normalises_and_boxes() -> None:
    out = localize(np.array([[0.0, 1.0], [0.0, 3.0]]), 0.3, image_size=(4, 4))
    assert out["cam"].shape == (4, 4) and out["cam"].max() == 1.0 and out["cam"].min() == 0.0
    # Resized rows /3: [0, .083, .25, .333], [0, .125, .375, .5], [0, .208, .625, .833], [0, .25, .75, 1].
    np.testing.assert_array_equal(out["mask"], [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert out["boxes"] == [[2, 0, 3, 3]]


def test_localize_batch_and_degenerate_maps() -> None:
    maps = np.stack([np.full((4, 4), np.nan), np.arange(16.0).reshape(4, 4)])
    out = localize(maps, 0.5)
    assert out["cam"].shape == (2, 4, 4)
    # The NaN map is all zeros: at τ = 0.5 nothing is on; the ramp keeps its bottom half.
    assert out["boxes"] == [[], [[0, 2, 3, 3]]]
