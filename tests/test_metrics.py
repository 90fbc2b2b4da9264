"""WSOL metrics against hand-computed cases, brute-force references and degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from acol_core.localize import (
    BOX_PROTOCOLS,
    normalize_cam,
    predicted_boxes,
    quantize_scoremap,
    scoremap_boxes,
)
from acol_core.metrics import (
    best_dice,
    box_iou_matrix,
    cam_thresholds,
    center_gaussian_baseline,
    classification_accuracy,
    dice_iou_at,
    dice_iou_curve,
    gt_known_loc,
    max_box_acc,
    max_box_acc_v2,
    off_target_share,
    off_target_share_per_image,
    pixel_pr_curve,
    pxap,
    top1_loc,
)

# ---------------------------------------------------------------- IoU


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([1, 2, 5, 6], [3, 1, 4, 5], 8 / 27),  # wsolevaluation's own test case
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # one pixel is a box of area 1
        ([0, 0, 1, 1], [1, 0, 2, 1], 2 / 6),  # sharing one column overlaps (inclusive corners)
        ([0, 0, 1, 1], [2, 0, 3, 1], 0.0),  # adjacent, no overlap
        ([2, 2, 5, 5], [0, 0, 7, 7], 16 / 64),
    ],
)
def test_box_iou_inclusive_corners(a: list[int], b: list[int], iou: float) -> None:
    assert box_iou_matrix([a], [b])[0, 0] == pytest.approx(iou)
    assert box_iou_matrix([b], [a])[0, 0] == pytest.approx(iou)


def test_box_iou_matrix_shape_and_degenerate_union() -> None:
    ious = box_iou_matrix([[1, 1, 3, 3], [4, 4, 5, 5]], [[1, 1, 3, 3], [4, 4, 5, 5], [9, 9, 9, 9]])
    np.testing.assert_allclose(ious, [[1, 0, 0], [0, 1, 0]])
    assert box_iou_matrix([[3, 3, 1, 1]], [[3, 3, 1, 1]])[0, 0] == 0.0  # inverted box: union <= 0
    assert box_iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


# ---------------------------------------------------------------- MaxBoxAcc

STEP = 0.25  # thresholds 0, .25, .5, .75


def _nested_square() -> tuple[np.ndarray, list[list[int]]]:
    """8×8: 0.4 on a 4×4 square, 0.9 on its central 2×2; GT = the 4×4 square.

    IoU per threshold: τ=0 whole image 16/64, τ=.25 exact 1, τ=.5 and .75 the 2×2: 4/16.
    """
    cam = np.zeros((8, 8))
    cam[2:6, 2:6] = 0.4
    cam[3:5, 3:5] = 0.9
    return cam, [[2, 2, 5, 5]]


def _left_columns() -> tuple[np.ndarray, list[list[int]]]:
    """8×8: 1.0 on columns 0–1; GT = columns 0–3. IoU is 32/64 at τ=0 and 16/32 above: always 0.5."""
    cam = np.zeros((8, 8))
    cam[:, :2] = 1.0
    return cam, [[0, 0, 3, 7]]


def test_max_box_acc_hand_computed_two_images() -> None:
    """wsolevaluation's protocol, worked by hand.

    Image 1 quantises to 102 (the 4×4 square) and 229 (its centre); the cut is int(τ · 229): 0 and 57
    keep the square, whose boundingRect box is [2, 2, 6, 6] (x + w, one pixel past the object): IoU
    16/25; 114 and 171 keep the centre, box [3, 3, 5, 5]: IoU 9/16. Image 2's columns give
    [0, 0, 2, 7] (the bottom edge clipped to H - 1) at every τ: IoU 24/32.
    """
    (c1, b1), (c2, b2) = _nested_square(), _left_columns()
    out = max_box_acc(np.stack([c1, c2]), [b1, b2], iou_thresholds=(0.3, 0.5, 0.7, 0.6), step=STEP)
    np.testing.assert_allclose(out["thresholds"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(out["curve"][0.3], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(out["curve"][0.6], [1.0, 1.0, 0.5, 0.5])  # 16/25 ≥ .6 > 9/16
    np.testing.assert_allclose(out["curve"][0.7], [0.5, 0.5, 0.5, 0.5])
    assert out["per_iou"] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.5, 0.6: 1.0}
    assert out["best_threshold"] == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0, 0.6: 0.0}


def test_components_protocol_hand_computed_two_images() -> None:
    """The named alternative: ``cam >= τ``, inclusive extents (τ=0 switches every pixel on)."""
    (c1, b1), (c2, b2) = _nested_square(), _left_columns()
    out = max_box_acc(
        np.stack([c1, c2]), [b1, b2], iou_thresholds=(0.3, 0.5, 0.7), step=STEP, protocol="components"
    )
    np.testing.assert_allclose(out["curve"][0.3], [0.5, 1.0, 0.5, 0.5])
    np.testing.assert_allclose(out["curve"][0.5], [0.5, 1.0, 0.5, 0.5])  # IoU exactly 0.5 counts
    np.testing.assert_allclose(out["curve"][0.7], [0.0, 0.5, 0.0, 0.0])
    assert out["per_iou"] == {0.3: 1.0, 0.5: 1.0, 0.7: 0.5}
    assert out["best_threshold"] == {0.3: 0.25, 0.5: 0.25, 0.7: 0.25}
    assert out["mean"] == pytest.approx(2.5 / 3)


def test_image_without_gt_box_is_a_miss() -> None:
    c1, b1 = _nested_square()
    for protocol in BOX_PROTOCOLS:
        for missing in ([], None):
            out = max_box_acc(np.stack([c1, c1, c1]), [b1, b1, missing], step=STEP, protocol=protocol)
            assert out["per_iou"][0.5] == pytest.approx(2 / 3)


def test_multi_contour_finds_the_small_object_largest_contour_misses_it() -> None:
    cam = np.zeros((8, 8))
    cam[0:4, 0:4] = 1.0  # big distractor, 16 px
    cam[6:8, 6:8] = 1.0  # the object, 4 px
    gt = [[[6, 6, 7, 7]]]
    largest = max_box_acc(cam[None], gt, multi_contour=False, step=0.5)
    multi = max_box_acc(cam[None], gt, multi_contour=True, step=0.5)
    # wsol: zeros are never on (value > cut), so τ=0 already separates the two blobs.
    np.testing.assert_allclose(largest["curve"][0.5], [0.0, 0.0])
    np.testing.assert_allclose(multi["curve"][0.5], [1.0, 1.0])
    assert max_box_acc_v2(cam[None], gt, step=0.5)["mean"] == 1.0
    # components: τ=0 switches every pixel on, one full-image box (IoU 4/64).
    multi = max_box_acc(cam[None], gt, multi_contour=True, step=0.5, protocol="components")
    np.testing.assert_allclose(multi["curve"][0.5], [0.0, 1.0])


def test_largest_contour_is_by_polygon_area_not_pixel_count() -> None:
    """An 8-pixel line has contourArea 0, a 2×2 square 1: the reference keeps the square."""
    cam = np.zeros((8, 8))
    cam[0, :] = 1.0
    cam[5:7, 5:7] = 1.0
    gt = [[[5, 5, 7, 7]]]  # the square's wsol box [5, 5, 7, 7]
    assert max_box_acc(cam[None], gt, step=0.5)["per_iou"][0.5] == 1.0
    assert max_box_acc(cam[None], gt, step=0.5, protocol="components")["per_iou"][0.5] == 0.0


def test_hole_borders_are_contours_in_the_wsol_protocol() -> None:
    """RETR_TREE returns the hole's border too: its box [2, 2, 6, 6] matches GT [2, 2, 5, 5] (IoU 16/25)."""
    cam = np.zeros((8, 8))
    cam[1:7, 1:7] = 1.0
    cam[3:5, 3:5] = 0.0
    gt = [[[2, 2, 5, 5]]]
    assert scoremap_boxes(cam, 0.5) == [[1, 1, 7, 7], [2, 2, 6, 6]]
    assert max_box_acc_v2(cam[None], gt, step=0.5)["per_iou"][0.5] == 1.0
    # The component's inclusive extent [1, 1, 6, 6] overlaps 16/36 < .5.
    assert max_box_acc_v2(cam[None], gt, step=0.5, protocol="components")["per_iou"][0.5] == 0.0


