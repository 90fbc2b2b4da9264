"""CAM overlays and plots (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "cam_overlay",
    "figure_png",
    "mask_outline",
    "overlay_strip_figure",
    "save_overlay_grid",
    "sweep_delta_figure",
    "sweep_history_figure",
    "threshold_curves_figure",
]


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


def cam_overlay(
    image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
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


# --------------------------------------------------------------------------- report figures (no pyplot)


def figure_png(figure: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes (written with the object API: no pyplot state, any thread)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def threshold_curves_figure(
    box_curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    pr_curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    iou: float = 0.5,
) -> Any:
    """Two panels: BoxAcc against the CAM threshold τ (``label -> (τ, accuracy)``) and the pixel
    precision-recall curves (``label -> (recall, precision)``), one line per model; legends carry the labels.

    Examples:
        >>> t = np.linspace(0, 0.99, 100)
        >>> figure = threshold_curves_figure({"cam": (t, 1 - t)}, {"cam": (1 - t, t)})
        >>> figure_png(figure)[:4]
        b'\\x89PNG'
    """
    figure = _new_figure(10, 4)
    box_axes, pr_axes = figure.subplots(1, 2)
    for label, (thresholds, accuracy) in box_curves.items():
        box_axes.plot(thresholds, accuracy, label=label)
    for label, (recall, precision) in pr_curves.items():
        pr_axes.plot(recall, precision, label=label)
    box_axes.set(
        xlabel="CAM threshold τ",
        ylabel=f"BoxAcc (IoU ≥ {iou:g})",
        title="BoxAcc vs τ",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    pr_axes.set(
        xlabel="pixel recall",
        ylabel="pixel precision",
        title="Pixel PR curve (PxAP)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    for axes in (box_axes, pr_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    return figure


def overlay_strip_figure(
    images: Sequence[np.ndarray],
    cams: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str],
) -> Any:
    """One row of ``cam_overlay`` panels (image in grey, CAM in jet, GT outline in green), titled."""
    figure = _new_figure(3.0 * max(len(images), 1), 3.2)
    axes = np.atleast_1d(figure.subplots(1, max(len(images), 1)))
    for ax, image, cam, mask, title in zip(axes, images, cams, masks, titles, strict=False):
        ax.imshow(cam_overlay(image, cam, mask))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    return figure


def sweep_delta_figure(
    rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "max", default_model: str = "acol"
) -> Any:
    """A sweep's best objective per trial (``best_<metric>`` of its table rows) against δ, one series per
    model; models without δ as horizontal lines at their best. ``default_model``: rows without a model."""
    key = f"best_{metric}"
    figure = _new_figure(6, 4)
    axes = figure.subplots()
    models = sorted({str(r.get("model") or default_model) for r in rows})
    for model in models:
        mine = [r for r in rows if str(r.get("model") or default_model) == model]
        points = [(r["delta"], r[key]) for r in mine if r.get("delta") is not None and r.get(key) is not None]
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            axes.plot(xs, ys, "o-", label=model)
        else:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                axes.axhline(max(values) if mode == "max" else min(values), ls="--", label=f"{model} (no δ)")
    axes.set_xlabel("δ (ACoL erase threshold)")
    axes.set_ylabel(f"{metric} (fullsup val, best epoch)")
    axes.set_xlim(0.25, 1.0)
    axes.set_title("Objective vs δ per model")
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    return figure


def sweep_history_figure(rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "max") -> Any:
    """Each trial's objective (best epoch) in the order the trials started, with the best so far;
    errored trials (``status == "error"``) as red crosses."""
    key = f"best_{metric}"
    figure = _new_figure(6, 4)
    axes = figure.subplots()
    values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
    index = np.arange(len(values))
    axes.plot(index, values, "o", label="trial")
    if np.isfinite(values).any():
        fill = -np.inf if mode == "max" else np.inf
        running = (np.fmax if mode == "max" else np.fmin).accumulate(
            np.where(np.isfinite(values), values, fill)
        )
        axes.step(index, np.where(np.isfinite(running), running, np.nan), where="post", label="best so far")
    errors = [i for i, r in enumerate(rows) if r["status"] == "error"]
    if errors:
        axes.plot(errors, [0.0] * len(errors), "x", color="red", label="error")
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title("Optimisation history")
    axes.legend()
    return figure
