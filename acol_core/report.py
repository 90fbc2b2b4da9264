"""`acol report --run URI`: one self-contained HTML page (and its PNGs) for a pipeline run.

Reads the run record (``acol_core.runs``): each model's evaluation JSON and predictions, the dataset's
ground truth, and the sweep's outputs when the run has a sweep. Writes ``<run>/report/`` with:

- ``index.html``: the metrics table (one row per model, numbers as the evaluation JSON has them, plus the
  centre-Gaussian baseline map scored on the same rows), the thresholds each evaluation used, the
  threshold curves (BoxAcc against the CAM threshold τ and the pixel precision-recall curve behind PxAP,
  every model on one plot each), per model the CAM overlays of its best, median and worst object rows
  (ranked by per-image Dice at the model's Dice threshold), the sweep's plots and best trials when a
  sweep ran, and the stage timings;
- the PNGs it shows, linked by relative names (the page loads nothing else);
- ``summary.json`` (model label -> metrics-table column -> value) and ``curves.json`` (the curves' data).

Models are processed one at a time and only the overlays' images are decoded, so memory holds one
model's maps (uint8) at a time.

Examples:
    >>> write_report("runs/demo")  # doctest: +SKIP
    'runs/demo/report/index.html'
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acol_core.data.codec import decode_png
from acol_core.metrics import (
    center_gaussian_baseline,
    max_box_acc,
    pixel_pr_curve,
)
from acol_core.predictions import quantize_cam
from acol_core.runs import ModelEntry, RunRecord, read_run, report_uri
from acol_core.storage import exists, join, read_bytes, write_bytes

__all__ = ["BOX_IOU", "COLUMNS", "per_image_dice", "pick_cases", "read_summary", "top_trials", "write_report"]

# Metrics table: (column title, path into the evaluation JSON). The titles are summary.json's keys.
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("accuracy", ("classification", "accuracy")),
    ("PxAP", ("localization", "overall", "pxap")),
    ("MaxBoxAccV2", ("localization", "overall", "max_box_acc_v2")),
    ("MaxBoxAcc", ("localization", "overall", "max_box_acc")),
    ("GT-known loc", ("localization", "overall", "gt_known_loc")),
    ("top-1 loc", ("localization", "overall", "top1_loc")),
    ("Dice (best τ)", ("localization", "overall", "best_dice", "dice")),
    ("Dice (val τ)", ("localization", "overall", "dice_iou", "dice")),
    ("IoU (val τ)", ("localization", "overall", "dice_iou", "iou")),
    ("off-target", ("localization", "overall", "off_target_share")),
)
BOX_IOU = 0.5  # IoU of the BoxAcc curve: `acol evaluate`'s default (its JSON does not record it)
BASELINE = "centre-gaussian"
_SWEEP_TOP = 5
_SWEEP_HIDDEN = {"trial", "trial_name", "completions"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.png$")


@dataclass
class _Case:
    """One overlay: which case, the row, its score, and its map and mask (only these are kept)."""

    case: str
    image_id: str
    score: float
    cam: np.ndarray
    mask: np.ndarray


@dataclass
class _ModelView:
    """What the page shows of one model: its evaluation, its curves and its three overlay rows."""

    label: str
    entry: ModelEntry
    evaluation: dict[str, Any]
    box_curve: tuple[np.ndarray, np.ndarray] | None = None  # (τ, BoxAcc)
    pr_curve: tuple[np.ndarray, np.ndarray] | None = None  # (recall, precision)
    cases: list[_Case] = field(default_factory=list)


# --------------------------------------------------------------------------- pure helpers


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
        pred, gt = (np.nan_to_num(cam) >= threshold) & keep, (mask == 1) & keep
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
    order = np.argsort(-np.asarray(scores), kind="stable")
    return {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}


def top_trials(rows: Sequence[dict[str, Any]], key: str, best_value: float | None, limit: int) -> list[dict]:
    """The sweep's ``limit`` best trials by ``key``; the sort direction is the one that puts the sweep's
    chosen ``best_value`` first (``summary.json`` does not record the mode). Errored trials are left out.

    Examples:
        >>> rows = [{"trial_id": "a", "m": 0.2}, {"trial_id": "b", "m": 0.9}, {"trial_id": "c", "m": None}]
        >>> [r["trial_id"] for r in top_trials(rows, "m", 0.9, 5)], top_trials(rows, "m", 0.2, 1)[0]["trial_id"]
        (['b', 'a'], 'a')
    """
    scored = [
        (float(v), r) for r in rows if (v := _number(r.get(key))) is not None and r.get("status") != "error"
    ]
    values = [v for v, _ in scored]
    minimise = best_value is not None and bool(values) and best_value <= min(values) < max(values)
    scored.sort(key=lambda item: item[0] if minimise else -item[0])
    return [r for _, r in scored[:limit]]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _fmt(value: Any, spec: str = ".3f") -> str:
    number = None if isinstance(value, bool) else _number(value)
    return "–" if number is None else format(number, spec)


def _e(value: Any) -> str:
    return html.escape(str(value))


# --------------------------------------------------------------------------- reading the run


def _evaluation(uri: str) -> dict[str, Any]:
    try:
        data = json.loads(read_bytes(uri))
    except ValueError as exc:
        raise ValueError(f"{uri}: not an evaluation JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: not an evaluation JSON (expected an object)")
    return data


def _dice_threshold(evaluation: dict[str, Any]) -> float:
    value = _number(_get(evaluation, ("thresholds", "dice")))
    return 0.5 if value is None else value


def _model_view(label: str, entry: ModelEntry, evaluation: dict[str, Any], rows: Any) -> _ModelView:
    """Curves and overlay picks of one model from its joined rows (``acol_core.evaluate.JoinedRows``), on the
    rows the evaluation scores: object rows for the pixel curve and the overlays, box rows for BoxAcc."""
    view = _ModelView(label, entry, evaluation)
    if rows is None:
        return view
    box = rows.take(rows.box_rows())
    if box.image_ids:
        acc = max_box_acc(box.maps, box.boxes, (BOX_IOU,))
        view.box_curve = (acc["thresholds"], acc["curve"][BOX_IOU])
    pixel = rows.take(rows.pixel_rows())
    if pixel.image_ids:
        curve = pixel_pr_curve(pixel.maps, pixel.masks)
        view.pr_curve = (curve["recall"], curve["precision"])
        scores = per_image_dice(pixel.maps, pixel.masks, _dice_threshold(evaluation))
        view.cases = [
            _Case(case, pixel.image_ids[i], float(scores[i]), pixel.maps[i], pixel.masks[i])
            for case, i in pick_cases(scores).items()
        ]
    return view


def _baseline(rows: Any) -> dict[str, float]:
    """The centre-Gaussian map's scores on the rows each metric uses in ``acol evaluate``, through the
    same scoring path (``evaluate.localization_report``) on uint8 maps, as every stored CAM is."""
    from acol_core.evaluate import localization_report

    if rows is None or not rows.image_ids:
        return {}
    gaussians: dict[tuple[int, ...], np.ndarray] = {}
    maps = []
    for i in range(len(rows.image_ids)):
        shape = rows.maps[i].shape
        if shape not in gaussians:
            gaussians[shape] = quantize_cam(center_gaussian_baseline(1, *shape)[0])
        maps.append(gaussians[shape])
    # Thresholded metrics are not shown for the baseline: any threshold does.
    report = localization_report(rows.with_maps(maps), 0.5, 0.5, BOX_IOU)
    names = {
        "pxap": "PxAP",
        "max_box_acc": "MaxBoxAcc",
        "max_box_acc_v2": "MaxBoxAccV2",
        "off_target_share": "off-target",
    }
    out = {title: report[key] for key, title in names.items() if key in report}
    if "best_dice" in report:
        out["Dice (best τ)"] = report["best_dice"]["dice"]
    return out


def _load_views(record: RunRecord, dataset: Any) -> tuple[list[_ModelView], list[str], dict[str, float]]:
    """Every evaluated model's view (one model's rows in memory at a time), the labels left out (no
    evaluation yet), and the baseline on the first model's rows."""
    from acol_core.evaluate import join_predictions

    views, skipped, baseline = [], [], {}
    for label, entry in record.models.items():
        if not (entry.evaluation_uri and entry.predictions_uri and exists(entry.evaluation_uri)):
            skipped.append(label)
            continue
        evaluation = _one_run(_evaluation(entry.evaluation_uri), entry.predictions_uri)
        rows = join_predictions(
            entry.predictions_uri, dataset, str(evaluation.get("split") or "test"), required=True
        )
        if not views:
            baseline = _baseline(rows)
        views.append(_model_view(label, entry, evaluation, rows))
    return views, skipped, baseline


