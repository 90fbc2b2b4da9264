"""Pure tensor functions behind the heads: map normalisation, ACoL's erase, class-map selection, fusion,
and the competition of class, anatomy and background channels for positions (`shared_anatomy="compete"`).

Modules in `heads.py` are thin wrappers around these (wsolevaluation's `_erase_attention` style), so the
arithmetic is tested on hand-built tensors.

Examples:
    >>> m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    >>> normalize_maps(m)
    tensor([[[0.0000, 0.2500],
             [0.5000, 1.0000]]])
    >>> erase_mask(normalize_maps(m), 0.5)
    tensor([[[1., 1.],
             [0., 0.]]])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ANATOMY_MODES",
    "check_delta",
    "check_shared_anatomy",
    "competition_masks",
    "competitive_pool",
    "erase_features",
    "erase_mask",
    "FUSIONS",
    "FUSION_OPTIONS",
    "check_fusion",
    "fuse_maps",
    "fuse_max",
    "normalize_maps",
    "select_class_maps",
]


# `shared_anatomy` values: off, the always-on sigmoid label, or the label competing for positions.
ANATOMY_MODES: tuple[bool | str, ...] = (False, True, "compete")

# How a two-branch model (ACoL, ACoL on co-attention) turns its branches' maps into one localisation map.
FUSIONS = ("max", "mean", "joint", "a")
# `fusion` option values: one of FUSIONS, or "auto": the fusion with the best val PxAP, chosen by the
# train loop on val rows (`FusionChoice`), never on test.
FUSION_OPTIONS = (*FUSIONS, "auto")


def check_delta(delta: float) -> float:
    """Return `delta` as a float if 0 < delta < 1, else raise ValueError."""
    value = float(delta)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta!r}")
    return value


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise every map over its last two dims (h, w) to [0, 1].

    Works for any leading shape (N×h×w, N×C×h×w). A map that is constant, or holds any NaN/inf, becomes
    all zeros (wsolevaluation's rule), so the result is always finite. Differentiable where defined.
    """
    if maps.dim() < 2:
        raise ValueError(f"maps need at least 2 dims (h, w), got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.float()
    if maps.shape[-1] * maps.shape[-2] == 0:
        return maps.new_zeros(maps.shape)
    flat = maps.flatten(-2)
    finite = torch.isfinite(flat).all(dim=-1, keepdim=True)
    # Zero out bad maps before min/max so no NaN reaches the arithmetic (or its backward).
    safe = torch.where(finite, flat, torch.zeros_like(flat))
    low = safe.amin(dim=-1, keepdim=True)
    span = safe.amax(dim=-1, keepdim=True) - low
    valid = finite & (span > 0)
    scaled = (safe - low) / torch.where(valid, span, torch.ones_like(span))
    out = torch.where(valid, scaled, torch.zeros_like(scaled)).clamp(0.0, 1.0)
    return out.reshape(maps.shape)


def erase_mask(norm_map: Tensor, delta: float) -> Tensor:
    """1 where `norm_map < delta` (keep), 0 where `norm_map >= delta` (erase); carries no gradient.

    The mask is a hard threshold: ACoL does not back-propagate through the choice of erased positions.
    """
    delta = check_delta(delta)
    dtype = norm_map.dtype if norm_map.is_floating_point() else torch.float32
    with torch.no_grad():
        return (norm_map.detach() < delta).to(dtype)


def erase_features(features: Tensor, norm_map: Tensor, delta: float) -> Tensor:
    """Zero the positions of `features` (N×K×h×w) where `norm_map` (N×h×w) is >= delta.

    Gradients reach `features` through the kept positions only, and never reach `norm_map`.
    """
    if features.dim() != 4 or norm_map.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(
            f"features N×K×h×w and norm_map N×h×w must agree, got {tuple(features.shape)} "
            f"and {tuple(norm_map.shape)}"
        )
    return features * erase_mask(norm_map, delta).to(features.dtype).unsqueeze(1)


def select_class_maps(maps: Tensor, classes: Tensor) -> Tensor:
    """Pick, for each sample n, the map of class `classes[n]`: N×C×h×w, (N,) -> N×h×w."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be N×C×h×w, got shape {tuple(maps.shape)}")
    if classes.shape != (maps.shape[0],) or classes.is_floating_point():
        raise ValueError(
            f"classes must be an integer tensor of shape ({maps.shape[0]},), got "
            f"{classes.dtype} {tuple(classes.shape)}"
        )
    classes = classes.to(device=maps.device, dtype=torch.long)
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= maps.shape[1]):
        raise ValueError(f"classes must lie in [0, {maps.shape[1]}), got {classes.tolist()}")
    return maps[torch.arange(maps.shape[0], device=maps.device), classes]


def fuse_max(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise maximum of two maps of the same shape (ACoL's fused localisation map)."""
    if a.shape != b.shape:
        raise ValueError(f"maps to fuse must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.maximum(a, b)


def check_fusion(fusion: str) -> str:
    """Return `fusion` if it is one of `FUSION_OPTIONS`, else raise ValueError naming them."""
    if fusion not in FUSION_OPTIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSION_OPTIONS)}, got {fusion!r}")
    return fusion


