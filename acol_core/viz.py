"""CAM overlays and plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["cam_overlay", "mask_outline", "save_overlay_grid"]


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean H×W: the object pixels that touch background (4-neighbourhood)."""
    m = mask == 1
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    img = image if image.ndim == 2 else image.mean(axis=0)
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(img[..., None], 3, axis=-1)


def cam_overlay(image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """RGB float H×W×3: the image in grey, the CAM in the jet colour map on top, the GT outline in green."""
    plt = _matplotlib()
    rgb = (1 - alpha) * _gray_rgb(image) + alpha * plt.get_cmap("jet")(np.clip(cam, 0, 1))[..., :3]
    if mask is not None:
        rgb[mask_outline(mask)] = (0.0, 1.0, 0.0)
    return rgb


def save_overlay_grid(
    path: str | Path,
    images: np.ndarray,
    masks: np.ndarray,
    cams: dict[str, np.ndarray],
    titles: Sequence[str] | None = None,
) -> Path:
    """One row per image: the image with its GT outline, then each model's CAM overlay."""
    plt = _matplotlib()
    n, cols = len(images), 1 + len(cams)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        base = _gray_rgb(images[i])
        base[mask_outline(masks[i])] = (0.0, 1.0, 0.0)
        axes[i, 0].imshow(base)
        axes[i, 0].set_title(titles[i] if titles else "image + GT", fontsize=7)
        for j, (name, maps) in enumerate(cams.items(), start=1):
            axes[i, j].imshow(cam_overlay(images[i], maps[i], masks[i]))
            axes[i, j].set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