def _images(dataset: Any, ids: set[str]) -> dict[str, np.ndarray]:
    """Decode only the overlays' images (grey: channels averaged), read with a filter on ``image_id``."""
    import pyarrow.dataset as pads

    from acol_core.data.schema import SCHEMA

    if not ids:
        return {}
    source = pads.dataset(
        dataset.shard_paths(), schema=SCHEMA, format="parquet", filesystem=dataset.filesystem
    )
    table = source.to_table(columns=["image_id", "image"], filter=pads.field("image_id").isin(sorted(ids)))
    out = {}
    for image_id, data in zip(
        table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
    ):
        image = decode_png(bytes(data)).astype(np.float32)
        out[image_id] = image.mean(axis=-1) if image.ndim == 3 else image
    return out


# --------------------------------------------------------------------------- HTML sections


def _metrics_table(views: list[_ModelView], baseline: dict[str, float]) -> str:
    head = "".join(f"<th>{_e(title)}</th>" for title, _ in COLUMNS)
    lines = [
        f"<div class='wide'><table><tr><th>model</th><th>architecture</th><th>object rows</th>{head}</tr>"
    ]
    for view in views:
        entry = view.entry
        options = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.options.items()
        )
        arch = f"{entry.model} / {entry.backbone}" + (f" ({options})" if options else "")
        rows = _get(view.evaluation, ("localization", "overall", "pixel_rows"))
        cells = "".join(f"<td>{_metric_cell(view.evaluation, path)}</td>" for _, path in COLUMNS)
        lines.append(
            f"<tr><td>{_e(view.label)}</td><td class='arch'>{_e(arch)}</td><td>{_fmt(rows, 'g')}</td>{cells}</tr>"
        )
    if baseline:
        cells = "".join(f"<td>{_fmt(baseline.get(title))}</td>" for title, _ in COLUMNS)
        lines.append(f"<tr class='baseline'><td>{BASELINE}</td><td>baseline map</td><td></td>{cells}</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _mean_sd(stats: Any, spec: str = ".3f") -> str:
    """``mean ± sd`` of a ``acol_core.stats.mean_sd`` dict (just the mean when sd is undefined)."""
    mean, sd = _get(stats, ("mean",)), _get(stats, ("sd",))
    return _fmt(mean, spec) + (f" ± {_fmt(sd, spec)}" if _number(sd) is not None else "")


def _metric_cell(evaluation: dict[str, Any], path: tuple[str, ...]) -> str:
    """The metric, or its mean ± sd over seeds (n in the tooltip) when the evaluation has several runs."""
    stats = _get(evaluation, ("seeds",))
    if isinstance(stats, dict) and ".".join(path) in stats:
        entry = stats[".".join(path)]
        return f"<span title='mean ± sd over {_fmt(entry.get('n'), 'g')} seeds'>{_e(_mean_sd(entry))}</span>"
    return _fmt(_get(evaluation, path))


def _one_run(evaluation: dict[str, Any], predictions_uri: str) -> dict[str, Any]:
    """An evaluation of several seeds (``runs``) seen as the run of ``predictions_uri`` (else the first),
    with the seed statistics kept beside it."""
    runs = evaluation.get("runs")
    if not isinstance(runs, list) or not runs:
        return evaluation
    base = next((r for r in runs if r.get("predictions") == predictions_uri), runs[0])
    return {**base, "seeds": evaluation.get("seeds"), "seed_runs": len(runs)}


def _subjects_section(views: list[_ModelView]) -> str:
    """Per-subject (3-D) Dice/IoU and detection, for evaluations that have them."""
    rows = []
    for view in views:
        summary = _get(view.evaluation, ("subjects", "summary"))
        if not isinstance(summary, dict):
            continue
        d = summary.get("detection") or {}
        counts = "/".join(_fmt(d.get(k), "g") for k in ("tp", "fp", "fn", "tn"))
        rows.append(
            f"<tr><td>{_e(view.label)}</td><td>{_fmt(summary.get('subjects'), 'g')}</td>"
            f"<td>{_fmt(summary.get('subjects_with_tumour'), 'g')}</td>"
            f"<td>{_e(_mean_sd(summary.get('dice')))}</td><td>{_fmt(_get(summary, ('dice', 'median')))}</td>"
            f"<td>{_e(_mean_sd(summary.get('iou')))}</td><td>{_fmt(_get(summary, ('iou', 'median')))}</td>"
            f"<td>{counts}</td><td>{_fmt(d.get('sensitivity'))}</td><td>{_fmt(d.get('specificity'))}</td>"
            f"<td>{_fmt(_get(view.evaluation, ('subjects', 'threshold')), '.2f')}</td></tr>"
        )
    if not rows:
        return ""
    return "\n".join(
        [
            "<h2>Per subject (volumes)</h2>",
            "<p>Each subject's slices restacked in slice order; predicted tumour voxels are the pixels with "
            "map ≥ the Dice τ on slices the model classifies as tumour (slices classified healthy add none, so "
            "false positives on healthy slices count). Dice and IoU per subject, pixels pooled over its slices; "
            "mean ± sd (sample sd) and median over the subjects with ground-truth tumour (a subject without "
            "tumour has no Dice and counts in detection only). Detection: any predicted voxel against any "
            "ground-truth tumour voxel, over subjects.</p>",
            "<table class='small'><tr><th>model</th><th>subjects</th><th>with tumour</th><th>Dice mean ± sd</th>"
            "<th>Dice median</th><th>IoU mean ± sd</th><th>IoU median</th><th>TP/FP/FN/TN</th>"
            "<th>sensitivity</th><th>specificity</th><th>τ</th></tr>",
            *rows,
            "</table>",
        ]
    )


def _thresholds_table(views: list[_ModelView]) -> str:
    lines = [
        "<table class='small'><tr><th>model</th><th>split</th><th>box τ</th><th>Dice τ</th>"
        "<th>chosen on</th><th>fullsup val rows</th><th>object rows scored with the predicted class's map</th></tr>"
    ]
    for view in views:
        t, ev = view.evaluation.get("thresholds") or {}, view.evaluation
        predicted = _get(ev, ("maps", "object_rows_scored_with_predicted_class_map"))
        lines.append(
            f"<tr><td>{_e(view.label)}</td><td>{_e(ev.get('split', '–'))}</td><td>{_fmt(t.get('box'), '.2f')}</td>"
            f"<td>{_fmt(t.get('dice'), '.2f')}</td><td>{_e(t.get('source', '–'))}</td>"
            f"<td>{_fmt(t.get('fullsup_val_rows'), 'g')}</td><td>{_fmt(predicted, 'g')}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def _overlay_section(
    views: list[_ModelView], images: dict[str, np.ndarray], written: dict[str, bytes]
) -> str:
    from acol_core.viz import figure_png, overlay_strip_figure

    parts = [
        "<h2>CAM overlays</h2><p>Per model: its best, median and worst object rows, ranked by per-image Dice "
        "of <code>CAM ≥ τ</code> at the model's Dice threshold τ (the evaluation's, chosen on fullsup val "
        "rows). Grey: the image; colour: the CAM (jet); green: the ground-truth outline.</p>"
    ]
    for index, view in enumerate(views):
        if not view.cases:
            parts.append(f"<h3>{_e(view.label)}</h3><p>No object rows.</p>")
            continue
        name = f"cases_{index}.png"
        figure = overlay_strip_figure(
            [images[c.image_id] for c in view.cases],
            [c.cam for c in view.cases],
            [c.mask for c in view.cases],
            [f"{c.case}: Dice {c.score:.2f}" for c in view.cases],
        )
        written[name] = figure_png(figure)
        ids = "; ".join(f"{c.case}: <code>{_e(c.image_id)}</code> (Dice {c.score:.3f})" for c in view.cases)
        parts.append(
            f"<h3>{_e(view.label)}</h3><p>{ids} at τ = {_dice_threshold(view.evaluation):.2f}</p>"
            f"<img src='{name}' alt='{_e(view.label)}: best, median and worst overlays'>"
        )
    return "\n".join(parts)


def _read_sweep_rows(results: str) -> list[dict[str, Any]]:
    import csv

    import pyarrow.parquet as pq

    table_uri, csv_uri = join(results, "sweep.parquet"), join(results, "sweep.csv")
    if exists(table_uri):
        return pq.read_table(io.BytesIO(read_bytes(table_uri))).to_pylist()
    if exists(csv_uri):
        return list(csv.DictReader(io.StringIO(read_bytes(csv_uri).decode())))
    return []


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, ".4g")
    return "–" if value is None or value == "" else _e(str(value)[:60])


