"""The skull remedies of issue 18: shared anatomy competing for positions, the contrastive localisation map
of co-attention, intensity / bias-field augmentation and anatomy gating of CAMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acol_core.config import ConfigError, TrainConfig
from acol_core.data.transforms import augment_batch, bias_field, intensity_augment
from acol_core.gating import GateError, check_gate, gate_cam, gate_maps
from acol_core.models import create_model, normalize_maps, select_class_maps
from acol_core.models.erase import competition_masks, competitive_pool

MODELS = ["cam", "acol", "coatt", "acol_coatt"]
C = 2


def _model(name: str, **options: object):
    torch.manual_seed(0)
    return create_model(name, C, in_channels=1, backbone="tiny", **options)


def _batch(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- shared_anatomy="compete"


@pytest.mark.parametrize("name", MODELS)
def test_compete_through_the_registry_shapes_loss_and_backward(name: str) -> None:
    model, labels = _model(name, shared_anatomy="compete").train(), torch.tensor([0, 1, 1, 0])
    assert model.config["shared_anatomy"] == "compete" and (model.num_outputs, model.num_maps) == (
        C + 1,
        C + 2,
    )
    out = model(_batch(), labels)
    assert out["logits"].shape == (4, C)
    assert all(m.shape == (4, C + 2, 4, 4) and torch.isfinite(m).all() for m in out["maps"].values())
    assert all(t.shape == (4, C + 1) and torch.isfinite(t).all() for t in out["branch_logits"])
    assert out["cam"].shape == (4, 4, 4) and 0 <= out["cam"].min() and out["cam"].max() <= 1
    losses = model.compute_loss(out, labels)
    assert all(k.startswith("sm_") for k in losses if k != "loss") and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    classifier = (model.head if hasattr(model, "head") else model.head_a).layers[-1]
    assert classifier.weight.grad[C].abs().sum() > 0 and classifier.weight.grad[C + 1].abs().sum() > 0
    with torch.no_grad():
        cam = model.eval()(_batch())["cam"]
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1


@pytest.mark.parametrize("labelled", [True, False])
def test_compete_cam_is_the_class_channels_share_of_each_position(labelled: bool) -> None:
    model = _model("cam", shared_anatomy="compete").eval()
    labels = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        out = model(_batch(), labels if labelled else None)
    maps = out["maps"]["main"]
    target = labels if labelled else out["logits"].argmax(1)
    expected = normalize_maps(select_class_maps(maps.softmax(dim=1), target))
    assert torch.allclose(out["cam"], expected, atol=1e-6)
    assert torch.allclose(out["logits"], competitive_pool(maps)[:, :C])


def test_competitive_pool_anatomy_takes_positions_from_the_class() -> None:
    """Raising the anatomy map at a position lowers the class's score and share there; under GAP
    (shared_anatomy=True) the class score would not move at all."""
    maps = torch.zeros(1, 4, 3, 3)  # classes 0, 1, anatomy, background
    maps[0, 1, 1, 1] = 4.0
    before, share_before = competitive_pool(maps)[0, 1], competition_masks(maps)[0, 1, 1, 1]
    maps[0, 2, 1, 1] = 8.0  # anatomy claims the class's position
    after, share_after = competitive_pool(maps)[0, 1], competition_masks(maps)[0, 1, 1, 1]
    assert after < before - 1.0 and share_after < 0.05 < share_before
    assert torch.allclose(competition_masks(maps).sum(dim=1), torch.ones(1, 3, 3))
    # a channel that holds no position scores far below one that holds some (the size term)
    empty = torch.zeros(1, 3, 2, 2)
    empty[0, 0] = -20.0
    assert competitive_pool(empty)[0, 0] < -4.0 < competitive_pool(empty)[0, 1]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bad", ["yes", 2, None, "Compete"])
def test_bad_shared_anatomy_is_one_clear_error(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=r"^shared_anatomy must be false, true or 'compete', got"):
        _model(name, shared_anatomy=bad)
    with pytest.raises(ConfigError, match=r"^shared_anatomy must be false, true or 'compete'"):
        TrainConfig.from_dict({"model": name, "model_options": {"shared_anatomy": bad}})


def test_compete_in_the_config_builds_and_round_trips() -> None:
    cfg = TrainConfig.from_dict({"model": "acol", "model_options": {"shared_anatomy": "compete"}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- co-attention's contrastive map


@pytest.mark.parametrize("name", ["coatt", "acol_coatt"])
def test_contrast_infer_map_is_the_contrastive_map_against_another_class(name: str) -> None:
    model = _model(name, pair_policy="different", infer_map="contrast", shared_anatomy="compete").eval()
    labels = torch.tensor([0, 1, 1, 1])
    with torch.no_grad():
        out = model(_batch(), labels)
        features = model.head.trunk(model.backbone(_batch()))
        own = normalize_maps(select_class_maps(model.evidence(model.head.classifier(features)), labels))
        # sample 0's only partner of another class is one of 1..3; 1..3 all pair with 0
        _, contrast = model.coattention(features, features[torch.tensor([1, 0, 0, 0])])
        maps = normalize_maps(select_class_maps(model.evidence(model.head.classifier(contrast)), labels))
    cam_a = out["cam"] if name == "coatt" else None
    if cam_a is not None:
        assert torch.allclose(cam_a[1:], maps[1:], atol=1e-5)
        assert not torch.allclose(cam_a[1:], own[1:], atol=1e-3)
    # one class in the batch: no partner of another class, every image keeps its own map
    with torch.no_grad():
        same = model(_batch(), torch.ones(4, dtype=torch.long))
    assert same["cam"].shape == (4, 4, 4) and torch.isfinite(same["cam"]).all()
    if name == "coatt":
        own1 = normalize_maps(model.evidence(model.head.classifier(features))[:, 1])
        assert torch.allclose(same["cam"], own1, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"infer_map": "common"}, r"^infer_map must be one of single, contrast, got 'common'"),
        ({"infer_map": "contrast", "infer_partners": 2}, r"^infer_map='contrast' uses one partner"),
    ],
)
def test_bad_infer_map_is_one_clear_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _model("coatt", **options)
    with pytest.raises(ValueError, match="fusion='joint'"):
        _model("acol_coatt", fusion="joint", infer_map="contrast")


@pytest.mark.parametrize("policy", ["same", "different", "mixed"])
def test_every_pair_policy_runs_with_the_contrastive_map(policy: str) -> None:
    model, labels = (
        _model("coatt", pair_policy=policy, infer_map="contrast").train(),
        torch.tensor([0, 1, 1, 0]),
    )
    out = model(_batch(), labels)
    same_class = labels[out["partners"]] == labels
    assert bool(same_class.all()) if policy == "same" else True
    assert bool((~same_class).all()) if policy == "different" else True
    model.compute_loss(out, labels)["loss"].backward()


# ---------------------------------------------------------------- intensity / bias-field augmentation


def _images(n: int = 3, size: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(n, 1, size, size)).astype(np.float32)
    masks = (rng.uniform(size=(n, size, size)) > 0.7).astype(np.uint8)
    return {
        "image": ((x - 0.5) / 0.25).astype(np.float32),
        "label": np.arange(n) % 2,
        "mask": masks,
        "anatomy_mask": 1 - masks,
    }


def test_intensity_augmentation_is_seeded_keeps_masks_and_range() -> None:
    batch = _images()
    first = augment_batch(batch, np.random.default_rng(5), intensity=0.8)
    again = augment_batch(batch, np.random.default_rng(5), intensity=0.8)
    geometric = augment_batch(batch, np.random.default_rng(5))
    assert all(np.array_equal(first[k], again[k]) for k in ("image", "mask", "anatomy_mask"))
    # masks follow the geometric part only, drawn first: identical with and without intensity changes
    assert np.array_equal(first["mask"], geometric["mask"])
    assert np.array_equal(first["anatomy_mask"], geometric["anatomy_mask"])
    assert first["image"].dtype == np.float32 and first["image"].min() >= -2 and first["image"].max() <= 2
    assert not np.allclose(first["image"], geometric["image"])
    assert np.array_equal(batch["image"], _images()["image"])  # the input is not modified


def test_intensity_strength_zero_is_a_copy_and_strength_is_checked() -> None:
    images = _images()["image"]
    out = intensity_augment(images, np.random.default_rng(0), 0.0)
    assert np.array_equal(out, images) and out is not images
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"^intensity augmentation strength must lie in \[0, 1\]"):
            intensity_augment(images, np.random.default_rng(0), bad)
    with pytest.raises(ConfigError, match=r"^intensity_augment must be in \[0, 1\], got 2"):
        TrainConfig.from_dict({"intensity_augment": 2.0})
    with pytest.raises(ConfigError, match=r"^intensity_augment needs augment: true"):
        TrainConfig.from_dict({"intensity_augment": 0.5, "augment": False})


def test_background_stays_dark_and_bias_field_is_smooth_and_positive() -> None:
    """A scanner's changes: air stays near 0 (only Rician noise), the field varies slowly."""
    images = np.full((4, 1, 32, 32), -2.0, np.float32)  # all background (0 in [0, 1])
    out = intensity_augment(images, np.random.default_rng(1), 1.0) * 0.25 + 0.5
    assert out.min() >= 0 and out.mean() < 0.1
    field = bias_field(32, 32, np.random.default_rng(2))
    assert field.shape == (32, 32) and (field > 0).all()
    assert np.abs(np.diff(np.log(field), axis=0)).max() < 0.5  # no jumps between neighbours