def test_threshold_is_relative_to_the_quantised_maximum() -> None:
    """A map peaking at 0.4: wsol cuts at int(τ · 102), so τ=0.5 still keeps the peak; ``>=`` keeps none."""
    cam = np.zeros((8, 8))
    cam[2:4, 2:4] = 0.4
    gt = [[[2, 2, 4, 4]]]
    wsol = max_box_acc(cam[None], gt, step=0.5)
    np.testing.assert_allclose(wsol["curve"][0.5], [1.0, 1.0])
    comp = max_box_acc(cam[None], gt, step=0.5, protocol="components")
    np.testing.assert_allclose(comp["curve"][0.5], [0.0, 0.0])  # τ=0 all on; τ=.5 nothing on


def test_quantisation_truncates_before_thresholding() -> None:
    """0.199 · 255 = 50.7 quantises to 50; at τ = 0.198 the cut is int(0.198 · 255) = 50 and 50 > 50
    fails, although the float map is above τ there (the components rule keeps that blob)."""
    cam = np.zeros((4, 8))
    cam[:, 0:2] = 1.0
    cam[:, 4:6] = 0.199
    q = quantize_scoremap(cam)
    assert q[0, 0] == 255 and q[0, 4] == 50
    assert scoremap_boxes(cam, 0.196) == [[4, 0, 6, 3], [0, 0, 2, 3]]  # cut 49: both blobs
    assert scoremap_boxes(cam, 0.198) == [[0, 0, 2, 3]]
    assert scoremap_boxes(cam, 0.198, protocol="components") == [[0, 0, 1, 3], [4, 0, 5, 3]]


