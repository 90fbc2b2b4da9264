"""WSOL models: a backbone plus class-map heads. `cam` (one head) and `acol` (two heads, adversarial erase).

The `WsolModel` base class fixes the contract every registered model keeps (co-attention models too), so
the train loop, the localiser and the sweeps treat all models alike.

Shared-anatomy label (`shared_anatomy`, every model): every image also carries an "anatomy" label (for
MRI slices: "head", whatever the tumour label), scored by one extra output channel, and the loss becomes
the multi-label soft margin over [one-hot(label), 1]. Two forms:

- ``True`` ("label"): the anatomy channel is one more GAP-pooled map. It is always positive, so it can
  learn to fire anywhere; nothing in the loss makes it take positions away from the class maps, and the
  tumour map may keep the skull.
- ``"compete"``: the head outputs one more map, background, and each position's softmax over
  [classes, anatomy, background] splits it among the channels (`erase.competitive_pool`: normalised
  global weighted pooling with a size term). A position explained by anatomy (present in every slice)
  is no longer tumour evidence, so the class map keeps what differs between classes. Its localisation
  map is the class channel's softmax share, not the raw map.

"logits" stay N×C over the real classes (accuracy and prediction code are unchanged); "branch_logits"
carry the anatomy score last (N×(C+1)); "maps" carry the anatomy map (and, with ``"compete"``, then the
background map) after the class maps.

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
from .erase import (
    FUSIONS,
    check_delta,
    check_fusion,
    check_shared_anatomy,
    competition_masks,
    competitive_pool,
    erase_features,
    fuse_maps,
    normalize_maps,
    select_class_maps,
)
from .registry import register_model

__all__ = [
    "AcolModel",
    "CamModel",
    "ClassMapHead",
    "FusionChoice",
    "WsolModel",
    "acol",
    "cam",
    "gap",
    "head_size",
    "multi_hot_targets",
    "row_weights",
    "weighted_mean",
]


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

    def trunk(self, features: Tensor) -> Tensor:
        """The conv layers before the classifier (identity when depth is 0)."""
        return self.layers[:-1](features)

    @property
    def classifier(self) -> nn.Conv2d:
        """The final 1×1 conv: one map per class (co-attention heads reuse it on attended features)."""
        return self.layers[-1]


def multi_hot_targets(labels: Tensor, num_classes: int, anatomy: bool = False) -> Tensor:
    """Class indices (N,) -> N×K float multi-hot targets, K = C, or C + 1 with the anatomy column of ones.

    Examples:
        >>> multi_hot_targets(torch.tensor([1, 0]), 2, anatomy=True)
        tensor([[0., 1., 1.],
                [1., 0., 1.]])
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}"
        )
    targets = F.one_hot(labels.long(), num_classes).float()
    if anatomy:
        targets = torch.cat([targets, targets.new_ones(len(labels), 1)], dim=1)
    return targets


def row_weights(labels: Tensor, class_weights: Tensor | None) -> Tensor | None:
    """Each row's loss weight, its class's entry of `class_weights` (None: unweighted).

    Examples:
        >>> row_weights(torch.tensor([1, 0, 1]), torch.tensor([0.5, 2.0]))
        tensor([2.0000, 0.5000, 2.0000])
    """
    if class_weights is None:
        return None
    return class_weights.to(labels.device, torch.float32)[labels.long()]


def weighted_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """Σ w·loss / Σ w over the batch (`cross_entropy(weight=...)`'s reduction); the plain mean without weights."""
    per_row = per_row.float()
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


