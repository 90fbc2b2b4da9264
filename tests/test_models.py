"""Tests of acol_core.models: erase arithmetic, registry, every model × backbone, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from acol_core.models import (
    Backbone,
    ResNet50Backbone,
    Vgg16Backbone,
    WsolModel,
    adapt_first_conv,
    create_backbone,
    create_model,
    erase_features,
    erase_mask,
    fuse_maps,
    fuse_max,
    list_backbones,
    list_models,
    load_pretrained,
    normalize_maps,
    select_class_maps,
)

# ---------------------------------------------------------------- erase.py: pure functions


def test_normalize_maps_hand_computed_per_sample() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[-3.0, -1.0], [-2.0, -3.0]]])
    expected = torch.tensor([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 1.0], [0.5, 0.0]]])
    assert torch.allclose(normalize_maps(maps), expected)


def test_normalize_maps_works_per_class_channel() -> None:
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = normalize_maps(maps)
    assert out.shape == maps.shape
    assert torch.allclose(out, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).reshape(2, 2).expand(2, 3, 2, 2))


@pytest.mark.parametrize(
    "bad",
    [
        torch.full((3, 3), 7.0),
        torch.zeros(3, 3),
        torch.tensor([[0.0, math.nan], [1.0, 2.0]]),
        torch.tensor([[0.0, math.inf], [1.0, 2.0]]),
        torch.full((2, 2), math.nan),
    ],
    ids=["constant", "zeros", "one-nan", "inf", "all-nan"],
)
def test_normalize_maps_degenerate_map_gives_zeros_and_spares_others(bad: torch.Tensor) -> None:
    good = torch.arange(bad.numel(), dtype=torch.float32).reshape(bad.shape)
    raw = torch.stack([bad, good]).requires_grad_(True)
    out = normalize_maps(raw)
    assert torch.equal(out[0], torch.zeros_like(bad))
    assert out[1].min() == 0 and out[1].max() == 1
    out.sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_normalize_maps_integer_and_empty_inputs() -> None:
    assert torch.allclose(normalize_maps(torch.tensor([[0, 2], [4, 8]])), torch.tensor([[0, 0.25], [0.5, 1]]))
    assert normalize_maps(torch.zeros(2, 0, 3)).shape == (2, 0, 3)
    with pytest.raises(ValueError):
        normalize_maps(torch.zeros(4))


@pytest.mark.parametrize(
    ("delta", "keep"),
    [
        (0.6, [[1, 0, 0], [1, 1, 0]]),
        (0.3, [[1, 0, 0], [0, 0, 0]]),
        (0.95, [[1, 1, 0], [1, 1, 0]]),
        (0.96, [[1, 1, 0], [1, 1, 1]]),
    ],
)
def test_erase_mask_zeroes_exactly_positions_at_or_above_delta(delta: float, keep: list[list[int]]) -> None:
    norm = torch.tensor([[[0.2, 0.6, 1.0], [0.3, 0.59, 0.95]]])
    assert torch.equal(erase_mask(norm, delta), torch.tensor([keep], dtype=torch.float32))


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_erase_mask_rejects_delta_outside_open_unit_interval(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        erase_mask(torch.zeros(1, 2, 2), delta)


def test_erase_features_gradient_flows_through_kept_positions_only() -> None:
    raw = torch.tensor([[[0.0, 3.0], [1.0, 2.0]]], requires_grad=True)  # normalised: 0, 1, 1/3, 2/3
    norm = normalize_maps(raw)
    features = torch.full((1, 4, 2, 2), 2.0, requires_grad=True)
    mask = erase_mask(norm, 0.5)
    assert not mask.requires_grad and mask.grad_fn is None
    out = erase_features(features, norm, 0.5)
    keep = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.equal(out, 2.0 * keep.expand(1, 4, 2, 2))
    out.sum().backward()
    assert torch.equal(features.grad, keep.expand(1, 4, 2, 2))
    assert raw.grad is None  # the mask is no path back to the map


def test_erase_features_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        erase_features(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 5), 0.5)


def test_select_class_maps_picks_each_samples_class() -> None:
    maps = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    assert torch.equal(
        select_class_maps(maps, torch.tensor([2, 0])), torch.tensor([[[4.0, 5.0]], [[6.0, 7.0]]])
    )
    for bad in (torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([0])):
        with pytest.raises(ValueError):
            select_class_maps(maps, bad)


def test_fuse_max_is_elementwise_max() -> None:
    a = torch.tensor([[[0.1, 0.9], [0.5, 0.0]]])
    b = torch.tensor([[[0.3, 0.2], [0.5, 1.0]]])
    assert torch.equal(fuse_max(a, b), torch.tensor([[[0.3, 0.9], [0.5, 1.0]]]))
    with pytest.raises(ValueError):
        fuse_max(a, b[..., :1])


# ---------------------------------------------------------------- registry


def test_registries_list_sorted_names() -> None:
    assert {"acol", "acol_coatt", "cam", "coatt"} <= set(list_models()) and list_models() == sorted(
        list_models()
    )
    assert {"resnet50", "tiny", "vgg16"} <= set(list_backbones()) and list_backbones() == sorted(
        list_backbones()
    )


def test_unknown_names_raise_value_error_listing_known_ones() -> None:
    with pytest.raises(ValueError, match="known models: acol, acol_coatt, cam, coatt"):
        create_model("nope", num_classes=2)
    with pytest.raises(ValueError, match="resnet50, tiny, vgg16"):
        create_model("cam", num_classes=2, backbone="alexnet")
    with pytest.raises(ValueError, match="resnet50, tiny, vgg16"):
        create_backbone("alexnet")


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(
        TypeError,
        match=r"'cam' got unknown option\(s\) delta; it accepts: head_depth, head_width, shared_anatomy",
    ):
        create_model("cam", num_classes=2, delta=0.5)
    for delta in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="delta"):
            create_model("acol", num_classes=2, delta=delta)
    with pytest.raises(ValueError, match="head_width"):
        create_model("acol", num_classes=2, head_width=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cam", num_classes=0)


def test_config_rebuilds_the_same_architecture() -> None:
    model = create_model("acol", num_classes=3, in_channels=2, delta=0.7, head_width=8, head_depth=2)
    assert model.config == {
        "name": "acol", "num_classes": 3, "in_channels": 2, "backbone": "tiny",
        "delta": 0.7, "head_width": 8, "head_depth": 2,
    }  # fmt: skip
    again = create_model(**model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert again.delta == 0.7


# ---------------------------------------------------------------- every model × backbone

# backbone -> (in_channels, batch, input size); small inputs keep vgg16/resnet50 fast on CPU.
BACKBONE_CASES = {"tiny": (2, 3, 64), "vgg16": (3, 2, 64), "resnet50": (1, 2, 64)}
NUM_CLASSES = 3


@pytest.fixture(scope="module", params=[(m, b) for m in list_models() for b in list_backbones()], ids=str)
def built(request: pytest.FixtureRequest) -> tuple[WsolModel, torch.Tensor, torch.Tensor]:
    name, backbone = request.param
    channels, batch, size = BACKBONE_CASES[backbone]
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, in_channels=channels, backbone=backbone)
    x = torch.randn(batch, channels, size, size)
    labels = torch.arange(batch) % NUM_CLASSES
    return model, x, labels


def test_backbone_attributes_and_feature_shape() -> None:
    expected = {"tiny": (128, 8), "vgg16": (512, 8), "resnet50": (2048, 16)}
    for name, (channels, stride) in expected.items():
        net = create_backbone(name, in_channels=5)
        assert isinstance(net, Backbone) and (net.out_channels, net.stride) == (channels, stride)
        assert net.eval()(torch.zeros(1, 5, 32, 32)).shape == (1, channels, 32 // stride, 32 // stride)


def test_train_forward_shapes_loss_and_backward(built: tuple[WsolModel, torch.Tensor, torch.Tensor]) -> None:
    model, x, labels = built
    model.train().zero_grad()
    out = model(x, labels)
    n, h = x.shape[0], x.shape[-1] // model.backbone.stride
    assert out["logits"].shape == (n, NUM_CLASSES)
    assert len(out["branch_logits"]) == len(model.branch_names) >= 1
    assert all(t.shape == (n, NUM_CLASSES) for t in out["branch_logits"])
    assert list(out["maps"]) == list(model.branch_names)
    assert all(m.shape == (n, NUM_CLASSES, h, h) and torch.isfinite(m).all() for m in out["maps"].values())
    assert out["cam"].shape == (n, h, h) and 0 <= out["cam"].min() and out["cam"].max() <= 1
    losses = model.compute_loss(out, labels)
    assert len(model.loss_names) == len(model.branch_names)
    if type(model).__name__ in ("CamModel", "AcolModel"):
        assert model.loss_names == tuple(f"ce_{b}" for b in model.branch_names)
    assert set(losses) == {"loss", *model.loss_names}
    weights = getattr(model, "loss_weights", {})  # co-attention weighs its terms; the others sum them
    parts = [weights.get(k, 1.0) * v for k, v in losses.items() if k != "loss"]
    assert torch.isfinite(losses["loss"]) and torch.allclose(losses["loss"], sum(parts))
    losses["loss"].backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), (
        "every parameter gets a grad"
    )
    head_keys = [k for k in grads if not k.startswith("backbone.")]
    for branch_prefix in {k.split(".")[0] for k in head_keys}:
        assert any(grads[k].abs().sum() > 0 for k in head_keys if k.startswith(branch_prefix))
    assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("backbone."))


def test_no_grad_inference_gives_normalised_cam(built: tuple[WsolModel, torch.Tensor, torch.Tensor]) -> None:
    model, x, _ = built
    with torch.no_grad():
        out = model.eval()(x)
    h = x.shape[-1] // model.backbone.stride
    cam = out["cam"]
    assert cam.shape == (x.shape[0], h, h) and not cam.requires_grad
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert torch.isfinite(model.compute_loss(out, out["logits"].argmax(1))["loss"])


def test_param_groups_split_backbone_and_heads(built: tuple[WsolModel, torch.Tensor, torch.Tensor]) -> None:
    model, _, _ = built
    groups = model.param_groups(0.01)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD(groups, lr=0.01)  # the groups are valid optimiser input


def _tiny(name: str, **options: float | str) -> WsolModel:
    torch.manual_seed(1)
    return create_model(name, NUM_CLASSES, in_channels=1, backbone="tiny", **options).eval()


@pytest.mark.parametrize("use_labels", [True, False], ids=["given-label", "predicted-class"])
def test_cam_model_target_is_label_or_prediction(use_labels: bool) -> None:
    model, x = _tiny("cam"), torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        predicted = model(x)["logits"].argmax(1)
        labels = (predicted + 1) % NUM_CLASSES if use_labels else None
        out = model(x, labels)
    target = labels if use_labels else predicted
    expected = normalize_maps(select_class_maps(out["maps"]["main"], target))
    assert torch.allclose(out["cam"], expected)
    other = normalize_maps(select_class_maps(out["maps"]["main"], (target + 1) % NUM_CLASSES))
    assert not torch.allclose(out["cam"], other)


@pytest.mark.parametrize("use_labels", [True, False], ids=["given-label", "predicted-class"])
def test_acol_erases_target_region_and_fuses_with_max(use_labels: bool) -> None:
    model, x = _tiny("acol", delta=0.5), torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        features = model.backbone(x)
        maps_a = model.head_a(features)
        predicted = F.adaptive_avg_pool2d(maps_a, 1).flatten(1).argmax(1)
        labels = (predicted + 1) % NUM_CLASSES if use_labels else None
        out = model(x, labels)
        target = labels if use_labels else predicted
        norm_a = normalize_maps(select_class_maps(maps_a, target))
        erased = features * (norm_a < 0.5).unsqueeze(1)
        maps_b = model.head_b(erased)
    assert ((norm_a >= 0.5).sum(dim=(1, 2)) >= 1).all()  # something was erased in every image
    assert torch.allclose(out["maps"]["a"], maps_a) and torch.allclose(out["maps"]["b"], maps_b, atol=1e-6)
    assert torch.allclose(out["logits"], out["branch_logits"][0])
    fused = torch.maximum(norm_a, normalize_maps(select_class_maps(maps_b, target)))
    assert torch.allclose(out["cam"], fused, atol=1e-6)


def test_fusions_on_hand_built_maps() -> None:
    a = torch.tensor([[[4.0, 0.0], [2.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # weak evidence where A has none
    assert torch.equal(fuse_maps(a, b, "max"), torch.tensor([[[1.0, 1.0], [0.5, 0.0]]]))
    assert torch.equal(fuse_maps(a, b, "mean"), torch.tensor([[[0.5, 0.5], [0.25, 0.0]]]))
    assert torch.equal(fuse_maps(a, b, "joint"), torch.tensor([[[1.0, 0.25], [0.5, 0.0]]]))
    assert torch.equal(fuse_maps(a, b, "a"), torch.tensor([[[1.0, 0.0], [0.5, 0.0]]]))
    given = torch.full_like(a, 0.25)
    assert torch.equal(fuse_maps(a, b, "max", norm_a=given), torch.tensor([[[0.25, 1.0], [0.25, 0.25]]]))
    with pytest.raises(ValueError, match="fusion must be one of"):
        fuse_maps(a, b, "sum")


@pytest.mark.parametrize("name", ["acol", "acol_coatt"])
@pytest.mark.parametrize("fusion", ["mean", "joint", "a"])
def test_fusion_option_sets_the_cam(name: str, fusion: str) -> None:
    model, x, labels = (
        _tiny(name, delta=0.5, fusion=fusion),
        torch.randn(4, 1, 32, 32),
        torch.tensor([0, 1, 2, 1]),
    )
    with torch.no_grad():
        out = model(x, labels)
    maps_a, maps_b = (select_class_maps(out["maps"][k], labels) for k in ("a", "b"))
    assert torch.allclose(out["cam"], fuse_maps(maps_a, maps_b, fusion), atol=1e-6)
    with pytest.raises(ValueError, match="fusion"):
        _tiny(name, fusion="sum")


def test_constant_input_gives_all_zero_cam() -> None:
    for name in ("cam", "acol"):
        with torch.no_grad():
            out = _tiny(name)(torch.zeros(2, 1, 32, 32))
        assert torch.equal(out["cam"], torch.zeros(2, 4, 4))


# ---------------------------------------------------------------- pretrained weights


def _random_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def test_vgg16_loads_torchvision_checkpoint(tmp_path) -> None:
    conv_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16.features conv indices
    tv_keys = {f"features.{i}.{p}" for i in conv_idx for p in ("weight", "bias")}
    state = _random_like(Vgg16Backbone(in_channels=3).state_dict())
    assert set(state) == tv_keys
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    state |= {"classifier.0.weight": torch.randn(8, 4), "classifier.6.bias": torch.randn(10)}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)

    rgb = create_backbone("vgg16", in_channels=3, pretrained=str(path))
    assert all(torch.equal(v, state[k]) for k, v in rgb.state_dict().items())

    grey = create_backbone("vgg16", in_channels=1, pretrained=path)
    assert grey.features[0].weight.shape == (64, 1, 3, 3)
    assert torch.allclose(grey.features[0].weight, state["features.0.weight"].sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(grey.features[28].weight, state["features.28.weight"])  # positions match too
    assert isinstance(grey.features[23], torch.nn.Identity) and len(grey.features) == 31


def test_resnet50_loads_torchvision_checkpoint_without_bn_counters(tmp_path) -> None:
    own = ResNet50Backbone(in_channels=3).state_dict()
    assert len(own) == 318  # torchvision resnet50's 320 keys less fc.weight/fc.bias
    torchvision_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer3.5.bn2.running_var": (256,),
        "layer4.0.conv2.weight": (512, 512, 3, 3),
        "layer4.0.downsample.1.weight": (2048,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
    }
    assert {k: tuple(own[k].shape) for k in torchvision_shapes} == torchvision_shapes
    # Older torchvision files lack num_batches_tracked; safetensors path exercised here.
    state = {k: v for k, v in _random_like(own).items() if not k.endswith("num_batches_tracked")}
    state |= {"fc.weight": torch.randn(10, 2048), "fc.bias": torch.randn(10)}
    path = tmp_path / "resnet50.safetensors"
    save_file(state, str(path))
    net = create_backbone("resnet50", in_channels=2, pretrained=path)
    loaded = net.state_dict()
    assert torch.equal(loaded["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert torch.equal(loaded["layer2.1.bn1.running_mean"], state["layer2.1.bn1.running_mean"])
    assert torch.allclose(
        loaded["conv1.weight"], state["conv1.weight"].mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    )


@pytest.mark.parametrize("in_channels", [1, 2, 4])
def test_adapt_first_conv_matches_rgb_response_on_grey_input(in_channels: int) -> None:
    weight = torch.randn(6, 3, 3, 3)
    grey = torch.randn(1, 1, 8, 8)
    rgb_response = F.conv2d(grey.repeat(1, 3, 1, 1), weight)
    adapted = adapt_first_conv(weight, in_channels)
    assert adapted.shape == (6, in_channels, 3, 3)
    assert torch.allclose(F.conv2d(grey.repeat(1, in_channels, 1, 1), adapted), rgb_response, atol=1e-5)


def test_create_model_with_pretrained_tiny_backbone(tmp_path) -> None:
    state = _random_like(create_backbone("tiny", in_channels=1).state_dict())
    torch.save(state, tmp_path / "tiny.pt")
    model = create_model("acol", 2, in_channels=1, backbone="tiny", pretrained=tmp_path / "tiny.pt")
    assert torch.equal(model.backbone.block4[0].weight, state["block4.0.weight"])
    assert "pretrained" not in model.config


def _bad_files(state: dict[str, torch.Tensor]) -> dict[str, tuple[object, str]]:
    renamed = {("features.0.weight" if k == "block1.0.weight" else k): v for k, v in state.items()}
    reshaped = state | {"block4.0.weight": torch.zeros(128, 64, 1, 1)}
    dropped = {k: v for k, v in state.items() if k != "block2.1.bias"}
    return {
        "renamed": (renamed, r"missing keys \[block1.0.weight\]; unexpected keys \[features.0.weight\]"),
        "reshaped": (reshaped, r"shape mismatches \[block4.0.weight"),
        "dropped": (dropped, r"missing keys \[block2.1.bias\]"),
        "foreign-classifier": (state | {"fc.weight": torch.zeros(2, 2)}, r"unexpected keys \[fc.weight\]"),
        "not-a-dict": ([torch.zeros(2)], "flat state dict"),
        "nested": ({"state_dict": state}, "flat state dict"),
    }


@pytest.mark.parametrize(
    "case", ["renamed", "reshaped", "dropped", "foreign-classifier", "not-a-dict", "nested"]
)
def test_bad_weights_file_raises_and_loads_nothing(tmp_path, case: str) -> None:
    net = create_backbone("tiny", in_channels=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    content, message = _bad_files(_random_like(before))[case]
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(net, path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_unreadable_or_missing_weights_file(tmp_path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        create_backbone("tiny", pretrained=tmp_path / "junk.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")  # a pickled module, refused by weights_only
    with pytest.raises(ValueError, match="cannot read weights"):
        create_backbone("tiny", pretrained=tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError):
        create_backbone("tiny", pretrained=tmp_path / "absent.pth")