def test_no_contour_gives_the_zero_box_fallback() -> None:
    zero = np.zeros((1, 8, 8))
    # Nothing is above the cut at any τ: the box is [0, 0, 0, 0], one pixel, which a GT box there hits.
    out = max_box_acc(zero, [[[0, 0, 0, 0]]], step=STEP)
    np.testing.assert_allclose(out["curve"][0.5], [1.0, 1.0, 1.0, 1.0])
    out = max_box_acc(zero, [[[0, 0, 7, 7]]], step=STEP)
    assert out["per_iou"][0.5] == 0.0
    assert scoremap_boxes(zero[0], 0.5) == [[0, 0, 0, 0]]
    assert predicted_boxes(zero[0], 0.5) == []


def test_no_component_in_the_components_protocol() -> None:
    zero = np.zeros((1, 8, 8))
    # τ=0 switches every pixel on (cam >= 0): a full-image box; above it there is no component.
    out = max_box_acc(zero, [[[0, 0, 7, 7]]], step=STEP, protocol="components")
    np.testing.assert_allclose(out["curve"][0.5], [1.0, 0.0, 0.0, 0.0])
    out = max_box_acc(zero, [[[2, 2, 5, 5]]], step=STEP, protocol="components")
    assert out["per_iou"][0.5] == 0.0


def test_cached_cuts_equal_per_threshold_boxes_on_random_maps() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        cam = normalize_cam(ndimage.gaussian_filter(rng.random((24, 20)), 2))
        gt = np.array([[3, 4, 12, 15], [14, 2, 19, 9]])
        curve = max_box_acc_v2(cam[None], [gt.tolist()])["curve"]
        for k, tau in enumerate(cam_thresholds()):
            iou = box_iou_matrix(scoremap_boxes(cam, tau), gt).max()
            for t in (0.3, 0.5, 0.7):
                assert curve[t][k] == float(iou >= t)


def test_unknown_protocol_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown box protocol"):
        max_box_acc(np.zeros((1, 4, 4)), [[[0, 0, 1, 1]]], protocol="cv3")