# ---------------------------------------------------------------- anatomy gating


def test_gate_zeroes_anatomy_pixels_and_keeps_the_rest_unstretched() -> None:
    cam = np.array([[2.0, 1.6, 0.4], [0.8, 0.4, 0.0], [0.0, 0.0, 0.0]])
    skull = np.array([[1, 1, 0], [0, 255, 0], [0, 0, 0]], np.uint8)  # 255: unknown, kept
    out = gate_cam(cam, skull)
    assert (out[skull == 1] == 0).all() and out.max() == 0.4
    np.testing.assert_allclose(out, np.where(skull == 1, 0.0, cam / 2.0))


def test_gate_never_lowers_pxap_when_the_object_lies_off_the_anatomy() -> None:
    """Zeroing anatomy pixels removes false positives only; stretching the rest could add some."""
    from acol_core.localize import normalize_cam
    from acol_core.metrics import pxap

    rng = np.random.default_rng(0)
    cams = rng.random((6, 16, 16))
    masks = np.zeros((6, 16, 16), np.uint8)
    masks[:, 6:10, 6:10] = 1
    skull = np.zeros((6, 16, 16), np.uint8)
    skull[:, :3] = 1
    cams[:3, :3] += 2.0  # half the maps peak on the skull
    gated = np.stack([gate_cam(c, s) for c, s in zip(cams, skull, strict=True)])
    normed = np.stack([gate_cam(c, None) for c in cams])
    stretched = np.stack([normalize_cam(g) for g in gated])  # the rule before: min-max again after
    assert pxap(gated, masks) >= pxap(normed, masks) and pxap(gated, masks) > pxap(stretched, masks)


