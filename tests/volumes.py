"""Small generated NIfTI heads for tests: an ellipsoid head with a bright brain, a dark skull shell,
scalp and a tumour, saved on a non-RAS grid (so readers must reorient), optionally with a brain mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["AFFINE", "SHAPE", "head_model", "save_volume", "subject", "t1_volume"]

SHAPE = (32, 32, 8)
# Not RAS: x and z flipped, so the test also checks that the masks follow the image's reorientation.
AFFINE = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, -3.0, 15], [0, 0, 0, 1]])


def head_model() -> dict[str, np.ndarray]:
    """An ellipsoid head: bright brain, a dark skull shell (below Otsu's cut), scalp, a tumour in the brain."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    r = np.sqrt(((x - 15.5) / 13) ** 2 + ((y - 15.5) / 13) ** 2 + ((z - 3.5) / 5.5) ** 2)
    head, brain = r <= 1.0, r <= 0.65
    tumour = (x - 17) ** 2 + (y - 14) ** 2 + (2 * (z - 3.5)) ** 2 <= 12
    return {"head": head, "brain": brain, "skull": head & ~brain & (r <= 0.8), "tumour": tumour & brain}


def t1_volume(model: dict[str, np.ndarray], seed: int) -> np.ndarray:
    vol = np.abs(np.random.default_rng(seed).normal(0, 3, SHAPE)).astype(np.float32)  # background noise
    vol[model["head"]] = 60
    vol[model["skull"]] = 12
    vol[model["brain"]] = 120
    vol[model["tumour"]] = 200
    return vol


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def subject(
    root: Path,
    name: str,
    brain: np.ndarray | None = None,
    brain_affine=AFFINE,
    seed: int = 0,
    flair: bool = False,
) -> None:
    """One subject folder: t1c (and, with ``flair``, a second modality), seg, optional brain mask."""
    model = head_model()
    save_volume(root / name / f"{name}_t1c.nii.gz", t1_volume(model, seed))
    if flair:
        save_volume(root / name / f"{name}_flair.nii.gz", t1_volume(model, seed + 1000))
    save_volume(root / name / f"{name}_seg.nii.gz", model["tumour"].astype(np.uint8))
    if brain is not None:
        save_volume(root / name / f"{name}_brainmask.nii.gz", brain.astype(np.uint8), brain_affine)