def test_max_box_acc_nan_map_and_normalize_cam_agree() -> None:
    nan_map = np.full((1, 8, 8), np.nan)
    gt = [[[2, 2, 5, 5]]]
    raw = max_box_acc(nan_map, gt, step=STEP)
    normalised = max_box_acc(normalize_cam(nan_map), gt, step=STEP)
    np.testing.assert_allclose(raw["curve"][0.5], normalised["curve"][0.5])
    assert raw["per_iou"][0.5] == 0.0


def test_max_box_acc_empty_input_and_length_mismatch() -> None:
    out = max_box_acc(np.zeros((0, 8, 8)), [], iou_thresholds=(0.3, 0.5), step=STEP)
    assert out["per_iou"] == {0.3: 0.0, 0.5: 0.0} and out["mean"] == 0.0
    with pytest.raises(ValueError):
        max_box_acc(np.zeros((2, 8, 8)), [[[0, 0, 1, 1]]])


def test_max_box_acc_accepts_maps_of_different_sizes() -> None:
    (c1, b1), (c2, _) = _nested_square(), _left_columns()
    out = max_box_acc([c1, c2[:, :6]], [b1, [[0, 0, 1, 7]]], step=STEP)
    assert out["per_iou"][0.5] == 1.0


def test_default_thresholds() -> None:
    t = cam_thresholds(0.01)
    assert len(t) == 100 and t[0] == 0.0 and t[-1] == pytest.approx(0.99)
    with pytest.raises(ValueError):
        cam_thresholds(0.0)


def test_gt_known_and_top1_loc() -> None:
    (c1, b1), (c2, b2) = _nested_square(), _left_columns()
    cams, boxes = np.stack([c1, c2, c1]), [b1, b2, [[0, 0, 0, 0]]]
    # wsol at τ=.25: image 1 IoU 16/25, image 2 24/32, image 3 misses; at τ=.5 image 1 has 9/16.
    assert gt_known_loc(cams, boxes, 0.25) == pytest.approx(2 / 3)
    assert gt_known_loc(cams, boxes, 0.25, iou_threshold=0.7) == pytest.approx(1 / 3)
    assert gt_known_loc(cams, boxes, 0.5) == pytest.approx(2 / 3)
    assert gt_known_loc(cams, boxes, 0.5, iou_threshold=0.6) == pytest.approx(1 / 3)
    # components at τ=.25: image 1 IoU 1, image 2 0.5; at τ=.5 image 1 drops to 0.25.
    assert gt_known_loc(cams, boxes, 0.25, protocol="components") == pytest.approx(2 / 3)
    assert gt_known_loc(cams, boxes, 0.5, protocol="components") == pytest.approx(1 / 3)
    pred, gt = np.array([1, 0, 1]), np.array([1, 1, 1])
    assert top1_loc(cams, boxes, pred, gt, 0.25) == pytest.approx(1 / 3)  # image 2 hits but is misclassified
    assert top1_loc(cams, boxes, gt, gt, 0.25) == gt_known_loc(cams, boxes, 0.25)
    assert gt_known_loc(np.zeros((0, 4, 4)), [], 0.5) == 0.0


def test_gt_known_loc_matches_the_max_box_acc_curve() -> None:
    rng = np.random.default_rng(1)
    cams = normalize_cam(rng.random((4, 8, 8)))
    boxes = [[[1, 1, 5, 5]], [[0, 0, 7, 3]], [[2, 4, 6, 7]], []]
    out = max_box_acc(cams, boxes, iou_thresholds=(0.3,), multi_contour=True, step=STEP)
    for k, tau in enumerate(out["thresholds"]):
        assert gt_known_loc(cams, boxes, tau, 0.3, multi_contour=True) == out["curve"][0.3][k]


# ---------------------------------------------------------------- PxAP and the PR curve


def _square_case() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:6, 2:6] = 1  # 16 of 64 pixels
    return mask.astype(np.float64), mask


