"""Brain-mask gating of CAMs: the reference remedy a user with brain masks tries first.

Where a dataset carries an ``anatomy_mask`` (skull and scalp = 1, from the phantom or from a brain
mask: anatomy = head − brain), ``gate_cam`` zeroes the (normalised) map on those pixels and keeps the
rest as it is, so a CAM that fires on the skull cannot place its mass there. What is left is not
stretched back to [0, 1]: a map whose peak was on the skull keeps its weak brain evidence weak, instead
of turning it into confident false positives at a fixed threshold; pooled over images as PxAP pools
them, zeroing alone can only remove false positives. It changes nothing about what the model learnt:
it only hides the shortcut at localisation time, and only where a mask exists.
A row without a mask (``None``) keeps its map; ``gate_maps`` counts such rows so the caller can say so.

Examples:
    >>> import numpy as np
    >>> cam = np.array([[1.0, 0.5], [0.25, 0.0]]); skull = np.array([[1, 0], [0, 0]], np.uint8)
    >>> gate_cam(cam, skull).tolist()
    [[0.0, 0.5], [0.25, 0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from acol_core.errors import UserError
from acol_core.localize import normalize_cam

__all__ = ["GATES", "GateError", "GatedMaps", "check_gate", "gate_cam", "gate_maps"]

# Localisation-time gates: ``none`` (the map as the model made it) or ``anatomy`` (skull/scalp zeroed).
GATES = ("none", "anatomy")


class GateError(UserError, ValueError):
    """An unknown gate, or a mask that does not fit its map."""


def check_gate(gate: str | None) -> str:
    """``gate`` (None means ``none``) if it is one of ``GATES``, else raise GateError."""
    value = "none" if gate is None else gate
    if value not in GATES:
        raise GateError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    return value


def gate_cam(cam: np.ndarray, anatomy_mask: np.ndarray | None) -> np.ndarray:
    """``cam`` (H×W) min-max normalised to [0, 1], then anatomy pixels (``mask == 1``) set to 0.

    Pixels marked 255 (unknown) or 0 (brain, background) keep their value. ``anatomy_mask`` None: the
    map is only normalised. A map whose mass was all on the anatomy becomes all zeros.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if anatomy_mask is None:
        return normalize_cam(cam)
    mask = np.asarray(anatomy_mask)
    if mask.shape != cam.shape:
        raise GateError(f"anatomy mask {mask.shape} and map {cam.shape} must have the same shape")
    return np.where(mask == 1, 0.0, normalize_cam(cam))


@dataclass
class GatedMaps:
    """Gated maps, and how many rows had no anatomy mask (their maps are only normalised)."""

    maps: list[np.ndarray]
    ungated: int


def gate_maps(cams: Sequence[np.ndarray], anatomy_masks: Sequence[np.ndarray | None], gate: str) -> GatedMaps:
    """``gate_cam`` over rows when ``gate`` is ``anatomy``; the maps unchanged when it is ``none``."""
    gate = check_gate(gate)
    if len(cams) != len(anatomy_masks):
        raise GateError(f"{len(cams)} maps but {len(anatomy_masks)} anatomy masks")
    if gate == "none":
        return GatedMaps([np.asarray(c) for c in cams], 0)
    maps = [gate_cam(c, m) for c, m in zip(cams, anatomy_masks, strict=True)]
    return GatedMaps(maps, sum(m is None for m in anatomy_masks))