def _sweep_section(sweep_uri: str, written: dict[str, bytes]) -> str:
    results = join(sweep_uri, "results")
    summary_uri = join(results, "summary.json")
    summary = json.loads(read_bytes(summary_uri)) if exists(summary_uri) else {}
    best = summary.get("best") or {}
    metric = str(best.get("metric") or "val_pxap")
    parts = ["<h2>Sweep</h2>", f"<p>Outputs: <code>{_e(results)}</code>"]
    counts = summary.get("counts") or {}
    if counts:
        parts[-1] += " — trials: " + _e(", ".join(f"{v} {k}" for k, v in counts.items()))
    parts[-1] += "</p>"
    if best:
        params = ", ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
        parts.append(
            f"<p>Best trial <code>{_e(best.get('trial_id'))}</code>: {_e(metric)} = {_fmt(best.get('value'))} "
            f"(epoch {_e(best.get('epoch'))}; {_e(params or 'no searched parameters')}).</p>"
        )
    test = summary.get("test_metrics") or {}
    if test:
        cells = "".join(f"<tr><td>{_e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in test.items())
        parts.append(f"<p>Its test-split metrics:</p><table class='small'>{cells}</table>")
    names = [uri.rstrip("/").rsplit("/", 1)[-1] for uri in summary.get("plots") or []]
    for name in names or ["metric_vs_delta.png", "history.png"]:
        uri = join(results, name)
        if _SAFE_NAME.match(name) and exists(uri):
            written[f"sweep_{name}"] = read_bytes(uri)
            parts.append(f"<img src='sweep_{name}' alt='sweep: {_e(name)}'>")
    rows = _read_sweep_rows(results)
    top = top_trials(rows, f"best_{metric}", _number(best.get("value")), _SWEEP_TOP)
    if top:
        keys = [k for k in top[0] if k not in _SWEEP_HIDDEN and not k.endswith("_uri")]
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in top)
        parts.append(
            f"<p>The {len(top)} best of {len(rows)} trials by best_{_e(metric)} (errored trials left out):</p>"
            f"<table class='small'><tr>{head}</tr>{body}</table>"
        )
    return "\n".join(parts)