def test_pxap_perfect_reversed_and_constant_maps() -> None:
    cam, mask = _square_case()
    assert pxap(cam, mask) == 1.0
    assert pxap(1.0 - cam, mask) == pytest.approx(16 / 64)  # only τ=0 recalls anything
    for value in (0.0, 0.5, 1.0):  # as wsolevaluation: a constant map scores the object fraction
        assert pxap(np.full_like(cam, value), mask) == pytest.approx(16 / 64)


def test_pxap_hand_computed() -> None:
    cams = np.array([[[0.9, 0.6, 0.7, 0.1, 0.3]]])
    masks = np.array([[[1, 1, 0, 0, 1]]], np.uint8)
    curve = pixel_pr_curve(cams, masks, step=0.5)
    np.testing.assert_allclose(curve["thresholds"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(curve["precision"], [3 / 5, 2 / 3, 1.0])  # nothing predicted at 1.0: 1
    np.testing.assert_allclose(curve["recall"], [1.0, 2 / 3, 0.0])
    assert pxap(cams, masks, step=0.5) == pytest.approx(3 / 5 * (1 - 2 / 3) + 2 / 3 * 2 / 3)


def test_pxap_matches_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    cams = rng.random((3, 9, 7))
    masks = (rng.random((3, 9, 7)) < 0.3).astype(np.uint8)
    masks[rng.random((3, 9, 7)) < 0.1] = 255
    step = 0.1
    thresholds = np.append(np.arange(0, 1, step), 1.0)
    valid, pos = masks != 255, masks == 1
    precision, recall = [], []
    for t in thresholds:
        predicted = (cams >= t) & valid
        tp = (predicted & pos).sum()
        precision.append(tp / predicted.sum() if predicted.sum() else 1.0)
        recall.append(tp / pos.sum())
    recall_next = np.append(recall[1:], 0.0)
    expected = float(np.sum(np.array(precision) * (np.array(recall) - recall_next)))
    curve = pixel_pr_curve(cams, masks, step=step)
    np.testing.assert_allclose(curve["precision"], precision)
    np.testing.assert_allclose(curve["recall"], recall)
    assert pxap(cams, masks, step=step) == pytest.approx(expected)


def test_pxap_ignores_255_pixels() -> None:
    cam, mask = _square_case()
    ignored = mask.copy()
    ignored[0, :, 6:] = 255
    rng = np.random.default_rng(0)
    base = pxap(cam, ignored)
    assert base == 1.0
    noisy = cam.copy()
    noisy[0, :, 6:] = rng.random((8, 2))  # changing scores under 255 changes nothing
    assert pxap(noisy, ignored) == base
    half = 0.5 * cam + 0.25
    half_noisy = half.copy()
    half_noisy[0, :, 6:] = 1.0
    assert pxap(half_noisy, ignored) == pxap(half, ignored)


def test_pxap_degenerate_masks_and_maps() -> None:
    cam, mask = _square_case()
    assert pxap(cam, np.zeros_like(mask)) == 0.0  # no object pixel
    assert pxap(cam, np.full_like(mask, 255)) == 0.0  # everything ignored
    assert pxap(np.zeros((0, 8, 8)), np.zeros((0, 8, 8), np.uint8)) == 0.0
    nan_cam = normalize_cam(np.full((1, 8, 8), np.nan))
    assert pxap(nan_cam, mask) == pytest.approx(16 / 64)  # NaN map → zeros → constant map
    assert pxap(np.full((1, 8, 8), np.nan), mask) == pytest.approx(16 / 64)
    with pytest.raises(ValueError):
        pxap(cam, mask[:, :4])


# ---------------------------------------------------------------- Dice / IoU


def test_dice_iou_hand_computed() -> None:
    cams = np.array([[[0.9, 0.6, 0.7, 0.1, 0.3, 0.9]]])
    masks = np.array([[[1, 1, 0, 0, 1, 255]]], np.uint8)
    # τ=.5: tp 2 (0.9, 0.6), fp 1 (0.7), fn 1 (0.3) → Dice 4/6, IoU 2/4; the 255 pixel is left out.
    assert dice_iou_at(cams, masks, 0.5) == pytest.approx({"dice": 4 / 6, "iou": 0.5})
    assert dice_iou_at(cams, masks, 0.6) == pytest.approx({"dice": 4 / 6, "iou": 0.5})  # 0.6 >= 0.6
    # τ=0: tp 3, fp 2, fn 0 → Dice 6/8, IoU 3/5.
    curve = dice_iou_curve(cams, masks, step=0.5)
    np.testing.assert_allclose(curve["thresholds"], [0.0, 0.5])
    np.testing.assert_allclose(curve["dice"], [6 / 8, 4 / 6])
    np.testing.assert_allclose(curve["iou"], [3 / 5, 2 / 4])
    assert best_dice(cams, masks, step=0.5) == pytest.approx({"threshold": 0.0, "dice": 0.75, "iou": 0.6})


def test_dice_iou_pooled_over_images_and_perfect_map() -> None:
    cam, mask = _square_case()
    both_cams = np.concatenate([cam, np.zeros_like(cam)])
    both_masks = np.concatenate([mask, mask])
    # At τ=.5 image 1 is perfect (16 tp), image 2 predicts nothing (16 fn): pooled Dice 32/48.
    assert dice_iou_at(both_cams, both_masks, 0.5) == pytest.approx({"dice": 32 / 48, "iou": 16 / 32})
    assert best_dice(cam, mask)["dice"] == 1.0


def test_dice_iou_degenerate() -> None:
    zero = np.zeros((1, 4, 4))
    empty = np.zeros((1, 4, 4), np.uint8)
    assert dice_iou_at(zero, empty, 0.5) == {"dice": 0.0, "iou": 0.0}  # nothing anywhere: 0, not NaN
    assert dice_iou_at(zero, np.full((1, 4, 4), 255, np.uint8), 0.0) == {"dice": 0.0, "iou": 0.0}
    assert best_dice(zero, empty, step=0.5) == {"threshold": 0.0, "dice": 0.0, "iou": 0.0}


# ---------------------------------------------------------------- off-target, accuracy, baseline


def test_off_target_share_hand_computed() -> None:
    cams = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])
    anatomy = np.array([[[1, 0], [1, 0]], [[1, 1], [1, 1]], [[1, 1], [1, 1]]], np.uint8)
    np.testing.assert_allclose(off_target_share_per_image(cams, anatomy), [1.5 / 2.0, 0.0, 1.0])
    assert off_target_share(cams, anatomy) == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert off_target_share(np.zeros((0, 2, 2)), np.zeros((0, 2, 2))) == 0.0
    assert off_target_share(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2))) == 0.0


