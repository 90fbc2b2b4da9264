"""`acol report --run URI`: one self-contained HTML page (and its PNGs) for a pipeline run.

Reads the run record (``acol_core.runs``): each model's evaluation JSON and predictions, the dataset's
test split, and the sweep's outputs when the run has a sweep. Writes ``<run>/report/index.html`` with:

- the metrics table (one row per model, plus the centre-Gaussian baseline map on the same rows);
- per model, CAM overlays of the best, median and worst test object rows, ranked by per-image Dice at
  the model's Dice threshold (chosen on fullsup val rows by ``acol evaluate``);
- threshold curves: BoxAcc against the CAM threshold τ (IoU 0.5) and the pixel precision-recall curve
  behind PxAP, every model on one plot each;
- the sweep's plots and its best rows, when a sweep ran; the stage timings.

PNGs sit beside ``index.html`` and are linked by relative names; the page loads nothing else.

Examples:
    >>> write_report("runs/demo")  # doctest: +SKIP
    'runs/demo/report/index.html'
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from acol_core.data.codec import decode_png
from acol_core.metrics import (
    center_gaussian_baseline,
    max_box_acc,
    max_box_acc_v2,
    off_target_share,
    pixel_pr_curve,
    pxap,
)
from acol_core.runs import ModelEntry, read_run, report_uri
from acol_core.storage import exists, join, read_bytes, write_bytes

__all__ = ["per_image_dice", "pick_cases", "read_summary", "write_report"]

# Metrics table: (column title, path into the evaluation JSON).
_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("accuracy", ("classification", "accuracy")),
    ("PxAP", ("localization", "overall", "pxap")),
    ("MaxBoxAccV2", ("localization", "overall", "max_box_acc_v2")),
    ("MaxBoxAcc", ("localization", "overall", "max_box_acc")),
    ("GT-known loc", ("localization", "overall", "gt_known_loc")),
    ("Dice (best τ)", ("localization", "overall", "best_dice", "dice")),
    ("Dice (val τ)", ("localization", "overall", "dice_iou", "dice")),
    ("IoU (val τ)", ("localization", "overall", "dice_iou", "iou")),
    ("off-target", ("localization", "overall", "off_target_share")),
)
_CASES = ("best", "median", "worst")


@dataclass
class _ModelRows:
    label: str
    entry: ModelEntry
    evaluation: dict[str, Any]
    rows: Any  # acol_core.evaluate._Rows of the test object rows


def per_image_dice(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Dice of ``cam >= threshold`` against ``mask == 1`` for each image (255 = ignore).

    Examples:
        >>> cam = np.array([[0.9, 0.1], [0.8, 0.2]]); mask = np.array([[1, 0], [0, 0]])
        >>> per_image_dice([cam], [mask], 0.5).round(3).tolist()
        [0.667]
    """
    out = np.zeros(len(cams))
    for i, (cam, mask) in enumerate(zip(cams, masks, strict=True)):
        keep = mask != 255
        pred, gt = (cam >= threshold) & keep, (mask == 1) & keep
        total = pred.sum() + gt.sum()
        out[i] = 2.0 * (pred & gt).sum() / total if total else 0.0
    return out