@pytest.mark.parametrize("cam", [np.full((3, 3), 0.7), np.zeros((3, 3)), np.full((3, 3), np.nan)])
def test_gate_constant_or_bad_maps_are_safe(cam: np.ndarray) -> None:
    out = gate_cam(cam, np.eye(3, dtype=np.uint8))
    assert np.isfinite(out).all() and (out == 0).all()


def test_gate_on_all_anatomy_mass_gives_zeros_and_missing_masks_are_counted() -> None:
    cam = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert (gate_cam(cam, np.array([[1, 0], [0, 0]])) == 0).all()
    gated = gate_maps([cam, cam * 3], [np.array([[1, 0], [0, 0]]), None], "anatomy")
    assert gated.ungated == 1 and np.array_equal(gated.maps[1], cam)
    assert gate_maps([cam * 3], [np.ones((2, 2))], "none").maps[0].max() == 3.0
    with pytest.raises(GateError, match="same shape"):
        gate_cam(cam, np.zeros((3, 3)))
    with pytest.raises(GateError, match=r"^gate must be one of none, anatomy, got 'brain'"):
        check_gate("brain")
    assert check_gate(None) == "none"


def test_compete_maps_of_a_constant_input_are_safe() -> None:
    with torch.no_grad():
        out = _model("acol", shared_anatomy="compete").eval()(torch.zeros(2, 1, 32, 32))
    assert torch.equal(out["cam"], torch.zeros(2, 4, 4))
    assert torch.isfinite(F.softmax(out["logits"], dim=1)).all()


