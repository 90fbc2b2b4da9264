"""Co-attention models: `coatt` (Sun et al., ECCV 2020) and `acol_coatt` (ACoL's erase on top of it).

Co-attention (Sun, Wang, Dai, Van Gool, "Mining Cross-Image Semantics for Weakly Supervised Semantic
Segmentation", ECCV 2020; reference code GuoleiSun/MCIS_wsss, `Classifier/models/vgg.py`). For an image
pair (m, n) with head features F_m (D×A, A = h_m·w_m positions) and F_n (D×B):

- affinity P = F_mᵀ W_P F_n (A×B; W_P a learnable D×D matrix, no bias, no 1/√D scale);
- co-attended features of m from n: F_{m∩n} = F_n · softmax_rows(P)ᵀ (each position of m gathers the
  partner's features it matches), and of n from m: F_{n∩m} = F_m · softmax_cols(P);
- contrastive features: F_{m\\n} = F_m ⊙ (1 − σ(conv1×1(F_{m∩n}))), i.e. m's own features with the part
  the partner explains gated away;
- the single-image features are scored against m's labels by every model's image-level loss
  (`WsolModel.image_loss`: cross-entropy, plus the anatomy term with shared anatomy) and give the map;
- a second classifier (1×1 conv to C + GAP; the reference code has one) scores F_{m∩n} against the
  labels common to m and n; the image's own classifier scores F_{m\\n} against m's labels absent from n
  (what is specific to m is still m's evidence); both by the multi-label soft margin on multi-hot targets
  (a pair may share no class: an all-zero target). The pair terms weigh `w_common` = `w_contrast` = 0.25
  by default.

Here pairs are formed inside the batch by the model's forward (`pair_partners`): each sample i gets one
partner p(i) != i by `pair_policy` ("same" class, "different" class, or "mixed" uniform), so the train
loop and Ray Data streaming stay unchanged; pairs are drawn within a worker's shard/batch. Sample i
attends to p(i) (the row-softmax direction); the other direction, p(i) attending to i, is p(i)'s own
pair's job, so every image gets exactly one co-attended and one contrastive view, as in the paper. A
sample with no partner (batch of 1) is paired with itself and its pair losses are skipped.

Differences to the reference code, on purpose: it trains both directions of each pair plus pairs of an
image with augmented copies of itself, and adds the contrastive loss from epoch 2 on. Why this split and
the smaller pair weights (the paper's text shares one classifier, weight 1): on the demo phantom
(`studies/demo.yaml`'s data, in-process) one shared classifier with weight-1 terms localised 0.06 PxAP
below CAM (4 seeds), either pair term alone 0.05-0.07; the contrast term on a second classifier too
gave a contrastive map (`infer_map: contrast`) of 0.02 PxAP: its gate closed everywhere.

Memory: the A×B affinity is never built whole on the hot path unless it is small. `attend` runs each
direction through `scaled_dot_product_attention` (query = W_P-projected positions of the attending
image, key = value = the partner's positions, `scale=1.0`), whose fused kernels (flash on CPU and CUDA,
memory-efficient on CUDA) work in tiles and recompute in the backward pass; while the batch's affinity
fits `AFFINITY_BUDGET_BYTES` (1 MiB: 64 pairs of 8×8 maps) it builds it instead, which is faster at
that size (`attention_path`). `coattention_naive` is the reference that builds P;
`benchmarks/coattention_memory.py` compares naive, SDPA and the automatic choice.

`acol_coatt` (no published code has it): branch A is the co-attention head above (single-image,
co-attended and contrastive terms). A's single-image map for the target class (label in
training, predicted class otherwise) is min-max normalised and positions >= `delta` are zeroed in the
backbone features fed to branch B, a separate class-map head as in ACoL. Loss = the co-attention losses
+ `w_erased` × B's image-level loss; localisation map = the fusion of M̄_A, M̄_B (`fusion`).

Inference map (`infer_partners`): 0 gives the image's own single-image map (A's, for `acol_coatt`). K > 0
averages the raw co-attended maps of the target class over up to K partners drawn from the same batch
among images predicted as that class, then min-max normalises (the reference's test-time aggregation);
an image with no such partner keeps its own map. In eval mode partners come from a fixed-seed generator,
so a batch's maps are repeatable; in training from torch's global RNG (seeded by the train loop).

`infer_map`: "single" (default, the paper's: the single-image map above) or "contrast": the map of the
contrastive features F_{m\\n} for the target class, with a partner n of another (predicted) class drawn
from the batch; what the pair shares (for a tumour slice and a healthy one: the head, skull and scalp)
is gated away, so the map keeps what is specific to the image. An image with no partner of another
class in its batch keeps its own map. Excludes `infer_partners` > 0 (they are two different maps).

Examples:
    >>> import torch
    >>> from acol_core.models import create_model
    >>> model = create_model("coatt", num_classes=2, in_channels=1, backbone="tiny", pair_policy="mixed")
    >>> out = model(torch.randn(4, 1, 32, 32), labels=torch.tensor([0, 1, 1, 0]))
    >>> sorted(model.compute_loss(out, torch.tensor([0, 1, 1, 0])))
    ['ce_single', 'loss', 'sm_common', 'sm_contrast']
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .erase import FUSIONS, check_delta, erase_features, normalize_maps, select_class_maps
from .heads import ClassMapHead, FusionChoice, WsolModel, head_size, row_weights
from .registry import register_model

__all__ = [
    "AFFINITY_BUDGET_BYTES",
    "ATTENTION_PATHS",
    "INFER_MAPS",
    "PAIR_POLICIES",
    "AcolCoattModel",
    "CoAttention",
    "CoattModel",
    "acol_coatt",
    "attend",
    "attention_path",
    "coatt",
    "coattention_efficient",
    "coattention_naive",
    "contrastive_features",
    "masked_soft_margin",
    "pair_partners",
    "pair_targets",
    "sample_partners",
]

PAIR_POLICIES = ("same", "different", "mixed")
INFER_MAPS = ("single", "contrast")
EVAL_PAIR_SEED = 0
ATTENTION_PATHS = ("auto", "materialised", "sdpa")
# Largest affinity (bytes, whole batch) that `attend` builds whole; see `attention_path`.
AFFINITY_BUDGET_BYTES = 2**20


# ---------------------------------------------------------------- pairing (pure)


def sample_partners(valid: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw, per row i of the N×N boolean `valid`, up to `k` distinct columns j with valid[i, j], uniformly.

    Returns (idx, ok), both N×min(k, N): the drawn columns and whether each draw is a valid one (rows
    with fewer than k valid columns are padded with invalid draws, marked False).
    """
    if valid.dim() != 2 or valid.shape[0] != valid.shape[1] or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a square boolean matrix, got {valid.dtype} {tuple(valid.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    device = generator.device if generator is not None else valid.device
    n = valid.shape[0]
    scores = torch.rand(n, n, generator=generator, device=device).to(valid.device)
    # Invalid columns score below every valid one, so top-k takes valid columns first, at random.
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    idx = scores.topk(min(k, n), dim=1).indices
    return idx, valid.gather(1, idx)


def pair_partners(labels: Tensor, policy: str = "mixed", generator: torch.Generator | None = None) -> Tensor:
    """A partner index for every sample of the batch, drawn uniformly among those `policy` allows.

    Args:
        labels: (N,) integer classes (ground truth in training, predictions at inference).
        policy: "same" (a different sample of the same class), "different" (a sample of another class)
            or "mixed" (any other sample). A sample with no allowed partner takes any other sample; a
            batch of one pairs the sample with itself.
        generator: random source (torch's global RNG when None).

    Examples:
        >>> pair_partners(torch.tensor([0, 1, 1]), "same", torch.Generator().manual_seed(0))[1:]
        tensor([2, 1])
    """
    if policy not in PAIR_POLICIES:
        raise ValueError(f"pair_policy must be one of {', '.join(PAIR_POLICIES)}, got {policy!r}")
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape (N,), got {labels.dtype} {tuple(labels.shape)}"
        )
    n = labels.shape[0]
    if n < 2:
        return torch.arange(n, device=labels.device)
    other = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    same = labels[:, None] == labels[None, :]
    allowed = {"same": same & other, "different": ~same, "mixed": other}[policy]
    allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, other)
    return sample_partners(allowed, 1, generator)[0][:, 0]