def pick_cases(scores: np.ndarray) -> dict[str, int]:
    """Indices of the best, median and worst score (ties: the first in order).

    Examples:
        >>> pick_cases(np.array([0.2, 0.9, 0.5]))
        {'best': 1, 'median': 2, 'worst': 0}
    """
    if len(scores) == 0:
        return {}
    order = np.argsort(-scores, kind="stable")
    return {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _load_models(record: Any, dataset: Any) -> list[_ModelRows]:
    from acol_core.evaluate import _join

    loaded = []
    for label, entry in record.models.items():
        if not (entry.evaluation_uri and entry.predictions_uri and exists(entry.evaluation_uri)):
            continue
        evaluation = json.loads(read_bytes(entry.evaluation_uri))
        rows = _join(entry.predictions_uri, dataset, "test", required=True)
        loaded.append(_ModelRows(label, entry, evaluation, rows.take(rows.pixel_rows()) if rows else None))
    return loaded


def _baseline(rows: Any) -> dict[str, float]:
    """The centre-Gaussian map's scores on the same object rows (each map at its image's size)."""
    if rows is None or not rows.image_ids:
        return {}
    cams = [center_gaussian_baseline(1, *m.shape)[0] for m in rows.masks]
    out = {"PxAP": pxap(cams, rows.masks)}
    if any(rows.boxes):
        out["MaxBoxAccV2"] = max_box_acc_v2(cams, rows.boxes)["mean"]
    anatomy = [(a == 1).astype(np.uint8) for a in rows.anatomy if a is not None]
    if len(anatomy) == len(cams):
        out["off-target"] = off_target_share(cams, anatomy)
    return out


def _curves(models: list[_ModelRows]) -> bytes:
    figure = _figure(10, 4)
    box_axes, pr_axes = figure.subplots(1, 2)
    for item in models:
        rows = item.rows
        if rows is None or not rows.image_ids:
            continue
        maps = list(rows.maps)
        if any(rows.boxes):
            acc = max_box_acc(maps, rows.boxes, (0.5,))
            box_axes.plot(acc["thresholds"], acc["curve"][0.5], label=item.label)
        curve = pixel_pr_curve(maps, rows.masks)
        pr_axes.plot(
            curve["recall"], curve["precision"], label=f"{item.label} (PxAP {pxap(maps, rows.masks):.3f})"
        )
    box_axes.set(xlabel="CAM threshold τ", ylabel="BoxAcc (IoU ≥ 0.5)", title="BoxAcc vs τ", ylim=(0, 1))
    pr_axes.set(
        xlabel="pixel recall", ylabel="pixel precision", title="PR curve (PxAP)", xlim=(0, 1), ylim=(0, 1)
    )
    for axes in (box_axes, pr_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    return _png(figure)


def _cases(
    item: _ModelRows, images: dict[str, np.ndarray]
) -> tuple[bytes, list[tuple[str, str, float]]] | None:
    """Overlay strip of the best/median/worst rows; returns the PNG and (case, image id, Dice) rows."""
    from acol_core.viz import cam_overlay

    rows = item.rows
    if rows is None or not rows.image_ids:
        return None
    threshold = float(_get(item.evaluation, ("thresholds", "dice")) or 0.5)
    scores = per_image_dice(list(rows.maps), rows.masks, threshold)
    picks = pick_cases(scores)
    figure = _figure(3.0 * len(picks), 3.2)
    axes = np.atleast_1d(figure.subplots(1, len(picks)))
    table = []
    for ax, (case, index) in zip(axes, picks.items(), strict=True):
        image_id = rows.image_ids[index]
        ax.imshow(cam_overlay(images[image_id], rows.maps[index], rows.masks[index]))
        ax.set_title(f"{case}: Dice {scores[index]:.2f}", fontsize=9)
        ax.set_axis_off()
        table.append((case, image_id, float(scores[index])))
    return _png(figure), table


def _test_images(dataset: Any, ids: set[str]) -> dict[str, np.ndarray]:
    """Decode only the test images the overlays show (first channel, float)."""
    table = dataset.read_table(split="test", columns=["image_id", "image"]).to_pylist()
    out = {}
    for row in table:
        if row["image_id"] in ids:
            image = decode_png(bytes(row["image"])).astype(np.float32)
            out[row["image_id"]] = image[..., 0] if image.ndim == 3 else image
    return out


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _metrics_table(models: list[_ModelRows], baseline: dict[str, float]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in _COLUMNS)
    lines = [f"<table><tr><th>model</th><th>options</th><th>rows</th>{head}</tr>"]
    for item in models:
        options = ", ".join(f"{k}={v}" for k, v in item.entry.options.items()) or "–"
        rows = _get(item.evaluation, ("localization", "overall", "pixel_rows"))
        cells = "".join(f"<td>{_fmt(_get(item.evaluation, path))}</td>" for _, path in _COLUMNS)
        lines.append(
            f"<tr><td>{html.escape(item.label)}</td><td>{html.escape(item.entry.model)}: {html.escape(options)}"
            f"</td><td>{_fmt(rows) if rows is None else rows}</td>{cells}</tr>"
        )
    if baseline:
        cells = "".join(f"<td>{_fmt(baseline.get(title))}</td>" for title, _ in _COLUMNS)
        lines.append(
            f"<tr class='baseline'><td>centre-gaussian</td><td>baseline map</td><td></td>{cells}</tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _sweep_section(sweep_uri: str, out: str, written: dict[str, bytes]) -> str:
    results = join(sweep_uri, "results")
    parts = ["<h2>δ sweep</h2>", f"<p>Sweep outputs: <code>{html.escape(results)}</code></p>"]
    summary_uri = join(results, "summary.json")
    if exists(summary_uri):
        summary = json.loads(read_bytes(summary_uri))
        best = summary.get("best") or {}
        if best:
            params = ", ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
            parts.append(
                f"<p>Best trial <code>{html.escape(str(best.get('trial_id')))}</code>: "
                f"{html.escape(str(best.get('metric')))} = {_fmt(best.get('value'))} ({html.escape(params)})"
                f"; test: {html.escape(json.dumps(summary.get('test_metrics') or {}))}</p>"
            )
    for name in ("metric_vs_delta.png", "history.png"):
        uri = join(results, name)
        if exists(uri):
            written[f"sweep_{name}"] = read_bytes(uri)
            parts.append(f"<img src='sweep_{name}' alt='sweep {html.escape(name)}'>")
    csv_uri = join(results, "sweep.csv")
    if exists(csv_uri):
        parts.append(_csv_table(read_bytes(csv_uri).decode(), limit=10))
    return "\n".join(parts)


def _csv_table(text: str, limit: int) -> str:
    import csv

    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return ""
    keep = [i for i, name in enumerate(rows[0]) if not name.endswith("_uri") and name not in ("error",)][:12]
    head = "".join(f"<th>{html.escape(rows[0][i])}</th>" for i in keep)
    body = [
        "<tr>" + "".join(f"<td>{html.escape(row[i][:24])}</td>" for i in keep) + "</tr>"
        for row in rows[1 : 1 + limit]
    ]
    return f"<table class='small'><tr>{head}</tr>{''.join(body)}</table>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.baseline { color: #666; font-style: italic; }
table.small { font-size: 80%; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def read_summary(run_uri: str) -> dict[str, dict[str, float | None]]:
    """The metrics table of the run's report (``report/summary.json``): model label -> column -> value."""
    return json.loads(read_bytes(join(report_uri(run_uri), "summary.json")))


def write_report(run_uri: str) -> str:
    """Write ``<run>/report/index.html`` and its PNGs; returns the page's URI."""
    from acol_core.data.shards import open_dataset

    record = read_run(run_uri)
    dataset = open_dataset(record.data_uri, verify=False)
    models = _load_models(record, dataset)
    if not models:
        raise FileNotFoundError(f"{run_uri}: no model of the run has an evaluation yet (run.json lists none)")
    out = report_uri(run_uri)
    written: dict[str, bytes] = {}
    reference = next((m.rows for m in models if m.rows is not None), None)
    sections = [
        f"<h1>acol-flow run {html.escape(record.name)}</h1>",
        f"<p>Dataset <code>{html.escape(record.data_uri)}</code>, test split. Localisation is scored on the test "
        "slices that contain an object, with the ground-truth class's map (GT-known); accuracy on all test rows. "
        "Thresholds of the thresholded metrics were chosen on fullsup val rows.</p>",
        "<h2>Metrics</h2>",
        _metrics_table(models, _baseline(reference)),
        "<h2>Threshold curves</h2>",
    ]
    written["curves.png"] = _curves(models)
    sections.append("<img src='curves.png' alt='BoxAcc vs threshold and pixel PR curves'>")
    picked = {}
    for item in models:
        if item.rows is not None and item.rows.image_ids:
            threshold = float(_get(item.evaluation, ("thresholds", "dice")) or 0.5)
            picks = pick_cases(per_image_dice(list(item.rows.maps), item.rows.masks, threshold))
            picked.update({item.rows.image_ids[i]: None for i in picks.values()})
    images = _test_images(dataset, set(picked))
    sections.append(
        "<h2>CAM overlays</h2><p>Best, median and worst test object rows of each model, ranked by per-image "
        "Dice at the model's val-chosen threshold; green: ground-truth outline.</p>"
    )
    for index, item in enumerate(models):
        cases = _cases(item, images)
        if cases is None:
            continue
        name = f"cases_{index}.png"
        written[name] = cases[0]
        ids = ", ".join(f"{case} {html.escape(image_id)} ({dice:.2f})" for case, image_id, dice in cases[1])
        sections.append(
            f"<h3>{html.escape(item.label)}</h3><p>{ids}</p><img src='{name}' alt='{html.escape(item.label)} overlays'>"
        )
    if record.sweep_uri:
        sections.append(_sweep_section(record.sweep_uri, out, written))
    if record.stages:
        cells = "".join(
            f"<tr><td>{html.escape(stage)}</td><td>{seconds:.0f} s</td></tr>"
            for stage, seconds in record.stages.items()
        )
        sections.append(
            f"<h2>Stage timings</h2><table><tr><th>stage</th><th>wall time</th></tr>{cells}</table>"
        )
    summary = {
        item.label: {title: _get(item.evaluation, path) for title, path in _COLUMNS} for item in models
    }
    summary["centre-gaussian"] = _baseline(reference)
    written["summary.json"] = (json.dumps(summary, indent=2) + "\n").encode()
    for name, data in written.items():
        write_bytes(join(out, name), data)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>acol-flow report: {html.escape(record.name)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    index_uri = join(out, "index.html")
    write_bytes(index_uri, page.encode())
    return index_uri