def _timings_section(record: RunRecord) -> str:
    rows = [(stage, seconds) for stage, seconds in record.stages.items()]
    rows += [(f"train {label}", e.seconds) for label, e in record.models.items() if e.seconds is not None]
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td>{_e(name)}</td><td>{_fmt(seconds, '.1f')} s</td></tr>" for name, seconds in rows
    )
    return f"<h2>Stage timings</h2><table><tr><th>stage</th><th>wall time</th></tr>{cells}</table>"


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; display: block; overflow-x: auto; max-width: 100%; }
code { overflow-wrap: anywhere; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.baseline { color: #666; font-style: italic; }
table.small { font-size: 80%; }
div.wide { overflow-x: auto; max-width: 100%; }
td.arch { max-width: 16em; font-size: 85%; }
th { vertical-align: bottom; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


# --------------------------------------------------------------------------- the report


def read_summary(run_uri: str) -> dict[str, dict[str, float | None]]:
    """The metrics table of the run's report (``report/summary.json``): model label -> column -> value."""
    return json.loads(read_bytes(join(report_uri(run_uri), "summary.json")))


def _curves_data(views: list[_ModelView]) -> dict[str, Any]:
    out: dict[str, Any] = {"box_iou": BOX_IOU, "models": {}}
    for view in views:
        entry: dict[str, Any] = {}
        if view.box_curve is not None:
            entry["box"] = {"thresholds": view.box_curve[0].tolist(), "accuracy": view.box_curve[1].tolist()}
        if view.pr_curve is not None:
            entry["pr"] = {"recall": view.pr_curve[0].tolist(), "precision": view.pr_curve[1].tolist()}
        out["models"][view.label] = entry
    return out


def write_report(run_uri: str) -> str:
    """Write ``<run>/report/index.html``, its PNGs, ``summary.json`` and ``curves.json``; returns the page's URI.

    Raises FileNotFoundError when the folder has no ``run.json`` or no model of the run has an evaluation.
    """
    from acol_core.data.shards import open_dataset
    from acol_core.viz import figure_png, threshold_curves_figure

    record = read_run(run_uri)
    dataset = open_dataset(record.data_uri, verify=False)
    views, skipped, baseline = _load_views(record, dataset)
    if not views:
        raise FileNotFoundError(f"{run_uri}: no model of the run has an evaluation yet; nothing to report")
    written: dict[str, bytes] = {}
    figure = threshold_curves_figure(
        {v.label: v.box_curve for v in views if v.box_curve is not None},
        {v.label: v.pr_curve for v in views if v.pr_curve is not None},
        iou=BOX_IOU,
    )
    written["curves.png"] = figure_png(figure)
    images = _images(dataset, {case.image_id for view in views for case in view.cases})
    sections = [
        f"<h1>acol-flow run {_e(record.name)}</h1>",
        f"<p>Dataset <code>{_e(record.data_uri)}</code>. Localisation metrics are the evaluation JSON's: "
        "scored on the evaluated split's rows that hold an object, with the ground-truth class's map "
        "(GT-known); accuracy on all its labelled rows. The thresholded metrics (GT-known and top-1 loc, "
        "Dice and IoU at val τ) use the thresholds below. The centre-Gaussian row scores one fixed map on "
        f"{_e(views[0].label)}'s rows.</p>",
        "<h2>Metrics</h2>",
        _metrics_table(views, baseline),
    ]
    if skipped:
        sections.append(f"<p>Not in the table (no evaluation yet): {_e(', '.join(skipped))}.</p>")
    sections += [
        "<h3>Thresholds</h3>",
        _thresholds_table(views),
        _subjects_section(views),
        "<h2>Threshold curves</h2>",
        f"<p>Left: share of box rows whose best box at τ has IoU ≥ {BOX_IOU:g} with a ground-truth box "
        "(largest contour; its maximum is MaxBoxAcc). Right: pixel precision against recall over τ on the "
        "object rows (the area under it is PxAP).</p>",
        "<img src='curves.png' alt='BoxAcc against the threshold, and pixel precision-recall curves'>",
        _overlay_section(views, images, written),
    ]
    if record.sweep_uri:
        sections.append(_sweep_section(record.sweep_uri, written))
    sections.append(_timings_section(record))
    summary: dict[str, Any] = {
        v.label: {title: _get(v.evaluation, path) for title, path in COLUMNS} for v in views
    }
    summary[BASELINE] = baseline
    written["summary.json"] = (json.dumps(summary, indent=2) + "\n").encode()
    written["curves.json"] = json.dumps(_curves_data(views)).encode()
    out = report_uri(run_uri)
    for name, data in written.items():
        write_bytes(join(out, name), data)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>acol-flow report: {_e(record.name)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )
    index_uri = join(out, "index.html")
    write_bytes(index_uri, page.encode())
    return index_uri