def fuse_maps(map_a: Tensor, map_b: Tensor, fusion: str, norm_a: Tensor | None = None) -> Tensor:
    """One localisation map in [0, 1] from the raw target-class maps of branches A and B (N×h×w).

    - ``max``: ACoL's rule, max(norm A, norm B), each branch min-max normalised on its own.
    - ``mean``: (norm A + norm B) / 2.
    - ``joint``: norm(max(A, B)): the raw maps on one scale. A branch with no evidence (flat, small
      values) stays small instead of being stretched to [0, 1] by its own normalisation.
    - ``a``: norm A only (B then only shapes the shared features during training).

    `norm_a` replaces norm(A) in ``max``/``mean``/``a`` (a partner-averaged map, say); ``joint`` uses
    the raw maps.

    Examples:
        >>> a = torch.tensor([[[4.0, 0.0, 0.0]]]); b = torch.tensor([[[0.0, 1.0, 0.0]]])  # B: weak evidence
        >>> fuse_maps(a, b, "max"), fuse_maps(a, b, "joint")
        (tensor([[[1., 1., 0.]]]), tensor([[[1.0000, 0.2500, 0.0000]]]))
    """
    check_fusion(fusion)
    if fusion == "joint":
        if map_a.shape != map_b.shape:
            raise ValueError(
                f"maps to fuse must have the same shape, got {tuple(map_a.shape)} and {tuple(map_b.shape)}"
            )
        return normalize_maps(torch.maximum(map_a.float(), map_b.float()))
    first = normalize_maps(map_a) if norm_a is None else norm_a
    if fusion == "a":
        return first
    second = normalize_maps(map_b)
    if fusion == "mean":
        return (first + second) / 2
    return fuse_max(first, second)


def check_shared_anatomy(value: bool | str) -> bool | str:
    """Return `value` if it is one of `ANATOMY_MODES` (false, true, "compete"), else raise ValueError."""
    if isinstance(value, bool) or value == "compete":
        return value
    raise ValueError(f"shared_anatomy must be false, true or 'compete', got {value!r}")


def competition_masks(maps: Tensor) -> Tensor:
    """Per-position softmax over the channels of N×K×h×w raw maps: each position's share per channel."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be N×K×h×w, got shape {tuple(maps.shape)}")
    return maps.float().softmax(dim=1)


def competitive_pool(maps: Tensor, eps: float = 1.0, power: float = 3.0, floor: float = 0.01) -> Tensor:
    """Image scores of channels that compete for positions: N×K×h×w raw maps -> N×(K−1) scores.

    The last channel is background and gets no score. Each position's softmax over the K channels
    (`competition_masks`) splits it among them; a channel's score is its raw map averaged under its own
    mask (normalised global weighted pooling, Araslanov & Roth, CVPR 2020) plus a focal size term
    ``(1 − m̄)^power · log(floor + m̄)`` on its mean mask m̄, which is very negative for a channel that
    holds no position and ~0 for one that holds many. A position can then pay off for one channel only:
    what an always-present channel explains is taken from the class channels. `eps` keeps an empty
    channel's weighted mean finite.

    Examples:
        >>> maps = torch.zeros(1, 3, 2, 2); maps[0, 0, 0, 0] = 9.0  # class 0 owns one position
        >>> competitive_pool(maps).argmax(dim=1).item()
        0
    """
    masks = competition_masks(maps)[:, :-1]
    scored = maps[:, :-1].float()
    mass = masks.sum(dim=(-2, -1))
    weighted = (masks * scored).sum(dim=(-2, -1)) / (eps + mass)
    share = masks.mean(dim=(-2, -1))
    return weighted + (1.0 - share).pow(power) * torch.log(floor + share)
