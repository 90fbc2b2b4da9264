"""Class-balanced training: the weights, the decision, the loss path of every model, and a small
imbalanced training run that learns the minority class only when balanced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acol_core.balance import (
    apply_class_balance,
    auto_method,
    repeat_counts,
    resolve_class_balance,
    sampled_rows,
    sampling_factors,
    train_class_counts,
)
from acol_core.config import ConfigError, TrainConfig
from acol_core.models import create_model
from acol_core.train import classification_metrics, fit, iterate_minibatches, predict


@pytest.mark.parametrize(
    "mode, counts, applied, weights",
    [
        ("auto", [930, 70], True, [0.5376, 7.1429]),
        ("auto", [500, 500], False, None),
        ("auto", [660, 340], True, [0.7576, 1.4706]),  # 34 % < 35 %
        ("auto", [640, 360], False, None),
        ("weights", [500, 500], True, [1.0, 1.0]),
        ("none", [930, 70], False, None),
        ("auto", [100, 0], False, None),  # one class only: nothing to balance
        ("weights", [90, 10, 0], True, [0.5556, 5.0, 0.0]),  # an absent class weighs 0
        ("auto", [400, 400, 100], True, [0.75, 0.75, 3.0]),  # 0.11 x 3 < 0.7 of an even share
    ],
)
def test_resolve_class_balance(mode, counts, applied, weights) -> None:
    """``weights``: the weights that ``auto`` (whose method is the sampler) or ``weights`` would use."""
    decision = resolve_class_balance(mode, counts)
    assert decision.applied == applied
    assert decision.train_counts == counts and decision.mode == mode
    if mode == "auto" and applied:
        assert decision.method == auto_method(True) == "sampler" and decision.weights is None
        assert decision.sampling_factors == sampling_factors(counts)
        unaugmented = resolve_class_balance(mode, counts, augment=False)
        assert unaugmented.method == "weights" and unaugmented.weights == weights
        decision = resolve_class_balance("weights", counts)
    assert decision.weights == weights
    if applied and mode != "none":
        # the average train row weighs 1
        assert sum(w * c for w, c in zip(weights, counts, strict=True)) / sum(counts) == pytest.approx(
            1, abs=1e-3
        )


def test_sampler_draws_every_class_as_often_as_the_largest() -> None:
    assert sampling_factors([628, 44]) == [1.0, 14.2727]
    assert sampling_factors([90, 10, 0]) == [1.0, 9.0, 0.0]  # an absent class is never drawn
    decision = resolve_class_balance("sampler", [628, 44])
    assert (decision.applied, decision.method, decision.weights) == (True, "sampler", None)
    assert decision.sampling_factors == [1.0, 14.2727]
    assert resolve_class_balance("sampler", [500, 500]).sampling_factors == [1.0, 1.0]
    config, _ = apply_class_balance(TrainConfig(class_balance="sampler"), [628, 44])
    assert config.class_weights is None and config.sampling_factors == [1.0, 14.2727]
    labels = np.array([0] * 628 + [1] * 44)
    rng = np.random.default_rng(0)
    copies = repeat_counts(labels, config.sampling_factors, rng)
    assert set(copies[labels == 0]) == {1} and set(copies[labels == 1]) <= {14, 15}
    per_class = np.bincount(labels[sampled_rows(labels, config.sampling_factors, rng)])
    assert abs(per_class[1] - 628) <= 44  # the tumour rows fill about as much of the epoch as the healthy
    with pytest.raises(ValueError, match="classes"):
        repeat_counts(np.array([0, 2]), [1.0, 2.0], rng)


def test_iterate_minibatches_oversamples_with_fresh_augmentation() -> None:
    n = 40
    arrays = {
        "image": np.random.default_rng(1).random((n, 1, 16, 16)).astype(np.float32),
        "label": np.array([0] * 36 + [1] * 4),
    }
    batches = list(
        iterate_minibatches(arrays, 16, np.random.default_rng(2), True, sampling_factors=[1.0, 9.0])
    )
    labels = np.concatenate([b["label"] for b in batches])
    assert len(labels) == 72 and (labels == 1).sum() == 36
    images = np.concatenate([b["image"] for b in batches])[labels == 1]
    assert len({im.tobytes() for im in images}) > 4  # copies of one row are augmented each on its own
    with pytest.raises(ValueError, match="rng"):
        next(iterate_minibatches(arrays, 16, None, False, sampling_factors=[1.0, 9.0]))


def test_given_weights_and_bad_settings() -> None:
    assert resolve_class_balance("auto", [500, 500], [1.0, 3.0]).weights == [1.0, 3.0]
    assert resolve_class_balance("none", [900, 100], [1.0, 3.0]).weights is None
    with pytest.raises(ConfigError, match="class_balance"):
        TrainConfig(class_balance="oversample")
    with pytest.raises(ConfigError, match="sampling_factors"):
        TrainConfig(sampling_factors=[1.0, float("inf")])
    with pytest.raises(ConfigError, match="class_weights"):
        TrainConfig(class_weights=[1.0])
    with pytest.raises(ConfigError, match="class_weights"):
        TrainConfig(class_weights=[1.0, -2.0])
    with pytest.raises(ConfigError, match="3 class counts"):
        apply_class_balance(TrainConfig(), [1, 2, 3])


def test_apply_class_balance_records_the_decision_in_the_config_and_export() -> None:
    from acol_core.export import export_bytes, read_export_info

    counts = train_class_counts(
        {"train": {"healthy": 930, "tumour": 70}, "val": {"healthy": 5}}, ["healthy", "tumour"]
    )
    assert counts == [930, 70]
    model = create_model("cam", num_classes=2, backbone="tiny")
    config, decision = apply_class_balance(TrainConfig(), counts)  # the default: the sampler
    assert config.sampling_factors == [1.0, 13.2857] and config.class_weights is None and decision.applied
    assert TrainConfig.from_dict(config.to_dict()) == config
    info = read_export_info(
        export_bytes(model, config, ["healthy", "tumour"], class_balance=decision.to_dict())
    )
    assert info.config.sampling_factors == [1.0, 13.2857]
    assert info.extra["class_balance"]["method"] == "sampler" and info.extra["class_balance"]["applied"]
    config, decision = apply_class_balance(TrainConfig(class_balance="weights"), counts)
    assert config.class_weights == [0.5376, 7.1429] and config.sampling_factors is None
    info = read_export_info(
        export_bytes(model, config, ["healthy", "tumour"], class_balance=decision.to_dict())
    )
    assert (
        info.config.class_weights == [0.5376, 7.1429] and info.extra["class_balance"]["method"] == "weights"
    )
    unaugmented, decision = apply_class_balance(TrainConfig(augment=False), counts)
    assert unaugmented.class_weights == [0.5376, 7.1429] and decision.method == "weights"
    unbalanced, decision = apply_class_balance(config.replace(class_balance="none"), counts)
    assert unbalanced.class_weights is None and unbalanced.sampling_factors is None and not decision.applied


@pytest.mark.parametrize("name", ["cam", "acol", "coatt", "acol_coatt"])
@pytest.mark.parametrize("anatomy", [False, True])
def test_every_loss_term_takes_the_class_weights(name: str, anatomy: bool) -> None:
    """Unit weights change nothing; weighting one class only equals the loss on that class's rows."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, backbone="tiny", shared_anatomy=anatomy).eval()
    x, labels = torch.randn(6, 1, 32, 32), torch.tensor([0, 0, 0, 0, 1, 1])
    out = model(x, labels)
    plain = model.compute_loss(out, labels)
    ones = model.compute_loss(out, labels, class_weights=torch.ones(2))
    weighted = model.compute_loss(out, labels, class_weights=torch.tensor([0.5, 7.0]))
    for key in plain:
        assert torch.allclose(plain[key], ones[key], atol=1e-6), key
    assert set(weighted) == set(plain)
    # every classification term moves when the rows are reweighted (co-attention's pair terms too)
    for key in model.loss_names:
        assert not torch.allclose(plain[key], weighted[key]), key
    if name in ("cam", "acol"):
        only_tumour = model.compute_loss(out, labels, class_weights=torch.tensor([0.0, 1.0]))
        sub = {k: v[4:] if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        sub["branch_logits"] = [b[4:] for b in out["branch_logits"]]
        assert torch.allclose(only_tumour["loss"], model.compute_loss(sub, labels[4:])["loss"], atol=1e-6)


def test_classification_metrics_balanced_accuracy_and_recall() -> None:
    labels = np.array([0] * 93 + [1] * 7 + [-1] * 3)
    always_healthy = np.zeros(len(labels), int)
    m = classification_metrics(always_healthy, labels, 2)
    assert m == {"rows_0": 93.0, "recall_0": 1.0, "rows_1": 7.0, "recall_1": 0.0, "balanced_accuracy": 0.5}
    m = classification_metrics(np.array([0, 1]), np.array([0, 0]), 2)
    assert (m["balanced_accuracy"], m["rows_1"], "recall_1" in m) == (0.5, 0.0, False)


# --------------------------------------------------------------------------- a small imbalanced run

SIZE = 32


def _imbalanced(n: int, positives: int, seed: int) -> dict[str, np.ndarray]:
    """Brain-like discs; ``positives`` rows hold a faint bright blob (the tumour); a fifth of the healthy
    rows are near-empty (a small disc, the top or bottom of a head)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = rng.normal(0, 0.25, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    labels = np.zeros(n, np.int64)
    labels[rng.choice(n, positives, replace=False)] = 1
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        radius = rng.uniform(4, 7) if (labels[i] == 0 and rng.random() < 0.2) else rng.uniform(11, 14)
        images[i, 0][(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < radius**2] += 0.8
        if labels[i]:
            cy, cx = rng.uniform(11, 21, size=2)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(3, 4.5) ** 2
            images[i, 0][blob] += 0.9
            masks[i][blob] = 1
    return {
        "image": images,
        "label": labels,
        "mask": masks,
        "anatomy_mask": np.zeros_like(masks),
        "fullsup": np.ones(n, bool),
    }


def _train_and_score(balance: str) -> dict[str, float]:
    train = _imbalanced(400, 30, seed=1)  # 7.5 % tumour
    val = _imbalanced(160, 40, seed=2)
    config = TrainConfig(
        model="cam", epochs=6, batch_size=32, lr=0.02, image_size=SIZE, augment=False, class_balance=balance
    )
    config, decision = apply_class_balance(config, np.bincount(train["label"], minlength=2).tolist())
    assert decision.applied == (balance != "none")
    result = fit(
        config,
        train_batches=lambda e: iterate_minibatches(
            train, config.batch_size, np.random.default_rng([3, e]), False
        ),
        val_batches=lambda: iterate_minibatches(val, 80, None, False),
    )
    last = result.history[-1]
    pred = predict(result.model, iterate_minibatches(val, 80, None, False), torch.device("cpu"))
    assert classification_metrics(pred["pred"], pred["label"], 2)["recall_1"] == last["val_recall_1"]
    return last


def test_balanced_training_learns_the_rare_class() -> None:
    """The issue's target on a 7.5 % tumour set; unbalanced, the same run mostly says "healthy"
    (tumour recall 0.07-0.28 over config seeds 0-2, balanced 1.0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        balanced = _train_and_score("auto")
        unbalanced = _train_and_score("none")
    finally:
        torch.set_num_threads(threads)
    assert balanced["val_recall_1"] >= 0.8, balanced
    assert balanced["val_balanced_accuracy"] >= 0.85, balanced
    assert {"val_recall_0", "val_rows_0", "val_rows_1", "val_accuracy", "val_pxap"} <= set(balanced)
    assert unbalanced["val_recall_1"] < 0.5, unbalanced
    assert unbalanced["val_balanced_accuracy"] < 0.75, unbalanced


# --------------------------------------------------------------------------- the imbalanced phantom cohort


@pytest.fixture(scope="module")
def imbalanced_cohort(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ``imbalanced`` phantom preset (a BraTS-like cohort: ~9 % tumour slices, a quarter near-empty)."""
    from acol_core.data.prepare import prepare_dataset

    uri = str(tmp_path_factory.mktemp("imbalanced") / "data")
    prepare_dataset("phantom", uri, seed=1, preset="imbalanced")  # 6.5 % tumour train slices, 26 in val
    return uri


def test_defaults_learn_the_tumour_class_on_an_imbalanced_cohort(imbalanced_cohort: str) -> None:
    """The recipe issue's target: with the defaults (class_balance auto: the sampler, augmentation on),
    val tumour recall >= 0.8 and balanced accuracy >= 0.85 on a cohort where "always healthy" scores ~0.9
    accuracy. (The loss weights missed it on this cohort: ``scripts/imbalanced_recipe.py --mode weights``.)"""
    from acol_core.balance import train_class_counts
    from acol_core.data.shards import open_dataset
    from acol_core.data.transforms import table_to_arrays

    dataset = open_dataset(imbalanced_cohort)
    counts = train_class_counts(dataset.manifest.counts["split_class"], dataset.class_names)
    assert counts[1] / sum(counts) < 0.15  # imbalanced as the real cohort was
    size = 64
    train = table_to_arrays(dataset.read_table("train"), 1, size)
    val = table_to_arrays(dataset.read_table("val"), 1, size)
    assert (val["label"] == 1).sum() >= 8
    config = TrainConfig(model="cam", epochs=12, batch_size=32, lr=0.02, image_size=size)
    config, decision = apply_class_balance(config, counts)
    assert decision.method == "sampler" and config.sampling_factors[1] > 10 * config.sampling_factors[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fit(
            config,
            train_batches=lambda e: iterate_minibatches(
                train,
                config.batch_size,
                np.random.default_rng([5, e]),
                config.augment,
                sampling_factors=config.sampling_factors,
            ),
            val_batches=lambda: iterate_minibatches(val, 64, None, False),
        )
    finally:
        torch.set_num_threads(threads)
    last = result.history[-1]
    assert last["val_recall_1"] >= 0.8, last
    assert last["val_balanced_accuracy"] >= 0.85, last