def test_classification_accuracy() -> None:
    assert classification_accuracy([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert classification_accuracy(logits, [1, 0, 0]) == pytest.approx(2 / 3)
    assert classification_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        classification_accuracy([1, 0], [1])


@pytest.mark.parametrize(("h", "w"), [(9, 9), (8, 12), (1, 5)])
def test_center_gaussian_baseline(h: int, w: int) -> None:
    maps = center_gaussian_baseline(3, h, w)
    assert maps.shape == (3, h, w) and maps.dtype == np.float32
    assert maps.min() == 0.0 and maps.max() == 1.0
    np.testing.assert_array_equal(maps[0], maps[2])
    np.testing.assert_allclose(maps[0], maps[0][::-1, ::-1], atol=1e-6)  # centred
    if h % 2 and w % 2:
        assert maps[0, h // 2, w // 2] == 1.0
    assert maps[0, 0, 0] == 0.0


def test_center_gaussian_baseline_scores_a_centred_object() -> None:
    maps = center_gaussian_baseline(1, 16, 16)
    mask = np.zeros((1, 16, 16), np.uint8)
    mask[0, 4:12, 4:12] = 1
    assert max_box_acc(maps, [[[4, 4, 11, 11]]])["per_iou"][0.5] == 1.0
    assert pxap(maps, mask) > 0.9
