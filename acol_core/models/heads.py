"""WSOL models: a backbone plus class-map heads. `cam` (one head) and `acol` (two heads, adversarial erase).

The `WsolModel` base class fixes the contract every registered model keeps (co-attention models too), so
the train loop, the localiser and the sweeps treat all models alike.

Examples:
    >>> import torch
    >>> from acol_core.models import create_model
    >>> model = create_model("acol", num_classes=2, backbone="tiny")
    >>> out = model(torch.zeros(4, 1, 64, 64), labels=torch.tensor([0, 1, 1, 0]))
    >>> out["cam"].shape, model.compute_loss(out, torch.tensor([0, 1, 1, 0]))["loss"].dim()
    (torch.Size([4, 8, 8]), 0)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .erase import check_delta, erase_features, fuse_max, normalize_maps, select_class_maps
from .registry import register_model

__all__ = ["AcolModel", "CamModel", "ClassMapHead", "WsolModel", "acol", "cam"]


class ClassMapHead(nn.Module):
    """`depth` × (3×3 conv + ReLU) at `width` channels, then a 1×1 conv to one map per class.

    GAP of its output gives the logits, so the output itself is the class activation map.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"head_width must be >= 1 and head_depth >= 0, got {width!r}, {depth!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class WsolModel(nn.Module):
    """Base class of every registered model: `backbone` + heads.

    Contract:
        forward(x, labels=None) -> dict with
            "logits": N×C prediction logits;
            "branch_logits": list of N×C logits, each of which receives a loss;
            "maps": dict branch name -> N×C×h×w raw class maps (before GAP);
            "cam": N×h×w fused map in [0, 1] (min-max per image, no gradient) for the target class:
                `labels` when given, else the argmax of "logits".
            Subclasses may add keys and keyword inputs (e.g. an image pairing) but keep these.
        compute_loss(outputs, labels) -> dict with "loss" (the total, a scalar) plus named parts.
        param_groups(lr) -> optimiser groups: backbone at `lr`, everything else at 10 × `lr` (ACoL's recipe).

    Attributes:
        branch_names: names of the branches, in the order of "branch_logits".
        config: set by `create_model`; `create_model(**model.config)` rebuilds the architecture.
    """

    branch_names: tuple[str, ...] = ()

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.config: dict[str, Any] = {}

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def compute_loss(self, outputs: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """Cross-entropy on every branch: {"loss": sum, "ce_<branch>": each}."""
        parts = {
            f"ce_{name}": F.cross_entropy(logits, labels)
            for name, logits in zip(self.branch_names, outputs["branch_logits"], strict=True)
        }
        return {"loss": torch.stack(list(parts.values())).sum(), **parts}

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        """Optimiser groups: trainable backbone params at `lr`, head params at `head_lr_mult` × `lr`."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) in backbone_ids]
        heads = [p for p in trainable if id(p) not in backbone_ids]
        return [
            {"name": "backbone", "params": backbone, "lr": lr},
            {"name": "heads", "params": heads, "lr": lr * head_lr_mult},
        ]

    @staticmethod
    def target_classes(logits: Tensor, labels: Tensor | None) -> Tensor:
        """The class whose map localises: the given label, else the predicted class."""
        return logits.argmax(dim=1) if labels is None else labels


def _gap(maps: Tensor) -> Tensor:
    return maps.mean(dim=(-2, -1))


class CamModel(WsolModel):
    """CAM: one class-map head on the backbone features, trained with cross-entropy on its GAP."""

    branch_names = ("main",)

    def __init__(self, backbone: Backbone, num_classes: int, head_width: int, head_depth: int) -> None:
        super().__init__(backbone, num_classes)
        self.head = ClassMapHead(backbone.out_channels, num_classes, head_width, head_depth)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        maps = self.head(self.backbone(x))
        logits = _gap(maps)
        with torch.no_grad():
            cam = normalize_maps(select_class_maps(maps, self.target_classes(logits, labels)))
        return {"logits": logits, "branch_logits": [logits], "maps": {"main": maps}, "cam": cam}


class AcolModel(WsolModel):
    """ACoL: branch A finds the most discriminative region; branch B sees the features with it erased.

    A's map for the target class (label in training, predicted class otherwise) is min-max normalised
    and positions >= `delta` are zeroed in B's input; the localisation map is max(norm M_A, norm M_B).
    "logits" are A's, since A's prediction picks the erased region when no label is given.
    """

    branch_names = ("a", "b")

    def __init__(
        self, backbone: Backbone, num_classes: int, delta: float, head_width: int, head_depth: int
    ) -> None:
        super().__init__(backbone, num_classes)
        self.delta = check_delta(delta)
        self.head_a = ClassMapHead(backbone.out_channels, num_classes, head_width, head_depth)
        self.head_b = ClassMapHead(backbone.out_channels, num_classes, head_width, head_depth)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        features = self.backbone(x)
        maps_a = self.head_a(features)
        logits_a = _gap(maps_a)
        target = self.target_classes(logits_a, labels)
        with torch.no_grad():
            norm_a = normalize_maps(select_class_maps(maps_a, target))
        maps_b = self.head_b(erase_features(features, norm_a, self.delta))
        logits_b = _gap(maps_b)
        with torch.no_grad():
            cam = fuse_max(norm_a, normalize_maps(select_class_maps(maps_b, target)))
        return {
            "logits": logits_a,
            "branch_logits": [logits_a, logits_b],
            "maps": {"a": maps_a, "b": maps_b},
            "cam": cam,
        }


def _head_size(backbone: Backbone, width: int | None, depth: int | None) -> tuple[int, int]:
    return (
        backbone.default_head_width if width is None else int(width),
        backbone.default_head_depth if depth is None else int(depth),
    )


@register_model("cam")
def cam(
    backbone: Backbone, num_classes: int, *, head_width: int | None = None, head_depth: int | None = None
) -> CamModel:
    """CAM head; `head_width`/`head_depth` default to the backbone's (1024/2 for vgg16 and resnet50)."""
    return CamModel(backbone, num_classes, *_head_size(backbone, head_width, head_depth))


@register_model("acol")
def acol(
    backbone: Backbone,
    num_classes: int,
    *,
    delta: float = 0.6,
    head_width: int | None = None,
    head_depth: int | None = None,
) -> AcolModel:
    """ACoL with erase threshold `delta` in (0, 1); head size defaults as for `cam`."""
    return AcolModel(backbone, num_classes, delta, *_head_size(backbone, head_width, head_depth))