def pair_targets(targets: Tensor, partners: Tensor) -> tuple[Tensor, Tensor]:
    """Multi-hot targets of the pair terms: (common = t_i ∧ t_p(i), contrast = t_i ∧ ¬t_p(i)).

    Examples:
        >>> t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # classes 0 and 1, anatomy column last
        >>> pair_targets(t, torch.tensor([1, 0]))
        (tensor([[0., 0., 1.],
                [0., 0., 1.]]), tensor([[1., 0., 0.],
                [0., 1., 0.]]))
    """
    if partners.shape != (targets.shape[0],):
        raise ValueError(f"partners must have shape ({targets.shape[0]},), got {tuple(partners.shape)}")
    other = targets[partners]
    return targets * other, targets * (1.0 - other)


def masked_soft_margin(
    logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Multi-label soft margin averaged over the samples where `mask` (weighted by `weights` when given);
    0 (still on the graph) if none."""
    per_sample = F.multilabel_soft_margin_loss(logits.float(), targets.float(), reduction="none")
    weights = mask.to(per_sample.dtype) * (1.0 if weights is None else weights.to(per_sample.dtype))
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


# ---------------------------------------------------------------- co-attention (pure)


def _check_pair(f_m: Tensor, f_n: Tensor, weight: Tensor) -> None:
    if f_m.dim() != 4 or f_n.dim() != 4 or f_m.shape[:2] != f_n.shape[:2]:
        raise ValueError(
            f"features must be N×D×h×w with the same N and D, got {tuple(f_m.shape)} and {tuple(f_n.shape)}"
        )
    d = f_m.shape[1]
    if weight.shape != (d, d):
        raise ValueError(f"weight must be {d}×{d}, got {tuple(weight.shape)}")


def coattention_naive(f_m: Tensor, f_n: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Reference co-attention that builds the affinity P (N×A×B) whole: use for tests and benchmarks.

    Args:
        f_m: N×D×h_m×w_m features of the first images; f_n: N×D×h_n×w_n of their partners.
        weight: W_P, D×D.

    Returns:
        (att_m, att_n): att_m = F_n softmax_rows(P)ᵀ shaped like f_m; att_n = F_m softmax_cols(P) like f_n.
    """
    _check_pair(f_m, f_n, weight)
    fm, fn = f_m.flatten(2), f_n.flatten(2)  # N×D×A, N×D×B
    affinity = torch.matmul(weight, fm).transpose(1, 2) @ fn  # P[i, j] = (W f_m,i) · f_n,j
    att_m = fn @ affinity.softmax(dim=2).transpose(1, 2)
    att_n = fm @ affinity.softmax(dim=1)
    return att_m.reshape(f_m.shape), att_n.reshape(f_n.shape)


def attention_path(batch: int, positions_q: int, positions_kv: int, element_size: int = 4) -> str:
    """`attend`'s path: "materialised" if the batch's affinity fits `AFFINITY_BUDGET_BYTES`, else "sdpa".

    A small affinity is cheaper to build whole than to tile: on CPU (1 thread, D=128, one direction,
    forward + backward) SDPA's fused kernel took 5-25 % longer than two matmuls and a softmax on 8×8 and
    12×12 maps (batches of 8-64, affinity <= 1 MiB), and as long or less from ~1.2 MiB on (0.85-0.95×
    on one pair of 28×28 maps, 0.4× on 56×56). The budget also caps what the materialised path can cost
    in memory, whatever the map size: a few times the budget.

    Examples:
        >>> attention_path(32, 8 * 8, 8 * 8)  # the tiny backbone at 64² input: 0.5 MiB
        'materialised'
        >>> attention_path(1, 28 * 28, 28 * 28)  # vgg16 at 224² input, one pair: 2.3 MiB
        'sdpa'
    """
    if min(batch, positions_q, positions_kv, element_size) < 0:
        raise ValueError("sizes must be >= 0")
    affinity_bytes = batch * positions_q * positions_kv * element_size
    return "materialised" if affinity_bytes <= AFFINITY_BUDGET_BYTES else "sdpa"


def _attend_materialised(query: Tensor, key: Tensor) -> Tensor:
    """N×A×D queries, N×B×D keys (= values) -> N×D×A, through the whole N×A×B affinity."""
    affinity = query @ key.transpose(1, 2)
    return key.transpose(1, 2) @ affinity.softmax(dim=2).transpose(1, 2)


def _attend_sdpa(query: Tensor, key: Tensor) -> Tensor:
    """The same through `scaled_dot_product_attention`, which never builds the affinity."""
    out = F.scaled_dot_product_attention(query.unsqueeze(1), key.unsqueeze(1), key.unsqueeze(1), scale=1.0)
    return out.squeeze(1).transpose(1, 2)


def attend(f_q: Tensor, f_kv: Tensor, weight: Tensor, path: str = "auto") -> Tensor:
    """Features of `f_q`'s images gathered from their partners `f_kv`: F_kv softmax_rows(F_qᵀ W F_kv)ᵀ.

    Same result as `coattention_naive(f_q, f_kv, weight)[0]`. `path`: "sdpa" (through
    `scaled_dot_product_attention`, so that the affinity matrix is never materialised), "materialised"
    (the affinity built whole), or "auto" (`attention_path`'s choice: whole only while it is small).
    """
    _check_pair(f_q, f_kv, weight)
    if path not in ATTENTION_PATHS:
        raise ValueError(f"path must be one of {', '.join(ATTENTION_PATHS)}, got {path!r}")
    n, d, h, w = f_q.shape
    query = F.linear(f_q.flatten(2).transpose(1, 2), weight)  # row i = (W f_q,i)ᵀ
    # Fused kernels need a unit-stride last dim (else SDPA silently falls back to the HW×HW math path),
    # and one dtype (under autocast the projection comes out in low precision).
    key = f_kv.flatten(2).transpose(1, 2).to(query.dtype).contiguous()
    if path == "auto":
        path = attention_path(n, h * w, key.shape[1], query.element_size())
    out = _attend_materialised(query, key) if path == "materialised" else _attend_sdpa(query, key)
    return out.reshape(n, d, h, w)


def coattention_efficient(f_m: Tensor, f_n: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """`coattention_naive` without the affinity matrix: both directions through `attend`'s SDPA path.

    The column direction is the row direction with roles swapped and W_P transposed:
    P[i, j] = (W f_m,i) · f_n,j = (Wᵀ f_n,j) · f_m,i.
    """
    _check_pair(f_m, f_n, weight)
    return attend(f_m, f_n, weight, path="sdpa"), attend(f_n, f_m, weight.t(), path="sdpa")


def contrastive_features(features: Tensor, gate_logits: Tensor) -> Tensor:
    """The image's own features with the co-attended part gated away: F ⊙ (1 − σ(gate)), gate N×1×h×w."""
    return features * (1.0 - torch.sigmoid(gate_logits))


# ---------------------------------------------------------------- modules


class CoAttention(nn.Module):
    """W_P (`affinity`, D×D) and the gate (`gate`, 1×1 conv D -> 1), both without bias as in the paper's code.

    forward(features, partner_features) -> (co-attended features, contrastive features), both N×D×h×w.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.affinity = nn.Linear(channels, channels, bias=False)
        self.gate = nn.Conv2d(channels, 1, 1, bias=False)

    def forward(self, features: Tensor, partner_features: Tensor) -> tuple[Tensor, Tensor]:
        attended = attend(features, partner_features, self.affinity.weight)
        return attended, contrastive_features(features, self.gate(attended))


def _check_weights(**weights: float) -> dict[str, float]:
    out = {name: float(value) for name, value in weights.items()}
    bad = {name: value for name, value in out.items() if not (math.isfinite(value) and value >= 0)}
    if bad:
        raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
    return out


class CoattModel(WsolModel):
    """Co-attention model: a class-map head whose features are also paired within the batch.

    Branches: "single" (the image alone), "common" (co-attended with its partner), "contrast" (its own
    features less what the partner explains). Outputs add "partners" (N,) to the WsolModel contract.
    Losses: the single-image term as `WsolModel.image_loss` (`ce_single`), the pair terms `sm_common`,
    `sm_contrast` (multi-label soft margin; common scored by `common_classifier`, contrast by the head's
    classifier); the total weighs them by `w_single`, `w_common`, `w_contrast`.
    """

    branch_names: tuple[str, ...] = ("single", "common", "contrast")

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        pair_policy: str = "mixed",
        head_width: int,
        head_depth: int,
        w_single: float = 1.0,
        w_common: float = 0.25,
        w_contrast: float = 0.25,
        infer_partners: int = 0,
        infer_map: str = "single",
        shared_anatomy: bool | str = False,
    ) -> None:
        super().__init__(backbone, num_classes, shared_anatomy)
        if pair_policy not in PAIR_POLICIES:
            raise ValueError(f"pair_policy must be one of {', '.join(PAIR_POLICIES)}, got {pair_policy!r}")
        if int(infer_partners) < 0:
            raise ValueError(f"infer_partners must be >= 0, got {infer_partners!r}")
        if infer_map not in INFER_MAPS:
            raise ValueError(f"infer_map must be one of {', '.join(INFER_MAPS)}, got {infer_map!r}")
        if infer_map == "contrast" and int(infer_partners):
            raise ValueError(
                "infer_map='contrast' uses one partner of another class: it needs infer_partners=0"
            )
        self.pair_policy = pair_policy
        self.infer_partners = int(infer_partners)
        self.infer_map = infer_map
        self.head = ClassMapHead(backbone.out_channels, self.num_maps, head_width, head_depth)
        channels = head_width if head_depth > 0 else backbone.out_channels
        self.coattention = CoAttention(channels)
        # The common term's own classifier (the reference code has a second one): its targets (what the
        # pair shares, often nothing) pulled the single-image map away from the image's own evidence.
        self.common_classifier = nn.Conv2d(channels, self.num_maps, 1)
        weights = _check_weights(w_single=w_single, w_common=w_common, w_contrast=w_contrast)
        self.loss_weights = {
            self.loss_names[0]: weights["w_single"],
            "sm_common": weights["w_common"],
            "sm_contrast": weights["w_contrast"],
        }

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The image-level terms as `WsolModel`'s (`ce_<branch>`, or `sm_` when competing); the pair
        terms `sm_common`, `sm_contrast` (multi-label soft margin: a pair may share no class)."""
        image = dict(zip(self.branch_names, super().loss_names, strict=True))
        return tuple(
            f"sm_{name}" if name in ("common", "contrast") else image[name] for name in self.branch_names
        )

    def _generator(self) -> torch.Generator | None:
        return None if self.training else torch.Generator().manual_seed(EVAL_PAIR_SEED)

    def _pair_branches(self, features: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Partners by `pair_policy`; the maps of the co-attended features (`common_classifier`) and of the
        contrastive ones (the head's classifier)."""
        partners = pair_partners(target, self.pair_policy, self._generator())
        attended, contrast = self.coattention(features, features[partners])
        return partners, self.common_classifier(attended), self.head.classifier(contrast)

    @torch.no_grad()
    def _anchor_map(self, features: Tensor, maps_single: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """Normalised map of the target class: own map, co-attended maps averaged over partners, or the
        contrastive map against a partner of another class (`infer_map`)."""
        own = select_class_maps(self.evidence(maps_single), target)
        n, k = features.shape[0], self.infer_partners
        if self.infer_map == "contrast" and n >= 2:
            return self._contrast_map(features, own, target)
        if k == 0 or n < 2:
            return normalize_maps(own)
        predicted = self.class_logits(logits).argmax(dim=1)
        valid = (predicted[None, :] == target[:, None]) & ~torch.eye(n, dtype=torch.bool, device=own.device)
        idx, ok = sample_partners(valid, k, self._generator())
        k = idx.shape[1]
        weight = self.coattention.affinity.weight
        attended = attend(features.repeat_interleave(k, dim=0), features[idx.flatten()], weight)
        maps = select_class_maps(self.evidence(self.common_classifier(attended)), target.repeat_interleave(k))
        maps = maps.view(n, k, *own.shape[1:])
        weights = ok.to(maps.dtype)[..., None, None]
        mean = (maps * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return normalize_maps(torch.where(ok.any(dim=1)[:, None, None], mean, own))

    def _contrast_map(self, features: Tensor, own: Tensor, target: Tensor) -> Tensor:
        """Normalised target-class map of the contrastive features against a partner of another class."""
        valid = target[None, :] != target[:, None]
        idx, ok = sample_partners(valid, 1, self._generator())
        _, contrast = self.coattention(features, features[idx[:, 0]])
        maps = select_class_maps(self.evidence(self.head.classifier(contrast)), target)
        return normalize_maps(torch.where(ok[:, 0, None, None], maps, own))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        features = self.head.trunk(self.backbone(x))
        maps_single = self.head.classifier(features)
        logits = self.pool(maps_single)
        target = self.target_classes(self.class_logits(logits), labels)
        partners, maps_common, maps_contrast = self._pair_branches(features, target)
        cam = self._anchor_map(features, maps_single, logits, target)
        maps = {"single": maps_single, "common": maps_common, "contrast": maps_contrast}
        return {
            "logits": self.class_logits(logits),
            "branch_logits": [self.pool(m) for m in maps.values()],
            "maps": maps,
            "cam": cam,
            "partners": partners,
        }

    def _loss_parts(
        self, outputs: dict[str, Any], labels: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        logits = dict(zip(self.branch_names, outputs["branch_logits"], strict=True))
        targets = self.targets(labels).to(logits["common"].device)
        partners = outputs["partners"].to(targets.device)
        common, contrast = pair_targets(targets, partners)
        # A self-paired sample (batch of one) has no pair to learn from.
        paired = partners != torch.arange(len(partners), device=partners.device)
        single = self.branch_names[0]
        return {
            self.loss_names[0]: self.image_loss(logits[single], labels, weights),
            "sm_common": masked_soft_margin(logits["common"], common, paired, weights),
            "sm_contrast": masked_soft_margin(logits["contrast"], contrast, paired, weights),
        }

    def compute_loss(
        self, outputs: dict[str, Any], labels: Tensor, class_weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """{"loss": Σ weight × part, <loss_names>: each part}; `class_weights` (C,) weigh each row of
        every part by its class (a pair term by its anchor row's class)."""
        parts = self._loss_parts(outputs, labels, row_weights(labels, class_weights))
        total = torch.stack([self.loss_weights[name] * value for name, value in parts.items()]).sum()
        return {"loss": total, **parts}


class AcolCoattModel(CoattModel, FusionChoice):
    """ACoL on co-attention: branch A is `CoattModel`'s head; A's map erases branch B's input features.

    Branches: "a" (single image), "common", "contrast" (A's pair terms), "b" (erased features).
    """

    branch_names = ("a", "common", "contrast", "b")

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        delta: float = 0.6,
        w_erased: float = 1.0,
        fusion: str = "max",
        head_width: int,
        head_depth: int,
        **options: Any,
    ) -> None:
        super().__init__(backbone, num_classes, head_width=head_width, head_depth=head_depth, **options)
        self.delta = check_delta(delta)
        own_only = not self.infer_partners and self.infer_map == "single"
        if fusion == "joint" and not own_only:
            raise ValueError(
                "fusion='joint' fuses the raw single-image maps: it needs infer_partners=0, infer_map='single'"
            )
        self.init_fusion(fusion, FUSIONS if own_only else tuple(f for f in FUSIONS if f != "joint"))
        self.head_b = ClassMapHead(backbone.out_channels, self.num_maps, head_width, head_depth)
        self.loss_weights[self.loss_names[-1]] = _check_weights(w_erased=w_erased)["w_erased"]

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Any]:
        backbone_features = self.backbone(x)
        features = self.head.trunk(backbone_features)
        maps_a = self.head.classifier(features)
        logits_a = self.pool(maps_a)
        target = self.target_classes(self.class_logits(logits_a), labels)
        partners, maps_common, maps_contrast = self._pair_branches(features, target)
        with torch.no_grad():
            raw_a = select_class_maps(self.evidence(maps_a), target)
            norm_a = normalize_maps(raw_a)
        maps_b = self.head_b(erase_features(backbone_features, norm_a, self.delta))
        with torch.no_grad():
            own_only = self.infer_partners == 0 and self.infer_map == "single"
            cam_a = norm_a if own_only else self._anchor_map(features, maps_a, logits_a, target)
            fused = self.fused_maps(raw_a, select_class_maps(self.evidence(maps_b), target), cam_a)
        maps = {"a": maps_a, "common": maps_common, "contrast": maps_contrast, "b": maps_b}
        return {
            "logits": self.class_logits(logits_a),
            "branch_logits": [self.pool(m) for m in maps.values()],
            "maps": maps,
            **fused,
            "partners": partners,
        }

    def _loss_parts(
        self, outputs: dict[str, Any], labels: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        parts = super()._loss_parts(outputs, labels, weights)
        logits_b = outputs["branch_logits"][self.branch_names.index("b")]
        parts[self.loss_names[-1]] = self.image_loss(logits_b, labels, weights)
        return parts


# ---------------------------------------------------------------- registry builders


@register_model("coatt")
def coatt(
    backbone: Backbone,
    num_classes: int,
    *,
    pair_policy: str = "mixed",
    head_width: int | None = None,
    head_depth: int | None = None,
    w_single: float = 1.0,
    w_common: float = 0.25,
    w_contrast: float = 0.25,
    infer_partners: int = 0,
    infer_map: str = "single",
    shared_anatomy: bool | str = False,
) -> CoattModel:
    """Co-attention (Sun et al. 2020) with in-batch pairs; head size defaults as for `cam`.

    `infer_map="contrast"` localises with the contrastive map against a partner of another class.
    """
    width, depth = head_size(backbone, head_width, head_depth)
    return CoattModel(
        backbone,
        num_classes,
        pair_policy=pair_policy,
        head_width=width,
        head_depth=depth,
        w_single=w_single,
        w_common=w_common,
        w_contrast=w_contrast,
        infer_partners=infer_partners,
        infer_map=infer_map,
        shared_anatomy=shared_anatomy,
    )


@register_model("acol_coatt")
def acol_coatt(
    backbone: Backbone,
    num_classes: int,
    *,
    delta: float = 0.6,
    pair_policy: str = "mixed",
    head_width: int | None = None,
    head_depth: int | None = None,
    w_single: float = 1.0,
    w_common: float = 0.25,
    w_contrast: float = 0.25,
    w_erased: float = 1.0,
    fusion: str = "max",
    infer_partners: int = 0,
    infer_map: str = "single",
    shared_anatomy: bool | str = False,
) -> AcolCoattModel:
    """ACoL's erased branch B on a co-attention branch A; `w_erased` weighs B's loss, `fusion` as ACoL's."""
    width, depth = head_size(backbone, head_width, head_depth)
    return AcolCoattModel(
        backbone,
        num_classes,
        delta=delta,
        w_erased=w_erased,
        fusion=fusion,
        pair_policy=pair_policy,
        head_width=width,
        head_depth=depth,
        w_single=w_single,
        w_common=w_common,
        w_contrast=w_contrast,
        infer_partners=infer_partners,
        infer_map=infer_map,
        shared_anatomy=shared_anatomy,
    )