class WsolModel(nn.Module):
    """Base class of every registered model: `backbone` + heads.

    Contract:
        forward(x, labels=None) -> dict with
            "logits": N×C prediction logits (the real classes only);
            "branch_logits": list of N×K logits, each of which receives a loss (K = `num_outputs`:
                C, or C + 1 with the anatomy channel last);
            "maps": dict branch name -> N×M×h×w raw class maps before pooling (M = `num_maps`: K, or
                K + 1 with the background map last when `shared_anatomy="compete"`);
            "cam": N×h×w fused map in [0, 1] (min-max per image, no gradient) for the target class:
                `labels` when given, else the argmax of "logits".
            Subclasses may add keys and keyword inputs (e.g. an image pairing) but keep these.
        compute_loss(outputs, labels, class_weights=None) -> dict with "loss" (the total, a scalar) plus
            the parts named in `loss_names`; `class_weights` (C,) weigh every term's rows by their class
            (`row_weights`, `weighted_mean`).
        param_groups(lr, head_lr_mult) -> optimiser groups: backbone at `lr`, everything else at
            `head_lr_mult` × `lr` (ACoL fine-tunes with 10; `TrainConfig` uses 1 from scratch).

    Attributes:
        branch_names: names of the branches, in the order of "branch_logits".
        shared_anatomy: False, True (the extra always-on "anatomy" channel) or "compete" (anatomy and
            background channels competing with the classes for positions).
        config: set by `create_model`; `create_model(**model.config)` rebuilds the architecture.
    """

    branch_names: tuple[str, ...] = ()

    def __init__(self, backbone: Backbone, num_classes: int, shared_anatomy: bool | str = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.shared_anatomy = check_shared_anatomy(shared_anatomy)
        self.config: dict[str, Any] = {}

    @property
    def competing(self) -> bool:
        """Whether the channels compete for positions (``shared_anatomy="compete"``)."""
        return self.shared_anatomy == "compete"

    @property
    def num_outputs(self) -> int:
        """Scored channels: the classes, plus one for the shared anatomy label."""
        return self.num_classes + int(bool(self.shared_anatomy))

    @property
    def num_maps(self) -> int:
        """Map channels: the scored ones, plus background when they compete."""
        return self.num_outputs + int(self.competing)

    def pool(self, maps: Tensor) -> Tensor:
        """N×M×h×w raw maps -> N×K image scores: GAP, or `competitive_pool` when competing."""
        return competitive_pool(maps) if self.competing else gap(maps)

    def evidence(self, maps: Tensor) -> Tensor:
        """The maps localisation reads: the raw maps, or each channel's share of the positions."""
        return competition_masks(maps) if self.competing else maps

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Keys of the loss parts: `ce_<branch>`, or `sm_<branch>` (soft margin) when the channels compete."""
        prefix = "sm" if self.competing else "ce"
        return tuple(f"{prefix}_{name}" for name in self.branch_names)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def targets(self, labels: Tensor) -> Tensor:
        """N×K multi-hot targets of `labels` (with the anatomy column when `shared_anatomy`)."""
        return multi_hot_targets(labels, self.num_classes, self.shared_anatomy is not False)

    def class_logits(self, logits: Tensor) -> Tensor:
        """The real classes' logits: drops the anatomy channel."""
        return logits[:, : self.num_classes]

    def compute_loss(
        self, outputs: dict[str, Any], labels: Tensor, class_weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """`image_loss` on every branch; with `class_weights`, each row weighs its class's weight.

        Returns {"loss": sum, <loss_names>: each}.
        """
        weights = row_weights(labels, class_weights)
        values = [self.image_loss(logits, labels, weights) for logits in outputs["branch_logits"]]
        parts = dict(zip(self.loss_names, values, strict=True))
        return {"loss": torch.stack(values).sum(), **parts}

    def image_loss(self, logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
        """One branch's image-level loss, each row weighed by `weights` (`row_weights`) when given:
        cross-entropy over the classes (they exclude each other), plus with `shared_anatomy=True` the
        binary cross-entropy of the anatomy channel against 1 (every slice shows anatomy); with
        "compete", the multi-label soft margin on [one-hot, 1] of the competing scores (Araslanov & Roth).

        Why not the soft margin for `True` too (as before): on the demo phantom (in-process, 4 seeds)
        CE + BCE localised 0.806 test PxAP (val 0.748), the soft margin 0.772 (val 0.703).
        """
        if self.competing:
            targets = self.targets(labels).to(logits.device)
            per_row = F.multilabel_soft_margin_loss(logits.float(), targets, reduction="none")
        else:
            per_row = F.cross_entropy(logits[:, : self.num_classes].float(), labels, reduction="none")
            if self.shared_anatomy:
                anatomy = logits[:, self.num_classes].float()
                per_row = per_row + F.binary_cross_entropy_with_logits(
                    anatomy, torch.ones_like(anatomy), reduction="none"
                )
        return weighted_mean(per_row, weights)

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


def gap(maps: Tensor) -> Tensor:
    """Global average pooling: N×K×h×w -> N×K."""
    return maps.mean(dim=(-2, -1))


class CamModel(WsolModel):
    """CAM: one class-map head on the backbone features, trained with cross-entropy on its GAP."""

    branch_names = ("main",)

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        head_width: int,
        head_depth: int,
        shared_anatomy: bool | str = False,
    ) -> None:
        super().__init__(backbone, num_classes, shared_anatomy)
        self.head = ClassMapHead(backbone.out_channels, self.num_maps, head_width, head_depth)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        maps = self.head(self.backbone(x))
        full = self.pool(maps)
        logits = self.class_logits(full)
        with torch.no_grad():
            cam = normalize_maps(select_class_maps(self.evidence(maps), self.target_classes(logits, labels)))
        return {"logits": logits, "branch_logits": [full], "maps": {"main": maps}, "cam": cam}


class FusionChoice(nn.Module):
    """How a two-branch model fuses its maps: a fixed `fusion` (`erase.FUSIONS`), or ``"auto"``.

    With ``"auto"`` the model offers every candidate fusion in eval mode (output "cams": name -> map)
    and `train.fit` picks the one with the best val PxAP on val rows each epoch (`choose_fusion`); the
    choice is a buffer, so checkpoints, exports and `acol localize` keep it. Until chosen: ``max``.
    """

    fusion: str
    fusion_candidates: tuple[str, ...]

    def init_fusion(self, fusion: str, candidates: tuple[str, ...] = FUSIONS) -> None:
        self.fusion = check_fusion(fusion)
        self.fusion_candidates = candidates if self.fusion == "auto" else (self.fusion,)
        if self.fusion == "auto":
            self.register_buffer("fusion_index", torch.zeros((), dtype=torch.long))

    @property
    def active_fusion(self) -> str:
        """The fusion the "cam" output uses now."""
        if self.fusion != "auto":
            return self.fusion
        return self.fusion_candidates[int(self.fusion_index)]

    def choose_fusion(self, name: str) -> None:
        """Use fusion `name` (one of `fusion_candidates`) from now on; only with ``fusion="auto"``."""
        if self.fusion != "auto" or name not in self.fusion_candidates:
            raise ValueError(f"cannot choose fusion {name!r}: fusion={self.fusion!r}")
        self.fusion_index.fill_(self.fusion_candidates.index(name))

    def fused_maps(self, raw_a: Tensor, raw_b: Tensor, norm_a: Tensor) -> dict[str, Any]:
        """{"cam": the active fusion's map} plus, for ``"auto"`` in eval mode, "cams" of every candidate."""
        out: dict[str, Any] = {"cam": fuse_maps(raw_a, raw_b, self.active_fusion, norm_a)}
        if self.fusion == "auto" and not self.training:
            out["cams"] = {name: fuse_maps(raw_a, raw_b, name, norm_a) for name in self.fusion_candidates}
        return out


class AcolModel(WsolModel, FusionChoice):
    """ACoL: branch A finds the most discriminative region; branch B sees the features with it erased.

    A's map for the target class (label in training, predicted class otherwise) is min-max normalised
    and positions >= `delta` are zeroed in B's input; the localisation map fuses A's and B's maps by
    `fusion` (`erase.fuse_maps`; ``max``, ACoL's max(norm M_A, norm M_B), by default).
    "logits" are A's, since A's prediction picks the erased region when no label is given.
    """

    branch_names = ("a", "b")

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        delta: float,
        head_width: int,
        head_depth: int,
        shared_anatomy: bool | str = False,
        fusion: str = "max",
    ) -> None:
        super().__init__(backbone, num_classes, shared_anatomy)
        self.delta = check_delta(delta)
        self.init_fusion(fusion)
        self.head_a = ClassMapHead(backbone.out_channels, self.num_maps, head_width, head_depth)
        self.head_b = ClassMapHead(backbone.out_channels, self.num_maps, head_width, head_depth)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        features = self.backbone(x)
        maps_a = self.head_a(features)
        logits_a = self.pool(maps_a)
        target = self.target_classes(self.class_logits(logits_a), labels)
        with torch.no_grad():
            raw_a = select_class_maps(self.evidence(maps_a), target)
            norm_a = normalize_maps(raw_a)
        maps_b = self.head_b(erase_features(features, norm_a, self.delta))
        logits_b = self.pool(maps_b)
        with torch.no_grad():
            fused = self.fused_maps(raw_a, select_class_maps(self.evidence(maps_b), target), norm_a)
        return {
            "logits": self.class_logits(logits_a),
            "branch_logits": [logits_a, logits_b],
            "maps": {"a": maps_a, "b": maps_b},
            **fused,
        }


def head_size(backbone: Backbone, width: int | None, depth: int | None) -> tuple[int, int]:
    """`(width, depth)` of a head: the given values, else the backbone's defaults."""
    return (
        backbone.default_head_width if width is None else int(width),
        backbone.default_head_depth if depth is None else int(depth),
    )


@register_model("cam")
def cam(
    backbone: Backbone,
    num_classes: int,
    *,
    head_width: int | None = None,
    head_depth: int | None = None,
    shared_anatomy: bool | str = False,
) -> CamModel:
    """CAM head; `head_width`/`head_depth` default to the backbone's (1024/2 for vgg16 and resnet50).

    `shared_anatomy`: False, True (always-on anatomy label) or "compete" (see the module docstring).
    """
    return CamModel(backbone, num_classes, *head_size(backbone, head_width, head_depth), shared_anatomy)


@register_model("acol")
def acol(
    backbone: Backbone,
    num_classes: int,
    *,
    delta: float = 0.6,
    head_width: int | None = None,
    head_depth: int | None = None,
    shared_anatomy: bool | str = False,
    fusion: str = "max",
) -> AcolModel:
    """ACoL with erase threshold `delta` in (0, 1) and map `fusion` (max, mean, joint, a, or auto: chosen
    on val); head as `cam`'s."""
    return AcolModel(
        backbone, num_classes, delta, *head_size(backbone, head_width, head_depth), shared_anatomy, fusion
    )
