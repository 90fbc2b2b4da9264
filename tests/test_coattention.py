"""Tests of the co-attention family: pairing, pair targets, co-attention arithmetic, `coatt`, `acol_coatt`,
and the shared-anatomy label on every head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from acol_core.models import (
    CoattModel,
    WsolModel,
    attend,
    coattention_efficient,
    coattention_naive,
    contrastive_features,
    create_model,
    erase_features,
    multi_hot_targets,
    normalize_maps,
    pair_partners,
    pair_targets,
    sample_partners,
    select_class_maps,
)
from acol_core.models.coattention import masked_soft_margin

# ---------------------------------------------------------------- pairing


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(5))
def test_same_policy_pairs_within_class_and_falls_back_for_a_lone_class(seed: int) -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    partners = pair_partners(labels, "same", _gen(seed))
    assert partners[:4].tolist() == [1, 0, 3, 2]
    assert partners[4] != 4  # class 2 has one member: any other sample


@pytest.mark.parametrize("seed", range(5))
def test_different_policy_pairs_across_classes_and_falls_back_when_all_equal(seed: int) -> None:
    labels = torch.tensor([0, 0, 0, 1])
    partners = pair_partners(labels, "different", _gen(seed))
    assert partners[:3].tolist() == [3, 3, 3] and partners[3] in (0, 1, 2)
    uniform = pair_partners(torch.tensor([4, 4, 4]), "different", _gen(seed))
    assert (uniform != torch.arange(3)).all()


def test_mixed_policy_is_uniform_over_the_other_samples() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    gen = _gen(3)
    draws = torch.stack([pair_partners(labels, "mixed", gen) for _ in range(1500)])
    assert (draws != torch.arange(4)).all()
    counts = torch.bincount(draws[:, 0], minlength=4)
    assert counts[0] == 0 and ((counts[1:] - 500).abs() < 100).all(), counts  # ~5 sigma


def test_pairing_is_reproducible_and_handles_tiny_batches() -> None:
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    assert torch.equal(pair_partners(labels, "mixed", _gen(7)), pair_partners(labels, "mixed", _gen(7)))
    assert pair_partners(torch.tensor([1]), "same").tolist() == [0]  # batch of one: itself
    assert pair_partners(torch.tensor([0, 1]), "same", _gen()).tolist() == [1, 0]
    assert pair_partners(torch.zeros(0, dtype=torch.long), "mixed").shape == (0,)
    with pytest.raises(ValueError, match="pair_policy"):
        pair_partners(labels, "random")
    with pytest.raises(ValueError, match="labels"):
        pair_partners(labels.float(), "same")


def test_sample_partners_draws_distinct_valid_columns_and_flags_padding() -> None:
    valid = torch.tensor([[False, True, True, False], [False, False, False, False], [True] * 4, [True] * 4])
    idx, ok = sample_partners(valid, 3, _gen())
    assert idx.shape == ok.shape == (4, 3)
    assert ok.tolist()[:2] == [[True, True, False], [False, False, False]] and ok[2:].all()
    assert set(idx[0, :2].tolist()) == {1, 2} and all(len(set(row.tolist())) == 3 for row in idx)
    assert sample_partners(valid, 9, _gen())[0].shape == (4, 4)  # k is capped at N


def test_pair_targets_hand_computed_with_anatomy_column() -> None:
    targets = multi_hot_targets(torch.tensor([0, 1, 1]), 2, anatomy=True)
    assert targets.tolist() == [[1, 0, 1], [0, 1, 1], [0, 1, 1]]
    common, contrast = pair_targets(targets, torch.tensor([1, 2, 0]))
    assert common.tolist() == [[0, 0, 1], [0, 1, 1], [0, 0, 1]]
    assert contrast.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError):
        pair_targets(targets, torch.tensor([0, 1]))


def test_masked_soft_margin_averages_kept_samples_and_is_zero_on_the_graph_when_none() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [9.0, 9.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([True, True, False])
    expected = F.multilabel_soft_margin_loss(logits[:2], targets[:2])
    assert torch.allclose(masked_soft_margin(logits, targets, mask), expected)
    none = masked_soft_margin(logits, targets, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and torch.equal(logits.grad, torch.zeros(3, 2))


# ---------------------------------------------------------------- co-attention arithmetic


@pytest.mark.parametrize(
    ("shape_m", "shape_n", "dtype", "tol"),
    [
        ((2, 6, 3, 5), (2, 6, 4, 2), torch.float64, 1e-10),  # non-square, different sizes
        ((3, 8, 4, 4), (3, 8, 4, 4), torch.float64, 1e-10),
        ((2, 16, 7, 3), (2, 16, 5, 6), torch.float32, 1e-5),
    ],
)
def test_efficient_coattention_matches_naive_values_and_gradients(
    shape_m: tuple[int, ...], shape_n: tuple[int, ...], dtype: torch.dtype, tol: float
) -> None:
    gen = _gen(11)
    d = shape_m[1]
    f_m = torch.randn(shape_m, generator=gen, dtype=dtype, requires_grad=True)
    f_n = torch.randn(shape_n, generator=gen, dtype=dtype, requires_grad=True)
    weight = (torch.randn(d, d, generator=gen, dtype=dtype) / d**0.5).requires_grad_(True)
    probe_m, probe_n = torch.randn(shape_m, dtype=dtype), torch.randn(shape_n, dtype=dtype)
    results = []
    for fn in (coattention_naive, coattention_efficient):
        att_m, att_n = fn(f_m, f_n, weight)
        assert att_m.shape == shape_m and att_n.shape == shape_n
        grads = torch.autograd.grad((att_m * probe_m).sum() + (att_n * probe_n).sum(), (f_m, f_n, weight))
        results.append((att_m, att_n, *grads))
    for naive, efficient in zip(*results, strict=True):  # outputs, then grads of f_m, f_n, W
        assert (naive - efficient).abs().max() <= tol * naive.abs().max()  # relative to the tensor's scale


def test_zero_affinity_weight_gives_the_partner_mean_everywhere() -> None:
    # W = 0: every affinity is 0, both softmaxes are uniform, each position gets the partner's mean feature.
    f_m = torch.arange(12.0).reshape(1, 2, 2, 3)
    f_n = torch.tensor([[[[1.0, 3.0]], [[10.0, 20.0]]]])  # D=2, 1×2 map
    for fn in (coattention_naive, coattention_efficient):
        att_m, att_n = fn(f_m, f_n, torch.zeros(2, 2))
        assert torch.allclose(att_m, torch.tensor([2.0, 15.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3))
        assert torch.allclose(att_n, torch.tensor([2.5, 8.5]).view(1, 2, 1, 1).expand(1, 2, 1, 2))


def test_large_affinity_attends_to_the_best_matching_partner_position() -> None:
    # D=1, W=50: position i of m (value ±1) takes the partner value v maximising 50·f_i·v.
    f_m = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    f_n = torch.tensor([0.5, -2.0, 1.5]).view(1, 1, 1, 3)
    att = attend(f_m, f_n, torch.tensor([[50.0]]))
    assert torch.allclose(att.flatten(), torch.tensor([1.5, -2.0]), atol=1e-6)


def test_efficient_path_never_allocates_the_affinity_matrix() -> None:
    n, d, side = 2, 8, 40  # A = B = 1600 positions: P would be 2×1600×1600 floats = 20 MB
    affinity_bytes = n * (side * side) ** 2 * 4
    f_m = torch.randn(n, d, side, side, requires_grad=True)
    f_n = torch.randn(n, d, side, side, requires_grad=True)
    weight = torch.randn(d, d, requires_grad=True)

    def largest_allocation(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            att_m, att_n = fn(f_m, f_n, weight)
            (att_m.sum() + att_n.sum()).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the flash kernel's scratch is one tile per thread
    try:
        assert largest_allocation(coattention_naive) >= affinity_bytes  # the probe sees the naive matrix
        assert largest_allocation(coattention_efficient) < affinity_bytes / 8
    finally:
        torch.set_num_threads(threads)


def test_contrastive_features_gate_hand_computed() -> None:
    features = torch.full((1, 2, 1, 2), 4.0)
    gate = torch.tensor([[[[0.0, 100.0]]]])  # σ = 0.5 and ~1
    out = contrastive_features(features, gate)
    assert torch.allclose(out, torch.tensor([[[[2.0, 0.0]], [[2.0, 0.0]]]]), atol=1e-6)


# ---------------------------------------------------------------- models

C = 3


def _model(name: str, **options: object) -> WsolModel:
    torch.manual_seed(2)
    return create_model(name, C, in_channels=1, backbone="tiny", head_width=8, **options)


def _batch(n: int = 4, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=_gen(seed))


def test_create_coatt_by_name_with_config() -> None:
    model = create_model("coatt", num_classes=2, in_channels=1, backbone="tiny", pair_policy="mixed")
    assert isinstance(model, CoattModel) and model.pair_policy == "mixed"
    assert model.config == {
        "name": "coatt", "num_classes": 2, "in_channels": 1, "backbone": "tiny", "pair_policy": "mixed",
    }  # fmt: skip
    again = create_model(**_model("acol_coatt", delta=0.4, w_erased=0.5, pair_policy="same").config)
    assert (again.delta, again.pair_policy, again.loss_weights["ce_b"]) == (0.4, "same", 0.5)


@pytest.mark.parametrize(
    "options",
    [{"pair_policy": "nearest"}, {"w_common": -1.0}, {"w_contrast": float("nan")}, {"infer_partners": -1}],
)
def test_bad_coattention_options_raise(options: dict[str, object]) -> None:
    for name in ("coatt", "acol_coatt"):
        with pytest.raises(ValueError):
            _model(name, **options)
    with pytest.raises(ValueError, match="delta"):
        _model("acol_coatt", delta=1.0)


def test_coatt_branches_common_on_its_own_classifier_single_and_contrast_on_the_head() -> None:
    model, x, labels = _model("coatt", pair_policy="mixed").train(), _batch(), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(9)
    out = model(x, labels)
    torch.manual_seed(9)  # training draws partners from the global RNG: same seed, same pairs
    assert torch.equal(pair_partners(labels, "mixed"), out["partners"])
    with torch.no_grad():
        features = model.head.trunk(model.backbone(x))
        weight = model.coattention.affinity.weight
        attended = coattention_naive(features, features[out["partners"]], weight)[0]
        contrast = contrastive_features(features, model.coattention.gate(attended))
        expected = {
            "single": model.head.classifier(features),
            "common": model.common_classifier(attended),
            "contrast": model.head.classifier(contrast),
        }
    assert list(out["maps"]) == ["single", "common", "contrast"]
    for name, maps in expected.items():
        assert torch.allclose(out["maps"][name], maps, atol=1e-5), name
    assert torch.allclose(out["logits"], expected["single"].mean(dim=(2, 3)))
    assert torch.allclose(out["cam"], normalize_maps(select_class_maps(expected["single"], labels)))


@pytest.mark.parametrize("name", ["coatt", "acol_coatt"])
def test_coatt_losses_hand_computed_and_weighted(name: str) -> None:
    weights = {"w_single": 0.5, "w_common": 0.0, "w_contrast": 2.0}
    model, labels = _model(name, pair_policy="same", **weights), torch.tensor([0, 0, 2, 1])
    out = model.train()(_batch(), labels)
    partners = out["partners"]
    assert partners[:2].tolist() == [1, 0] and partners[2] != 2 and partners[3] != 3
    onehot = F.one_hot(labels, C).float()
    common, contrast = onehot * onehot[partners], onehot * (1 - onehot[partners])
    logits = out["branch_logits"]
    assert model.loss_names[0] == ("ce_a" if name == "acol_coatt" else "ce_single")
    expected = {
        model.loss_names[0]: F.cross_entropy(logits[0], labels),
        "sm_common": F.multilabel_soft_margin_loss(logits[1], common),
        "sm_contrast": F.multilabel_soft_margin_loss(logits[2], contrast),
    }
    total = 0.5 * expected[model.loss_names[0]] + 2.0 * expected["sm_contrast"]
    if name == "acol_coatt":
        expected["ce_b"] = F.cross_entropy(logits[3], labels)
        total = total + expected["ce_b"]
    losses = model.compute_loss(out, labels)
    assert set(losses) == {"loss", *expected}
    for key, value in expected.items():
        assert torch.allclose(losses[key], value), key
    assert torch.allclose(losses["loss"], total)


@pytest.mark.parametrize("name", ["coatt", "acol_coatt"])
def test_batch_of_one_pairs_with_itself_and_skips_pair_losses(name: str) -> None:
    model = _model(name).train()
    out = model(_batch(1), torch.tensor([2]))
    assert out["partners"].tolist() == [0]
    losses = model.compute_loss(out, torch.tensor([2]))
    assert losses["sm_common"].item() == 0 and losses["sm_contrast"].item() == 0
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_partners_are_repeatable() -> None:
    model, x = _model("coatt", infer_partners=2).eval(), _batch(6)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first["partners"], second["partners"]) and torch.equal(first["cam"], second["cam"])


def test_infer_partners_averages_coattended_maps_over_partners_of_the_predicted_class() -> None:
    # K = 5 >= N - 1 draws every eligible partner, so the expected average does not depend on the draw.
    model, x = _model("coatt", infer_partners=5).eval(), _batch(6)
    with torch.no_grad():
        logits = model(x)["logits"]
        bias = model.head.classifier.bias
        bias[2] -= 100.0  # nobody predicts class 2; about half the batch predicts class 1:
        bias[1] -= (logits[:, 1] - logits[:, 0]).median() + 1e-4
        predicted = model(x)["logits"].argmax(1)
        labels = predicted.clone()
        labels[0] = 2  # no partner is predicted as class 2: image 0 keeps its own map
        out = model(x, labels)
        features = model.head.trunk(model.backbone(x))
        weight = model.coattention.affinity.weight
    assert {0, 1} <= set(predicted.tolist()) <= {0, 1}
    own = normalize_maps(select_class_maps(out["maps"]["single"], labels))
    assert torch.allclose(out["cam"][0], own[0])
    for i in range(1, 6):
        partners = [j for j in range(6) if j != i and predicted[j] == labels[i]]
        if not partners:
            assert torch.allclose(out["cam"][i], own[i])
            continue
        att = attend(features[i : i + 1].expand(len(partners), -1, -1, -1), features[partners], weight)
        maps = select_class_maps(model.common_classifier(att), labels[i].repeat(len(partners)))
        assert torch.allclose(out["cam"][i], normalize_maps(maps.mean(0)), atol=1e-5)
        assert not torch.allclose(out["cam"][i], own[i], atol=1e-3)
    plain = create_model(**{**model.config, "infer_partners": 0})
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x, labels)["cam"], own)


def test_acol_coatt_erases_a_target_region_for_b_and_fuses_with_max() -> None:
    model, x, labels = _model("acol_coatt", delta=0.5).eval(), _batch(), torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        out = model(x, labels)
        features = model.backbone(x)
        norm_a = normalize_maps(select_class_maps(model.head(features), labels))
        maps_b = model.head_b(erase_features(features, norm_a, 0.5))
    assert ((norm_a >= 0.5).sum(dim=(1, 2)) >= 1).all()
    assert list(out["maps"]) == ["a", "common", "contrast", "b"]
    assert torch.allclose(out["maps"]["b"], maps_b, atol=1e-6)
    fused = torch.maximum(norm_a, normalize_maps(select_class_maps(maps_b, labels)))
    assert torch.allclose(out["cam"], fused, atol=1e-6)


@pytest.mark.parametrize("name", ["coatt", "acol_coatt"])
def test_constant_input_gives_all_zero_cam(name: str) -> None:
    with torch.no_grad():
        out = _model(name, infer_partners=1).eval()(torch.zeros(3, 1, 32, 32))
    assert torch.equal(out["cam"], torch.zeros(3, 4, 4))


# ---------------------------------------------------------------- shared anatomy, every head


@pytest.mark.parametrize("name", ["cam", "acol", "coatt", "acol_coatt"])
def test_shared_anatomy_adds_an_always_on_class_to_maps_and_loss_only(name: str) -> None:
    model, labels = _model(name, shared_anatomy=True).train(), torch.tensor([0, 2, 2, 1])
    out = model(_batch(), labels)
    assert model.num_outputs == C + 1 and out["logits"].shape == (4, C)
    assert all(m.shape == (4, C + 1, 4, 4) for m in out["maps"].values())
    assert all(t.shape == (4, C + 1) for t in out["branch_logits"])
    assert torch.equal(out["logits"], out["branch_logits"][0][:, :C])
    targets = torch.cat([F.one_hot(labels, C).float(), torch.ones(4, 1)], dim=1)
    losses = model.compute_loss(out, labels)
    assert all(k.startswith("ce_") for k in losses if k not in ("loss", "sm_common", "sm_contrast"))
    first, logits = model.loss_names[0], out["branch_logits"][0]
    anatomy = F.binary_cross_entropy_with_logits(
        logits[:, C], torch.ones(4)
    )  # CE on classes + BCE on anatomy
    assert torch.allclose(losses[first], F.cross_entropy(logits[:, :C], labels) + anatomy)
    if "partners" in out:  # the anatomy class is common to every pair, never contrastive
        common, contrast = pair_targets(targets, out["partners"])
        assert (common[:, C] == 1).all() and (contrast[:, C] == 0).all()
        expected = F.multilabel_soft_margin_loss(out["branch_logits"][1], common)
        assert torch.allclose(losses["sm_common"], expected)
    losses["loss"].backward()
    classifier = (model.head if hasattr(model, "head") else model.head_a).layers[-1]
    assert classifier.weight.grad[C].abs().sum() > 0  # the anatomy channel learns


def test_shared_anatomy_off_keeps_cross_entropy_for_cam_and_acol() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    for name in ("cam", "acol"):
        model = _model(name)
        out = model(_batch(), labels)
        losses = model.compute_loss(out, labels)
        assert model.num_outputs == C and set(losses) == {"loss", *(f"ce_{b}" for b in model.branch_names)}
        assert torch.allclose(losses[f"ce_{model.branch_names[0]}"], F.cross_entropy(out["logits"], labels))


def test_coattention_models_run_under_bf16_autocast() -> None:
    model, labels = _model("acol_coatt", infer_partners=2, shared_anatomy=True), torch.tensor([0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the train loop's CUDA autocast, on CPU
        out = model(_batch(), labels)
        losses = model.compute_loss(out, labels)
    losses["loss"].backward()
    assert out["maps"]["common"].dtype == torch.bfloat16 and torch.isfinite(losses["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
