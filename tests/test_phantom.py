"""Tests of the built-in MRI phantom (acol_core.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest

from acol_core.data.phantom import (
    PHANTOM_CLASSES,
    PhantomConfig,
    PhantomSlice,
    generate_phantom,
    render_slice,
    sample_subject,
    scaled_min_tumour_pixels,
)

SMALL = PhantomConfig(num_subjects=4, slices_per_subject=6, size=64, seed=3)


@pytest.fixture(scope="module")
def default_run() -> list[PhantomSlice]:
    return list(generate_phantom(PhantomConfig()))


def _tumour_subjects(config: PhantomConfig, count: int) -> list[int]:
    found = [i for i in range(config.num_subjects) if sample_subject(config, i).lesion is not None]
    return found[:count]


def test_classes() -> None:
    assert PHANTOM_CLASSES == ("healthy", "tumour")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 31},
        {"slices_per_subject": 0},
        {"num_subjects": -1},
        {"tumour_subject_fraction": 1.5},
        {"min_tumour_pixels": 0},
        {"noise": -0.1},
        {"seed": -1},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PhantomConfig(**kwargs)


def test_render_rejects_slice_outside_volume() -> None:
    subject = sample_subject(SMALL, 0)
    for bad in (-1, SMALL.slices_per_subject):
        with pytest.raises(ValueError):
            render_slice(subject, bad, SMALL)


@pytest.mark.parametrize(("size", "expected"), [(128, 30), (64, 8), (96, 17), (32, 2), (256, 120)])
def test_scaled_min_tumour_pixels(size: int, expected: int) -> None:
    assert scaled_min_tumour_pixels(PhantomConfig(size=size)) == expected


def test_deterministic_byte_identical() -> None:
    first, second = list(generate_phantom(SMALL)), list(generate_phantom(SMALL))
    assert len(first) == len(second) == 24
    for a, b in zip(first, second, strict=True):
        assert a.label == b.label and a.subject_id == b.subject_id and a.slice_index == b.slice_index
        for name in ("image", "tumour_mask", "anatomy_mask", "brain_mask"):
            assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    other_seed = list(generate_phantom(PhantomConfig(num_subjects=4, slices_per_subject=6, size=64, seed=4)))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other_seed, strict=True))


def test_subject_does_not_depend_on_subject_count() -> None:
    few = PhantomConfig(num_subjects=3, size=64)
    many = PhantomConfig(num_subjects=50, size=64)
    assert sample_subject(few, 2) == sample_subject(many, 2)
    assert (
        list(generate_phantom(few))[-1].image.tobytes()
        == render_slice(sample_subject(many, 2), few.slices_per_subject - 1, many).image.tobytes()
    )


def test_shapes_dtypes_ids_and_order() -> None:
    slices = list(generate_phantom(SMALL))
    expected = [(f"sub-{i:04d}", k) for i in range(4) for k in range(6)]
    assert [(s.subject_id, s.slice_index) for s in slices] == expected
    for s in slices:
        for arr in (s.image, s.tumour_mask, s.anatomy_mask, s.brain_mask):
            assert arr.shape == (64, 64) and arr.dtype == np.uint8
        for mask in (s.tumour_mask, s.anatomy_mask, s.brain_mask):
            assert set(np.unique(mask)) <= {0, 1}
        assert s.label in (0, 1)
    assert sample_subject(PhantomConfig(), 7).subject_id == "sub-0007"


def test_default_run_labels_masks_and_balance(default_run: list[PhantomSlice]) -> None:
    config = PhantomConfig()
    assert len(default_run) == config.num_subjects * config.slices_per_subject
    min_pixels = scaled_min_tumour_pixels(config)
    labels = np.array([s.label for s in default_run])
    assert 0.3 <= labels.mean() <= 0.7
    for s in default_run:
        area = int(s.tumour_mask.sum())
        assert s.label == int(area >= min_pixels)
        if s.label == 0:
            assert area == 0
        # Both classes have skulls; the lesion stays in the brain, away from scalp and skull.
        assert s.anatomy_mask.any() and s.brain_mask.any()
        assert not (s.anatomy_mask & s.brain_mask).any()
        assert not (s.tumour_mask & ~s.brain_mask.astype(bool)).any()
        assert not (s.tumour_mask & s.anatomy_mask).any()


def test_tumour_slices_are_contiguous_per_subject(default_run: list[PhantomSlice]) -> None:
    by_subject: dict[str, list[int]] = {}
    for s in default_run:
        if s.label:
            by_subject.setdefault(s.subject_id, []).append(s.slice_index)
    assert len(by_subject) >= 20
    for indices in by_subject.values():
        assert indices == list(range(indices[0], indices[-1] + 1))
    healthy = {s.subject_id for s in default_run} - set(by_subject)
    assert healthy, "some subjects must be entirely healthy"


def test_lesions_vary_in_size_and_position(default_run: list[PhantomSlice]) -> None:
    largest: dict[str, PhantomSlice] = {}
    for s in default_run:
        best = largest.get(s.subject_id)
        if s.label and (best is None or s.tumour_mask.sum() > best.tumour_mask.sum()):
            largest[s.subject_id] = s
    areas = np.array([s.tumour_mask.sum() for s in largest.values()])
    assert areas.max() >= 4 * areas.min()
    centroids = np.array([np.argwhere(s.tumour_mask).mean(axis=0) for s in largest.values()])
    assert (centroids.std(axis=0) > 5).all()  # pixels, in both rows and columns


@pytest.mark.parametrize("subject_index", [0, 1, 2])
def test_lesion_changes_only_lesion_pixels(subject_index: int) -> None:
    config = PhantomConfig(num_subjects=12, slices_per_subject=8, size=96, seed=5)
    subject = sample_subject(config, _tumour_subjects(config, 3)[subject_index])
    drawn = 0
    for k in range(config.slices_per_subject):
        with_lesion = render_slice(subject, k, config, with_tumour=True)
        without = render_slice(subject, k, config, with_tumour=False)
        changed = with_lesion.image != without.image
        assert not (changed & ~with_lesion.tumour_mask.astype(bool)).any()
        assert without.label == 0 and not without.tumour_mask.any()
        for name in ("anatomy_mask", "brain_mask"):
            assert np.array_equal(getattr(with_lesion, name), getattr(without, name))
        if with_lesion.label:
            drawn += 1
            assert changed.sum() >= 0.5 * with_lesion.tumour_mask.sum()
        else:
            assert not changed.any()
    assert drawn > 0


def test_healthy_subject_ignores_with_tumour() -> None:
    config = PhantomConfig(num_subjects=8, size=64, tumour_subject_fraction=0.0)
    subject = sample_subject(config, 5)
    assert subject.lesion is None
    for k in (0, 7, 15):
        assert np.array_equal(
            render_slice(subject, k, config).image, render_slice(subject, k, config, False).image
        )


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 10)])
def test_tumour_subject_fraction_extremes(fraction: float, expected: int) -> None:
    config = PhantomConfig(num_subjects=10, tumour_subject_fraction=fraction)
    assert sum(sample_subject(config, i).lesion is not None for i in range(10)) == expected


@pytest.mark.parametrize("size", [32, 64, 96])
def test_other_sizes(size: int) -> None:
    config = PhantomConfig(num_subjects=3, slices_per_subject=5, size=size, tumour_subject_fraction=1.0)
    slices = list(generate_phantom(config))
    assert {s.image.shape for s in slices} == {(size, size)}
    assert all(s.anatomy_mask.any() and s.brain_mask.any() for s in slices)
    assert any(s.label for s in slices)
    min_pixels = scaled_min_tumour_pixels(config)
    assert all(s.label == int(s.tumour_mask.sum() >= min_pixels) for s in slices)
    assert all(not (s.tumour_mask & s.anatomy_mask).any() for s in slices)


def test_slice_level_changes_head_and_ventricles() -> None:
    config = PhantomConfig(
        num_subjects=1, slices_per_subject=16, size=64, noise=0.0, tumour_subject_fraction=0.0
    )
    subject = sample_subject(config, 0)
    slices = [render_slice(subject, k, config) for k in range(16)]
    head = [int(s.anatomy_mask.sum() + s.brain_mask.sum()) for s in slices]
    assert head[15] < 0.8 * max(head)

    def dark_centre(s: PhantomSlice) -> int:
        # Ventricles: CSF-dark pixels near the middle of the brain, away from the cortex and fissure edges.
        rows, cols = np.nonzero(s.brain_mask)
        cy, cx = rows.mean(), cols.mean()
        yy, xx = np.mgrid[:64, :64]
        near = (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
        return int(((s.image < 60) & near & (np.abs(xx - cx) > 1.5)).sum())

    mid = max(dark_centre(s) for s in slices[5:10])
    assert mid > 15
    assert dark_centre(slices[15]) < 0.25 * mid


def test_images_look_like_heads() -> None:
    config = PhantomConfig(num_subjects=1, size=64, noise=0.0, tumour_subject_fraction=0.0)
    s = render_slice(sample_subject(config, 0), 6, config)
    air = ~(s.anatomy_mask.astype(bool) | s.brain_mask.astype(bool))
    # Noise-free air is black, the scalp is the brightest tissue, and the brain is mid-grey.
    assert s.image[air].mean() < 10
    assert np.percentile(s.image[s.anatomy_mask.astype(bool)], 95) > np.percentile(
        s.image[s.brain_mask > 0], 90
    )
    assert 60 < np.median(s.image[s.brain_mask > 0]) < 200
