"""Per-subject (3-D) metrics for datasets of slices: the slices of each subject restacked into a volume.

Brain-tumour papers report one Dice per subject (patient), not per slice. For a binary dataset
(``healthy`` / ``tumour``) whose subjects have several slices (NIfTI volumes, the phantom), each subject's
slices are ordered by ``slice_index`` and stacked; then, at the CAM threshold τ chosen on the fullsup val
rows:

- predicted tumour voxels: on every slice the model classifies as tumour (``pred_label`` = the positive
  class, label 1), the pixels with ``cam >= τ`` of that class's map; slices classified healthy contribute
  none. The class decides because the stored maps are min-max normalised per slice (every map reaches 1,
  so an ungated map would put tumour on every slice) and because a healthy prediction stores only the
  healthy class's map. No ground truth picks a map: the volume is what the model would hand a reader,
  and false positives on healthy slices count;
- ground-truth tumour voxels: mask == 1; ignore pixels (255, e.g. tumour sections too small to call a
  slice tumour) are left out of both;
- per subject: Dice = 2·TP / (2·TP + FP + FN) and IoU = TP / (TP + FP + FN), pixels pooled over the
  subject's slices; detection: any predicted tumour voxel vs any ground-truth tumour voxel.

Summary: detection counts (TP, FP, FN, TN over subjects), sensitivity TP/(TP+FN), specificity
TN/(TN+FP); Dice and IoU as mean ± sd (ddof=1) and median over the subjects WITH ground-truth tumour.
A subject without ground-truth tumour has no defined Dice (it would be 0 for any false positive and 0/0
otherwise): its Dice and IoU are empty, and it counts in the detection numbers only. Subjects with a slice
that has no mask (no segmentation) are left out and counted.

Examples:
    >>> per = subject_metrics(["a", "a"], [1, 0], [np.ones((1, 2)), np.ones((1, 2))],
    ...                       [np.array([[1, 0]]), np.array([[0, 0]])], [True, False], 0.5)
    >>> per[0]["dice"], per[0]["tp"], per[0]["fp"]
    (0.666666666667, 1, 1)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from acol_core.predictions import PredictionsError
from acol_core.stats import IGNORE, mean_sd

__all__ = ["SUBJECT_CSV_COLUMNS", "subject_metrics", "subjects_csv", "summarize_subjects"]

SUBJECT_CSV_COLUMNS = (
    "subject_id",
    "slices",
    "gt_voxels",
    "pred_voxels",
    "tp",
    "fp",
    "fn",
    "dice",
    "iou",
    "gt_tumour",
    "pred_tumour",
)


def _round(value: float) -> float:
    return float(f"{value:.12g}")


def subject_metrics(
    subject_ids: Sequence[str],
    slice_indices: Sequence[int],
    maps: Sequence[Any],
    masks: Sequence[np.ndarray | None],
    positive: Sequence[bool],
    threshold: float,
) -> list[dict[str, Any]]:
    """One dict per subject (sorted by id) with the columns of ``SUBJECT_CSV_COLUMNS``.

    Args:
        maps: per slice, the predicted class's map in [0, 1].
        masks: per slice, the ground-truth mask (0/1/255) or None (no segmentation: subject left out).
        positive: per slice, whether the model predicts the positive (tumour) class.
        threshold: CAM threshold τ (``cam >= τ`` is predicted tumour).
    """
    by_subject: dict[str, list[int]] = {}
    for i, subject in enumerate(subject_ids):
        by_subject.setdefault(subject, []).append(i)
    out = []
    for subject in sorted(by_subject):
        rows = sorted(by_subject[subject], key=lambda i: int(slice_indices[i]))
        order = [int(slice_indices[i]) for i in rows]
        if len(set(order)) != len(order):
            raise PredictionsError(f"subject {subject!r} has two slices with the same slice_index")
        if any(masks[i] is None for i in rows):
            continue
        shapes = {np.shape(masks[i]) for i in rows}
        if len(shapes) != 1:
            raise PredictionsError(f"subject {subject!r} has slices of different sizes {sorted(shapes)}")
        gt = np.stack([np.asarray(masks[i]) for i in rows])
        pred = np.stack(
            [(np.asarray(maps[i], dtype=np.float64) >= threshold) & bool(positive[i]) for i in rows]
        )
        scored = gt != IGNORE
        truth, guess = (gt == 1) & scored, pred & scored
        tp, fp, fn = int((truth & guess).sum()), int((~truth & guess).sum()), int((truth & ~guess).sum())
        has_gt = bool(truth.any())
        out.append(
            {
                "subject_id": subject,
                "slices": len(rows),
                "gt_voxels": int(truth.sum()),
                "pred_voxels": int(guess.sum()),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "dice": _round(2 * tp / (2 * tp + fp + fn)) if has_gt else None,
                "iou": _round(tp / (tp + fp + fn)) if has_gt else None,
                "gt_tumour": has_gt,
                "pred_tumour": bool(guess.any()),
            }
        )
    return out


def _ratio(num: int, den: int) -> float | None:
    return _round(num / den) if den else None


def summarize_subjects(per_subject: Sequence[dict[str, Any]], subjects_total: int) -> dict[str, Any]:
    """Detection counts, sensitivity, specificity; Dice/IoU mean ± sd and median over subjects with tumour."""
    tp = sum(1 for s in per_subject if s["gt_tumour"] and s["pred_tumour"])
    fn = sum(1 for s in per_subject if s["gt_tumour"] and not s["pred_tumour"])
    fp = sum(1 for s in per_subject if not s["gt_tumour"] and s["pred_tumour"])
    tn = sum(1 for s in per_subject if not s["gt_tumour"] and not s["pred_tumour"])
    with_gt = [s for s in per_subject if s["gt_tumour"]]
    out: dict[str, Any] = {
        "subjects": len(per_subject),
        "subjects_with_tumour": len(with_gt),
        "subjects_without_masks": subjects_total - len(per_subject),
        "detection": {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
        },
    }
    for key in ("dice", "iou"):
        values = [s[key] for s in with_gt]
        out[key] = {**mean_sd(values), "median": _round(float(np.median(values))) if values else None}
    return out


def subjects_csv(per_subject: Sequence[dict[str, Any]], leading: Sequence[str] = ()) -> str:
    """The per-subject rows as CSV text (empty Dice/IoU cells for subjects without tumour).

    ``leading``: extra columns first (e.g. ``predictions`` when several runs share one file).
    """
    columns = [*leading, *SUBJECT_CSV_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in per_subject:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buffer.getvalue()