# ---------------------------------------------------------------- the sweep space


def test_skull_space_samples_build_every_remedy() -> None:
    """Every configuration the shipped skull space draws is a valid TrainConfig and model."""
    optuna = pytest.importorskip("optuna")
    from pathlib import Path

    from acol_core.sweep.space import load_space
    from acol_core.train import build_model

    space = load_space(str(Path(__file__).resolve().parents[1] / "tune" / "spaces" / "skull.yaml"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    anatomy_modes, harmonize = set(), set()
    for _ in range(12):
        trial = study.ask()
        config = space.train_config(space.sample(trial))
        build_model(config.replace(image_size=32))
        anatomy_modes.add(config.model_options["shared_anatomy"])
        harmonize.add(config.harmonize)
        study.tell(trial, 0.0)
    assert anatomy_modes == {False, True, "compete"} and harmonize == {"none", "brain"}


# ---------------------------------------------------------------- fusion="auto" (ACoL's fusion chosen on val)


@pytest.mark.parametrize("name", ["acol", "acol_coatt"])
def test_auto_fusion_offers_every_candidate_in_eval_and_keeps_the_choice_in_the_state(name: str) -> None:
    model, labels = _model(name, delta=0.6, fusion="auto"), torch.tensor([0, 1, 1, 0])
    assert "cams" not in model.train()(_batch(), labels)  # training pays for one map only
    with torch.no_grad():
        out = model.eval()(_batch(), labels)
    assert set(out["cams"]) == {"max", "mean", "joint", "a"} and model.active_fusion == "max"
    assert torch.equal(out["cam"], out["cams"]["max"])
    model.choose_fusion("a")
    with torch.no_grad():
        out = model(_batch(), labels)
    assert torch.equal(out["cam"], out["cams"]["a"]) and not torch.equal(out["cam"], out["cams"]["max"])
    rebuilt = create_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.active_fusion == "a"
    with pytest.raises(ValueError, match="cannot choose fusion"):
        _model(name, delta=0.6, fusion="max").choose_fusion("a")


def test_choose_fusion_picks_the_best_val_pxap_on_the_given_rows() -> None:
    from acol_core.train import choose_fusion

    model = _model("acol", delta=0.6, fusion="auto")
    mask = np.zeros((3, 8, 8), np.uint8)
    mask[:, 2:5, 2:5] = 1
    on_object = mask.astype(np.float32)
    off_object = 1.0 - on_object
    pred = {
        "label": np.ones(3, np.int64),
        "pred": np.ones(3, np.int64),
        "mask": mask,
        "cam": off_object,
        "cam:max": off_object,
        "cam:mean": off_object,
        "cam:joint": off_object,
        "cam:a": on_object,
    }
    assert choose_fusion(model, pred, np.ones(3, bool)) == 3
    assert model.active_fusion == "a" and pred["cam"] is on_object
    assert choose_fusion(model, {"cam": on_object}, None) is None  # a fixed fusion offers no candidates


def test_auto_fusion_is_chosen_during_fit_and_reported() -> None:
    from acol_core.train import fit, iterate_minibatches

    rng = np.random.default_rng(0)
    n, size = 16, 32
    mask = np.zeros((n, size, size), np.uint8)
    mask[n // 2 :, 8:16, 8:16] = 1
    arrays = {
        "image": (rng.normal(size=(n, 1, size, size)) + 3 * mask[:, None]).astype(np.float32),
        "label": (np.arange(n) >= n // 2).astype(np.int64),
        "mask": mask,
        "fullsup": np.ones(n, bool),
    }
    config = TrainConfig(
        model="acol", model_options={"delta": 0.6, "fusion": "auto"}, epochs=2, image_size=size, num_threads=1
    )
    result = fit(
        config,
        train_batches=lambda epoch: iterate_minibatches(
            arrays, 8, np.random.default_rng(epoch), augment=False
        ),
        val_batches=lambda: iterate_minibatches(arrays, 8, None, augment=False),
    )
    chosen = [h["val_fusion_index"] for h in result.history]
    assert len(chosen) == 2 and result.model.active_fusion == result.model.fusion_candidates[int(chosen[-1])]
    assert TrainConfig.from_dict(config.to_dict()).model_options["fusion"] == "auto"
    with pytest.raises(ConfigError, match="fusion"):
        TrainConfig(model="acol", model_options={"fusion": "best"})


# ---------------------------------------------------------------- harmonize="brain" (skull-stripped, bias-corrected)


def _head(size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A disc of textured 'brain' inside a bright ring of 'skull' on air: image, anatomy, brain."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(y, x)
    brain, ring = r < size * 0.33, (r >= size * 0.33) & (r < size * 0.43)
    texture = 0.4 + 0.1 * np.sin(x / 2.0) * np.cos(y / 3.0)
    image = np.where(brain, texture, 0.0) + np.where(ring, 0.95, 0.0)
    return image[None].astype(np.float32), ring.astype(np.uint8), brain


def test_harmonize_strips_the_skull_and_removes_a_smooth_gain() -> None:
    from acol_core.data.harmonize import brain_region, harmonize_slice

    image, anatomy, brain = _head()
    assert np.array_equal(brain_region(image, anatomy), brain)
    plain = harmonize_slice(image, anatomy)
    assert (plain[0][~brain] == 0).all() and plain[0][brain].std() > 0.05
    assert 0 <= plain.min() and plain.max() <= 1 and abs(float(np.median(plain[0][brain])) - 0.5) < 0.02
    gain = 1.0 + 0.8 * np.linspace(0, 1, image.shape[-1])[None, None, :]  # a coil's bright side
    gained = harmonize_slice((image * gain).astype(np.float32), anatomy)
    raw_gap = np.abs((image * gain - image)[0][brain]).mean() / image[0][brain].mean()
    assert np.abs(gained - plain)[0][brain].mean() < 0.25 * raw_gap  # most of the gain is gone


def test_harmonize_without_masks_keeps_the_foreground_and_empty_slices_stay_empty() -> None:
    from acol_core.data.harmonize import harmonize_batch

    image, anatomy, _ = _head()
    unknown = np.full_like(anatomy, 255)
    out = harmonize_batch(np.stack([image, np.zeros_like(image)]), np.stack([unknown, unknown]), "brain")
    assert (out[0][0][image[0] > 0.05] > 0).mean() > 0.9 and (out[1] == 0).all()
    batch = image[None]
    assert harmonize_batch(batch, None, "none") is batch  # off: the inputs untouched, not copied
    with pytest.raises(ValueError, match="harmonize must be one of none, brain"):
        harmonize_batch(image[None], None, "n4")
    with pytest.raises(ConfigError, match="harmonize must be none or brain"):
        TrainConfig(harmonize="skullstrip")


def test_harmonized_training_inputs_are_what_localize_feeds_the_model(tmp_path) -> None:
    """decode_rows (training, val, sweeps) and localize_rows (acol localize) harmonise alike."""
    from acol_core.batch_localize import INPUT_COLUMNS, localize_rows
    from acol_core.data.prepare import prepare_dataset
    from acol_core.data.shards import open_dataset
    from acol_core.data.transforms import decode_rows
    from acol_core.export import export_model, load_exported
    from acol_core.predictions import decode_cam

    data = str(tmp_path / "data")
    prepare_dataset("phantom", data, num_subjects=4, slices_per_subject=2, size=32, seed=0)
    config = TrainConfig(model="cam", image_size=32, epochs=1, harmonize="brain")
    uri = export_model(_model("cam"), config, ["healthy", "tumour"], str(tmp_path / "m.safetensors"))
    model, info = load_exported(uri)
    assert info.config.harmonize == "brain"
    rows = open_dataset(data).read_table("test", columns=INPUT_COLUMNS).to_pydict()
    decoded = decode_rows(rows, 1, 32, with_masks=False, harmonize="brain")
    plain = decode_rows(rows, 1, 32, with_masks=False)
    assert not np.allclose(decoded["image"], plain["image"])
    with torch.no_grad():
        expected = model(torch.from_numpy(decoded["image"]))["cam"]
    table = localize_rows(model, info, rows, 0.5, ("m", "x"), torch.device("cpu"), gt_maps=False)
    got = [decode_cam(c) for c in table.column("cam").to_pylist()]
    from acol_core.localize import normalize_cam, resize_map

    want = [normalize_cam(resize_map(m.numpy(), (32, 32))) for m in expected]
    # The stored map is quantised to 8 bits.
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) <= 1 / 255 + 1e-6
