"""Tests of the built-in MRI phantom (acol_core.data.phantom)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from acol_core.data.phantom import (
    PHANTOM_CLASSES,
    PHANTOM_PRESETS,
    PhantomConfig,
    PhantomSlice,
    generate_phantom,
    phantom_config,
    render_slice,
    sample_subject,
    scaled_min_tumour_pixels,
    slice_levels,
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


# ---------------------------------------------------------------- presets and failure mechanisms

SHORTCUT = phantom_config("skull-shortcut", num_subjects=24, slices_per_subject=8, size=64, seed=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"site_purity": 0.4}, "site_purity must be in [0.5, 1]"),
        ({"site_shift": 1.5}, "site_shift must be in [0, 1]"),
        ({"stack_extent": -0.1}, "stack_extent must be in [0, 1]"),
        ({"lesion_level_focus": 2.0}, "lesion_level_focus must be in [0, 1]"),
        ({"healthy_level_bias": -1.0}, "healthy_level_bias must be in [0, 1]"),
        ({"lesion_subtlety": 1.2}, "lesion_subtlety must be in [0, 1]"),
        ({"site_shift": "strong"}, "site_shift must be a number, got 'strong'"),
        ({"size": 64.5}, "size must be an integer"),
        ({"noise": True}, "noise must be a number"),
    ],
)
def test_mechanism_options_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        PhantomConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_presets_and_overrides() -> None:
    assert set(PHANTOM_PRESETS) == {"standard", "imbalanced", "skull-shortcut"}
    assert phantom_config() == PhantomConfig()
    assert phantom_config("skull-shortcut", site_purity=0.7).site_purity == 0.7
    assert phantom_config("skull-shortcut").lesion_subtlety == 1.0 and PhantomConfig().lesion_subtlety == 0.0
    assert phantom_config("imbalanced", size=32).size == 32
    with pytest.raises(ValueError, match="unknown phantom preset 'skull'; choose from standard"):
        phantom_config("skull")
    with pytest.raises(ValueError, match="unknown phantom option"):
        phantom_config("standard", site_strength=1.0)


def test_source_takes_preset_and_reports_one_clear_error() -> None:
    from acol_core.data.sources import DataSourceError, get_source, source_option_names

    src = get_source("phantom", preset="skull-shortcut", num_subjects=2, slices_per_subject=2, size=32)
    assert src.config.site_shift == 1.0 and src.describe()["preset"] == "skull-shortcut"
    assert {"preset", "site_purity", "stack_extent", "lesion_subtlety"} <= source_option_names("phantom")
    for bad in ({"preset": "nope"}, {"preset": "skull-shortcut", "site_shift": 3.0}):
        with pytest.raises(DataSourceError, match="source 'phantom': ") as info:
            get_source("phantom", **bad)
        assert "\n" not in str(info.value)


def _subjects(config: PhantomConfig) -> list:
    return [sample_subject(config, i) for i in range(config.num_subjects)]


@pytest.mark.parametrize(("purity", "low", "high"), [(0.9, 0.83, 0.96), (0.5, 0.38, 0.62)])
def test_site_assignment_follows_the_class(purity: float, low: float, high: float) -> None:
    config = PhantomConfig(num_subjects=300, size=32, tumour_subject_fraction=0.5, site_purity=purity)
    subjects = _subjects(config)
    tumour_b = np.mean([s.site == "B" for s in subjects if s.lesion is not None])
    healthy_a = np.mean([s.site == "A" for s in subjects if s.lesion is None])
    assert low <= tumour_b <= high and low <= healthy_a <= high
    # The site has its own random stream: the subjects' anatomy does not depend on the purity.
    other = sample_subject(dataclasses.replace(config, site_purity=0.5), 7)
    assert other.head_axes == subjects[7].head_axes and other.lesion == subjects[7].lesion


def test_sites_differ_on_scalp_and_skull_not_in_the_brain() -> None:
    config = dataclasses.replace(SHORTCUT, num_subjects=40, noise=0.0, lesion_level_focus=0.0)
    scalp: dict[str, list[float]] = {"A": [], "B": []}
    brain: dict[str, list[float]] = {"A": [], "B": []}
    skull_px: dict[str, list[float]] = {"A": [], "B": []}
    head_px: dict[str, list[float]] = {"A": [], "B": []}
    for subject in _subjects(config):
        # Site B crops each slice to the head's box and resizes it to a square; site A keeps the scanner's FOV.
        assert subject.crop == (1.0 if subject.site == "B" else 0.0)
        s = render_slice(subject, 4, config, with_tumour=False)
        anatomy, inside = s.anatomy_mask.astype(bool), s.brain_mask.astype(bool)
        scalp[subject.site].append(np.percentile(s.image[anatomy], 90))
        brain[subject.site].append(np.median(s.image[inside]))
        skull_px[subject.site].append(anatomy.sum() / (anatomy.sum() + inside.sum()))
        head_px[subject.site].append((anatomy | inside).mean())
    assert min(map(len, scalp.values())) >= 5
    assert np.mean(scalp["B"]) > 1.6 * np.mean(scalp["A"])  # fat suppression at site A
    assert abs(np.mean(brain["B"]) / np.mean(brain["A"]) - 1) < 0.15
    assert np.mean(skull_px["B"]) > 1.15 * np.mean(skull_px["A"])  # thicker scalp and skull at site B
    assert np.mean(head_px["B"]) > 1.3 * np.mean(head_px["A"]) and max(head_px["B"]) < 0.95  # cropped
    assert min(head_px["B"]) > 0.7  # the head touches the image's edges, at any level


def test_crop_fills_the_image_at_every_level() -> None:
    subject = dataclasses.replace(sample_subject(SHORTCUT, 0), crop=1.0)
    for k in range(SHORTCUT.slices_per_subject):
        head = render_slice(subject, k, SHORTCUT)
        rows = np.flatnonzero((head.anatomy_mask | head.brain_mask).any(1))
        cols = np.flatnonzero((head.anatomy_mask | head.brain_mask).any(0))
        if not len(rows):
            continue
        # Centred, reaching within a few pixels of all four edges.
        size = SHORTCUT.size
        assert rows[0] <= 3 and rows[-1] >= size - 4 and cols[0] <= 3 and cols[-1] >= size - 4


def test_lesion_subtlety_fades_the_lesion_not_its_mask() -> None:
    config = PhantomConfig(num_subjects=1, size=64, tumour_subject_fraction=1.0, noise=0.0)
    faint = dataclasses.replace(config, lesion_subtlety=1.0)
    plain, subtle = sample_subject(config, 0), sample_subject(faint, 0)
    assert plain.lesion is not None and subtle.lesion is not None
    assert subtle.lesion.rim_contrast == pytest.approx(0.4 * plain.lesion.rim_contrast)
    k = int(np.argmax([render_slice(plain, i, config).tumour_mask.sum() for i in range(16)]))
    a, b = render_slice(plain, k, config), render_slice(subtle, k, faint)
    assert a.label == b.label == 1 and np.array_equal(a.tumour_mask, b.tumour_mask)
    healthy = render_slice(plain, k, config, with_tumour=False).image.astype(float)
    lesion = a.tumour_mask.astype(bool)
    change = [np.abs(s.image.astype(float) - healthy)[lesion].mean() for s in (a, b)]
    assert 0 < change[1] < 0.6 * change[0]  # fainter but still there


def test_slice_levels_sampling_bias() -> None:
    base = PhantomConfig(slices_per_subject=9)
    assert slice_levels(base, True, None) == tuple(k / 8 for k in range(9))
    lesion = sample_subject(PhantomConfig(tumour_subject_fraction=1.0), 0).lesion
    assert lesion is not None
    healthy = slice_levels(dataclasses.replace(base, healthy_level_bias=1.0), True, None)
    # Healthy stacks reach further out and crowd towards both ends: more skull-dominated levels.
    assert min(healthy) < -0.5 and max(healthy) > 1.2
    assert np.mean([abs(z - 0.3) for z in healthy]) > 1.5 * np.mean([abs(z - 0.3) for z in base_levels(base)])
    focused = slice_levels(dataclasses.replace(base, lesion_level_focus=1.0), False, lesion)
    assert all(abs(z - lesion.z_center) <= 0.6 * lesion.z_half + 1e-9 for z in focused)


def base_levels(config: PhantomConfig) -> tuple[float, ...]:
    return slice_levels(config, True, None)


def test_skull_shortcut_slices_skull_share_and_labels() -> None:
    def skull_share(config: PhantomConfig) -> float:
        subjects = {s.subject_id: s for s in _subjects(config)}
        shares = [
            s.anatomy_mask.sum() / max(1, s.anatomy_mask.sum() + s.brain_mask.sum())
            for s in generate_phantom(config)
            if subjects[s.subject_id].lesion is None
        ]
        return float(np.mean(shares))

    # The level bias alone (no site shift) makes healthy slices more skull-dominated.
    no_site = dataclasses.replace(SHORTCUT, site_shift=0.0)
    assert skull_share(no_site) > 1.2 * skull_share(dataclasses.replace(no_site, healthy_level_bias=0.0))

    slices = list(generate_phantom(SHORTCUT))
    subjects = {s.subject_id: s for s in _subjects(SHORTCUT)}
    tumour_subject = [s for s in slices if subjects[s.subject_id].lesion is not None]
    # Tumour subjects' stacks sit on their lesion: nearly all their slices show it.
    assert np.mean([s.label for s in tumour_subject]) >= 0.9
    assert not any(s.label for s in slices if subjects[s.subject_id].lesion is None)


@pytest.mark.parametrize("preset", ["skull-shortcut", "imbalanced"])
def test_masks_consistent_under_every_mechanism(preset: str) -> None:
    config = phantom_config(preset, num_subjects=10, slices_per_subject=10, size=64, noise=0.0, seed=1)
    config = dataclasses.replace(config, stack_extent=1.0)
    empty = 0
    for s in generate_phantom(config):
        anatomy, inside = s.anatomy_mask.astype(bool), s.brain_mask.astype(bool)
        tumour = s.tumour_mask.astype(bool)
        assert not (anatomy & inside).any() and not (tumour & ~inside).any()
        head = anatomy | inside
        # Air beyond one pixel of partial volume is black: the masks cover everything drawn.
        grown = head.copy()
        grown[1:] |= head[:-1]
        grown[:-1] |= head[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:]
        assert not s.image[~grown].any()
        if not head.any():
            empty += 1
            assert s.label == 0
    assert empty > 0  # the stack reaches past the head


def test_lesion_is_the_only_difference_in_shortcut_tumour_slices() -> None:
    tumour_subjects = [s for s in _subjects(SHORTCUT) if s.lesion is not None]
    subject = tumour_subjects[0]
    shown = 0
    for k in range(SHORTCUT.slices_per_subject):
        with_lesion = render_slice(subject, k, SHORTCUT)
        without = render_slice(subject, k, SHORTCUT, with_tumour=False)
        changed = with_lesion.image != without.image
        assert not (changed & ~with_lesion.tumour_mask.astype(bool)).any()
        shown += with_lesion.label
        if with_lesion.label:
            assert changed.sum() >= 0.5 * with_lesion.tumour_mask.sum()
    assert shown >= SHORTCUT.slices_per_subject - 1


def test_imbalanced_preset_class_share_and_empty_slices() -> None:
    config = phantom_config("imbalanced")
    slices = list(generate_phantom(config))
    assert len(slices) == config.num_subjects * config.slices_per_subject
    labels = np.array([s.label for s in slices])
    assert 0.06 <= labels.mean() <= 0.11
    head = np.array([(s.anatomy_mask.sum() + s.brain_mask.sum()) / s.image.size for s in slices])
    assert (head < 0.1).mean() >= 0.15  # near-empty top and bottom slices
    with_lesion = {s.subject_id for s in slices if s.label}
    assert 0.2 <= len(with_lesion) / config.num_subjects <= 0.5
    assert all(0 < labels[[s.subject_id == sid for s in slices]].mean() < 0.6 for sid in with_lesion)


def test_mechanisms_deterministic_by_seed() -> None:
    small = dataclasses.replace(SHORTCUT, num_subjects=4, stack_extent=0.5)
    first, second = list(generate_phantom(small)), list(generate_phantom(small))
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second, strict=True))
    assert all(
        a.anatomy_mask.tobytes() == b.anatomy_mask.tobytes() for a, b in zip(first, second, strict=True)
    )
    other = list(generate_phantom(dataclasses.replace(small, seed=3)))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other, strict=True))
