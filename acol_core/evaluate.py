"""Score a predictions folder against the dataset's ground truth: every metric of ``acol_core.metrics``.

Protocol (wsolevaluation's): the CAM thresholds of the thresholded metrics (GT-known / top-1 loc, Dice,
IoU) are chosen on the ``fullsup`` rows of the val split and applied to the evaluated split; PxAP and
MaxBoxAcc(V2) are threshold-free (the maximum over thresholds). The val rows' predictions come from
``val_predictions`` when given, else from the evaluated predictions folder itself when it holds val rows
(``acol localize --split val,test``). Without any, the thresholds fall back to the one ``localize``
used, and the report says so. ``val_data`` names the dataset of ``val_predictions`` when it is another
one (thresholds from a training cohort's fullsup val rows, applied to an external cohort whose rows may
all be ``test``); ``thresholds.val_data`` / ``thresholds.external`` record where they came from. Val
predictions made on another dataset than ``data`` are refused unless ``val_data`` names it: two cohorts
may share image ids.

Per subject: for binary datasets whose subjects have several slices, ``subjects`` holds per-subject
(3-D) Dice/IoU at the Dice threshold and subject-level detection (``acol_core.subjects`` says which map
and which subjects count); otherwise ``subjects.skipped`` says why.

Seeds: ``evaluate_runs`` scores several predictions folders of one model (one dataset, different seeds):
each run's report under ``runs``, mean ± sd (ddof=1) and n per metric under ``seeds``, and with
``compare_to`` the paired bootstrap interval of the PxAP difference per run (``acol_core.stats``).

Which rows count:
- classification: every row with a label (``label >= 0``), overall and per class (per-class recall);
- pixel metrics (PxAP, Dice, IoU): rows whose mask has object pixels (GT-known: the object is there);
- box metrics (MaxBoxAcc, MaxBoxAccV2, GT-known loc, top-1 loc): rows with ground-truth boxes (the
  ``boxes`` column, else the components of the mask);
- off-target share: those object rows that have an ``anatomy_mask``.

Maps: localisation is scored with the ground-truth class's map. ``localize`` stores the predicted
class's map (``cam``) plus, where the label differs from the prediction, the GT class's map
(``cam_gt``). Predictions written without GT maps (``--no-gt-maps``) have no ``cam_gt``: misclassified
object rows are then scored with the predicted (wrong) class's map, which lowers the GT-known numbers;
the report counts those rows in ``maps.object_rows_scored_with_predicted_class_map``.

Examples:
    >>> report = evaluate_predictions("runs/pred", "runs/data", split="test")  # doctest: +SKIP
    >>> report["localization"]["overall"]["pxap"]                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from acol_core.data.codec import decode_png
from acol_core.localize import boxes_from_mask
from acol_core.metrics import (
    best_dice,
    classification_accuracy,
    classification_metrics,
    dice_iou_at,
    gt_known_loc,
    max_box_acc,
    max_box_acc_v2,
    off_target_share,
    pxap,
    top1_loc,
)
from acol_core.predictions import PredictionsError, quantize_cam, read_predictions, read_success
from acol_core.stats import paired_bootstrap_histograms, pixel_histograms, summarize_seeds
from acol_core.subjects import subject_metrics, subjects_csv, summarize_subjects

__all__ = [
    "JoinedRows",
    "StoredMaps",
    "join_predictions",
    "object_histograms",
    "evaluate_predictions",
    "evaluate_runs",
    "localization_report",
    "seed_metrics",
    "select_thresholds",
    "volume_report",
    "subjects_csv_uri",
    "write_subjects_csv",
]

_GT_COLUMNS = ["image_id", "label", "mask", "boxes", "anatomy_mask", "fullsup", "subject_id", "slice_index"]
_PRED_COLUMNS = ["image_id", "pred_label", "cam", "cam_gt"]


class StoredMaps(Sequence):
    """uint8 maps (0..255) kept as is, seen as float maps in [0, 1] one at a time (4× less memory)."""

    def __init__(self, maps: Sequence[np.ndarray]) -> None:
        self._maps = list(maps)

    def __len__(self) -> int:
        return len(self._maps)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self._maps[i].astype(np.float32) / 255.0

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def take(self, index: Sequence[int]) -> StoredMaps:
        return StoredMaps([self._maps[i] for i in index])


@dataclass
class JoinedRows:
    """The joined rows of one split: ground truth and the GT class's maps, at image resolution."""

    image_ids: list[str]
    labels: np.ndarray
    preds: np.ndarray
    maps: StoredMaps
    masks: list[np.ndarray | None]
    boxes: list[list[list[int]]]
    anatomy: list[np.ndarray | None]
    fullsup: np.ndarray
    predicted_map_rows: int  # misclassified rows without a GT map (scored with the predicted class's map)
    subject_ids: list[str]
    slice_indices: np.ndarray
    pred_maps: StoredMaps  # the predicted class's map (``cam``): what per-subject volumes are cut from

    def take(self, index: Sequence[int]) -> JoinedRows:
        return JoinedRows(
            [self.image_ids[i] for i in index],
            self.labels[list(index)],
            self.preds[list(index)],
            self.maps.take(index),
            [self.masks[i] for i in index],
            [self.boxes[i] for i in index],
            [self.anatomy[i] for i in index],
            self.fullsup[list(index)],
            0,
            [self.subject_ids[i] for i in index],
            self.slice_indices[list(index)],
            self.pred_maps.take(index),
        )

    def pixel_rows(self) -> list[int]:
        return [i for i, m in enumerate(self.masks) if m is not None and (m == 1).any()]

    def box_rows(self) -> list[int]:
        return [i for i, b in enumerate(self.boxes) if b]

    @classmethod
    def from_arrays(
        cls, cams: np.ndarray, masks: np.ndarray, anatomy: np.ndarray | None = None
    ) -> JoinedRows:
        """Object rows held in memory (training-time validation): float maps in [0, 1] quantised as
        stored, ground-truth boxes from the masks' components, as ``join_predictions`` does."""
        n = len(cams)
        masks_list = [np.asarray(m) for m in masks]
        maps = StoredMaps([quantize_cam(c) for c in cams])
        return cls(
            image_ids=[str(i) for i in range(n)],
            labels=np.full(n, -1, dtype=np.int64),
            preds=np.full(n, -1, dtype=np.int64),
            maps=maps,
            masks=masks_list,
            boxes=[boxes_from_mask(m) for m in masks_list],
            anatomy=[None] * n if anatomy is None else [np.asarray(a) for a in anatomy],
            fullsup=np.zeros(n, dtype=bool),
            predicted_map_rows=0,
            subject_ids=[""] * n,
            slice_indices=np.zeros(n, dtype=np.int64),
            pred_maps=maps,
        )

    def with_maps(self, maps: Sequence[np.ndarray]) -> JoinedRows:
        """The same rows scored with other uint8 maps (a baseline's), as the stored CAMs are."""
        return dataclasses.replace(self, maps=StoredMaps(maps))


def _decode_mask(data: bytes | None) -> np.ndarray | None:
    if data is None:
        return None
    mask = decode_png(bytes(data))
    return mask[..., 0] if mask.ndim == 3 else mask


def join_predictions(pred_uri: str, dataset: Any, split: str, required: bool) -> JoinedRows | None:
    """Rows of ``split`` with their predictions; every row must have one when ``required``."""
    gt = dataset.read_table(split=split, columns=_GT_COLUMNS).to_pylist()
    pred = {r["image_id"]: r for r in read_predictions(pred_uri, columns=_PRED_COLUMNS).to_pylist()}
    missing = [r["image_id"] for r in gt if r["image_id"] not in pred]
    if missing and required:
        raise PredictionsError(
            f"{len(missing)} of {len(gt)} {split} rows have no prediction in {pred_uri} (e.g. {missing[0]!r}): "
            f"localize --split {split} first"
        )
    rows = [r for r in gt if r["image_id"] in pred]
    if not rows:
        return None
    maps, pred_maps, masks, boxes, anatomy, preds = [], [], [], [], [], []
    predicted_map_rows = 0
    for r in rows:
        p = pred[r["image_id"]]
        use_gt = p["cam_gt"] is not None
        cam = decode_png(bytes(p["cam_gt"] if use_gt else p["cam"]))
        pred_maps.append(decode_png(bytes(p["cam"])) if use_gt else cam)
        mask = _decode_mask(r["mask"])
        if mask is not None and mask.shape != cam.shape:
            raise PredictionsError(
                f"{r['image_id']}: map {cam.shape} and mask {mask.shape} differ: predictions of another dataset?"
            )
        gt_boxes = r["boxes"] if r["boxes"] else (boxes_from_mask(mask) if mask is not None else [])
        if gt_boxes and r["label"] >= 0 and p["pred_label"] != r["label"] and not use_gt:
            predicted_map_rows += 1
        maps.append(cam)
        masks.append(mask)
        boxes.append(gt_boxes)
        anatomy.append(_decode_mask(r["anatomy_mask"]))
        preds.append(p["pred_label"])
    return JoinedRows(
        image_ids=[r["image_id"] for r in rows],
        labels=np.array([r["label"] for r in rows], dtype=np.int64),
        preds=np.array(preds, dtype=np.int64),
        maps=StoredMaps(maps),
        masks=masks,
        boxes=boxes,
        anatomy=anatomy,
        fullsup=np.array([bool(r["fullsup"]) for r in rows]),
        predicted_map_rows=predicted_map_rows,
        subject_ids=[str(r["subject_id"]) for r in rows],
        slice_indices=np.array([int(r["slice_index"]) for r in rows], dtype=np.int64),
        pred_maps=StoredMaps(pred_maps),
    )


def select_thresholds(
    rows: JoinedRows | None, iou_threshold: float = 0.5, step: float = 0.01
) -> dict[str, Any]:
    """CAM thresholds chosen on the ``fullsup`` object rows: best box accuracy and best Dice."""
    if rows is None:
        return {"rows": 0}
    chosen = rows.take([i for i in range(len(rows.image_ids)) if rows.fullsup[i]])
    out: dict[str, Any] = {"rows": len(chosen.image_ids)}
    box = chosen.box_rows()
    if box:
        sub = chosen.take(box)
        acc = max_box_acc(sub.maps, sub.boxes, (iou_threshold,), step=step)
        out["box_threshold"] = acc["best_threshold"][float(iou_threshold)]
    pixel = chosen.pixel_rows()
    if pixel:
        sub = chosen.take(pixel)
        out["dice_threshold"] = best_dice(sub.maps, [m for m in sub.masks], step=step)["threshold"]
    return out


def localization_report(
    rows: JoinedRows,
    box_threshold: float,
    dice_threshold: float,
    iou_threshold: float = 0.5,
    step: float = 0.01,
) -> dict[str, Any]:
    """Every localisation metric over ``rows`` (see the module docstring for which rows count)."""
    out: dict[str, Any] = {}
    pixel = rows.pixel_rows()
    out["pixel_rows"] = len(pixel)
    if pixel:
        sub = rows.take(pixel)
        masks = list(sub.masks)
        out["pxap"] = pxap(sub.maps, masks, step=step)
        out["best_dice"] = best_dice(sub.maps, masks, step=step)
        out["dice_iou"] = {"threshold": dice_threshold, **dice_iou_at(sub.maps, masks, dice_threshold)}
    box = rows.box_rows()
    out["box_rows"] = len(box)
    if box:
        sub = rows.take(box)
        acc = max_box_acc(sub.maps, sub.boxes, (iou_threshold,), step=step)
        v2 = max_box_acc_v2(sub.maps, sub.boxes, step=step)
        out["max_box_acc"] = acc["per_iou"][float(iou_threshold)]
        out["max_box_acc_threshold"] = acc["best_threshold"][float(iou_threshold)]
        out["max_box_acc_v2"] = v2["mean"]
        out["max_box_acc_v2_per_iou"] = {str(k): v for k, v in v2["per_iou"].items()}
        out["gt_known_loc"] = gt_known_loc(sub.maps, sub.boxes, box_threshold, iou_threshold)
        out["top1_loc"] = top1_loc(sub.maps, sub.boxes, sub.preds, sub.labels, box_threshold, iou_threshold)
        out["loc_threshold"] = box_threshold
    localized = sorted(set(pixel) | set(box))
    with_anatomy = [i for i in localized if rows.anatomy[i] is not None]
    if with_anatomy:
        sub = rows.take(with_anatomy)
        anatomy = [(a == 1).astype(np.uint8) for a in sub.anatomy]
        out["off_target_share"] = off_target_share(sub.maps, anatomy)
        out["off_target_rows"] = len(with_anatomy)
    return out


def _classification(rows: JoinedRows, class_names: Sequence[str]) -> dict[str, Any]:
    labelled = rows.labels >= 0
    labels, preds = rows.labels[labelled], rows.preds[labelled]
    per_class = {
        name: classification_accuracy(preds[labels == k], labels[labels == k])
        for k, name in enumerate(class_names)
        if (labels == k).any()
    }
    return {
        "rows": int(labelled.sum()),
        "accuracy": classification_accuracy(preds, labels),
        "balanced_accuracy": classification_metrics(preds, labels, len(class_names))["balanced_accuracy"],
        "per_class": per_class,
    }


def volume_report(rows: JoinedRows, class_names: Sequence[str], threshold: float) -> dict[str, Any]:
    """Per-subject (3-D) Dice/IoU and detection at ``threshold`` (``acol_core.subjects``), or why not."""
    if len(class_names) != 2:
        return {
            "skipped": f"per-subject volume metrics need a binary dataset, this one has {len(class_names)} classes"
        }
    subjects = set(rows.subject_ids)
    if len(subjects) == len(rows.subject_ids):
        return {"skipped": "no subject has more than one slice (2-D images, not volumes)"}
    per_subject = subject_metrics(
        rows.subject_ids, rows.slice_indices, rows.pred_maps, rows.masks, list(rows.preds == 1), threshold
    )
    return {
        "threshold": threshold,
        "positive_class": class_names[1],
        "summary": summarize_subjects(per_subject, len(subjects)),
        "per_subject": per_subject,
    }


def _same_uri(a: str, b: str) -> bool:
    """Two URIs of one dataset: equal, or local paths that resolve to the same folder."""
    import os

    from acol_core.storage import is_local

    def norm(uri: str) -> str:
        if not is_local(uri):
            return uri.rstrip("/")
        return os.path.realpath(uri.removeprefix("file://"))

    return norm(a) == norm(b)


def _evaluate(
    pred_uri: str,
    data_uri: str,
    split: str,
    val_predictions: str | None,
    val_data: str | None,
    iou_threshold: float,
    step: float,
) -> tuple[dict[str, Any], JoinedRows]:
    from acol_core.data.shards import open_dataset

    info = read_success(pred_uri)
    dataset = open_dataset(data_uri, verify=False)
    class_names = dataset.class_names or info.class_names
    rows = join_predictions(pred_uri, dataset, split, required=True)
    if rows is None:
        raise PredictionsError(f"split {split!r} of {data_uri} has no rows")
    if val_data is not None and val_predictions is None:
        raise PredictionsError(
            "--val-data names the dataset of --val-predictions: give --val-predictions too"
        )
    val_source = val_predictions or pred_uri
    val_uri = val_data or data_uri
    if val_predictions is not None:
        made_on = read_success(val_predictions).data
        if val_data is None and not _same_uri(made_on, data_uri):
            # Image ids of two cohorts may coincide (sub-0001/z010): never join one's maps to the other's masks.
            raise PredictionsError(
                f"{val_predictions} were made on {made_on}, not {data_uri}: name their dataset with --val-data"
            )
    val_dataset = dataset if val_uri == data_uri else open_dataset(val_uri, verify=False)
    chosen = select_thresholds(
        join_predictions(val_source, val_dataset, "val", required=False), iou_threshold, step
    )
    if val_predictions is not None and chosen["rows"] == 0:
        hint = "" if val_data else ": predictions of another dataset? name it with --val-data"
        raise PredictionsError(
            f"{val_predictions} has no predictions for fullsup val rows of {val_uri}{hint}"
        )
    fallback = float(info.threshold)
    box_threshold = chosen.get("box_threshold", fallback)
    dice_threshold = chosen.get("dice_threshold", fallback)
    per_class = {}
    for k, name in enumerate(class_names):
        index = [i for i in range(len(rows.image_ids)) if rows.labels[i] == k]
        if index:
            report = localization_report(rows.take(index), box_threshold, dice_threshold, iou_threshold, step)
            if report["pixel_rows"] or report["box_rows"]:
                per_class[name] = report
    report = {
        "predictions": pred_uri,
        "data": data_uri,
        "split": split,
        "rows": len(rows.image_ids),
        "model": info.model,
        "checkpoint": info.checkpoint,
        "classification": _classification(rows, class_names),
        "thresholds": {
            "source": val_source if chosen["rows"] else "localize threshold (no fullsup val predictions)",
            "val_data": val_uri if chosen["rows"] else None,
            "external": bool(chosen["rows"]) and val_uri != data_uri,
            "fullsup_val_rows": chosen["rows"],
            "box": box_threshold,
            "dice": dice_threshold,
            "localize": fallback,
        },
        "maps": {
            "gt_maps": bool(info.extra.get("gt_maps", False)),
            "object_rows_scored_with_predicted_class_map": rows.predicted_map_rows,
        },
        "localization": {
            "overall": localization_report(rows, box_threshold, dice_threshold, iou_threshold, step),
            "per_class": per_class,
        },
        "subjects": volume_report(rows, class_names, dice_threshold),
    }
    return report, rows


def evaluate_predictions(
    pred_uri: str,
    data_uri: str,
    split: str = "test",
    val_predictions: str | None = None,
    val_data: str | None = None,
    iou_threshold: float = 0.5,
    step: float = 0.01,
) -> dict[str, Any]:
    """Join predictions with the dataset by ``image_id`` and compute every metric, as a JSON-ready dict.

    Args:
        pred_uri: a committed predictions folder covering every row of ``split``.
        val_predictions: predictions of the val split for the threshold choice (default: ``pred_uri``'s
            own val rows, if it has any).
        val_data: the dataset ``val_predictions`` were made on (default: ``data_uri``): thresholds chosen
            on a training cohort's fullsup val rows, applied to an external cohort.
        iou_threshold: box IoU of MaxBoxAcc, GT-known and top-1 loc.
        step: CAM threshold step.
    """
    return _evaluate(pred_uri, data_uri, split, val_predictions, val_data, iou_threshold, step)[0]


def seed_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The part of one evaluation that seed statistics summarise: metrics and the chosen thresholds."""
    subjects = report.get("subjects", {})
    return {
        "classification": report["classification"],
        "thresholds": {k: report["thresholds"][k] for k in ("box", "dice")},
        "localization": report["localization"],
        **({"subjects": subjects["summary"]} if "summary" in subjects else {}),
    }


def _check_one_recipe(pred_uris: Sequence[str]) -> None:
    """Several predictions folders are seeds of one recipe: one model, one dataset, each folder once."""
    if len(set(pred_uris)) != len(pred_uris):
        raise PredictionsError(f"a predictions folder is listed twice in {','.join(pred_uris)}")
    infos = [read_success(uri) for uri in pred_uris]
    for key in ("model", "data", "class_names"):
        values = {uri: getattr(info, key) for uri, info in zip(pred_uris, infos, strict=True)}
        if len({str(v) for v in values.values()}) > 1:
            listed = ", ".join(f"{uri}: {v}" for uri, v in values.items())
            raise PredictionsError(
                f"--predictions must be seeds of one model on one dataset, but their {key} differ ({listed})"
            )


def _pixel_hist(rows: JoinedRows, step: float) -> tuple[np.ndarray, np.ndarray]:
    sub = rows.take(rows.pixel_rows())
    return pixel_histograms(sub.maps, sub.masks, step)


def object_histograms(
    pred_uri: str, data_uri: str, split: str = "test", step: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pixel histograms (``acol_core.stats.pixel_histograms``) of the GT class's maps on the
    object rows of ``split``, in the dataset's row order: what paired PxAP comparisons resample."""
    from acol_core.data.shards import open_dataset

    read_success(pred_uri)
    rows = join_predictions(pred_uri, open_dataset(data_uri, verify=False), split, required=True)
    if rows is None:
        raise PredictionsError(f"split {split!r} of {data_uri} has no rows")
    return _pixel_hist(rows, step)


def evaluate_runs(
    pred_uris: Sequence[str],
    data_uri: str,
    split: str = "test",
    val_predictions: Sequence[str] | None = None,
    val_data: str | None = None,
    compare_to: Sequence[str] = (),
    n_boot: int = 2000,
    seed: int = 0,
    iou_threshold: float = 0.5,
    step: float = 0.01,
) -> dict[str, Any]:
    """Several seeds of one model: each run's report, mean ± sd per metric; optionally paired comparisons.

    ``val_predictions``: none (each run's own val rows) or one folder per run. ``compare_to``: one folder
    (every run compared with it) or one per run (run i with folder i); each comparison is the bootstrap
    interval of PxAP(run) − PxAP(other) over the evaluated split's object images (``acol_core.stats``).
    One run without ``compare_to`` gives ``evaluate_predictions``'s report unchanged.
    """
    pred_uris, compare_to = list(pred_uris), list(compare_to)
    if not pred_uris:
        raise PredictionsError("no predictions folder given")
    vals = list(val_predictions) if val_predictions else [None] * len(pred_uris)
    if len(vals) != len(pred_uris):
        raise PredictionsError(
            f"{len(vals)} val predictions for {len(pred_uris)} predictions folders: give one per run"
        )
    if compare_to and len(compare_to) not in (1, len(pred_uris)):
        raise PredictionsError(f"--compare-to takes 1 or {len(pred_uris)} folders, got {len(compare_to)}")
    _check_one_recipe(pred_uris)
    reports, hists = [], []
    for uri, val in zip(pred_uris, vals, strict=True):
        report, rows = _evaluate(uri, data_uri, split, val, val_data, iou_threshold, step)
        reports.append(report)
        if compare_to:
            hists.append(_pixel_hist(rows, step))
        del rows
    comparisons = []
    if compare_to:
        from acol_core.data.shards import open_dataset

        dataset = open_dataset(data_uri, verify=False)
        other_hists = []
        for uri in compare_to:
            read_success(uri)
            other = join_predictions(uri, dataset, split, required=True)
            assert other is not None  # every row has a prediction (required), and the split has rows
            other_hists.append(_pixel_hist(other, step))
        for i, uri in enumerate(pred_uris):
            j = i if len(compare_to) > 1 else 0
            result = paired_bootstrap_histograms(hists[i], other_hists[j], n_boot, seed)
            comparisons.append({"metric": "pxap", "a": uri, "b": compare_to[j], **result})
    if len(reports) == 1:
        return {**reports[0], **({"comparison": comparisons} if comparisons else {})}
    return {
        "predictions": pred_uris,
        "data": data_uri,
        "split": split,
        "model": reports[0]["model"],
        "seeds": summarize_seeds([seed_metrics(r) for r in reports]),
        "runs": reports,
        **({"comparison": comparisons} if comparisons else {}),
    }


def subjects_csv_uri(json_uri: str) -> str:
    """Where the per-subject CSV of an evaluation JSON goes: beside it, ``<name>.subjects.csv``."""
    return (json_uri[: -len(".json")] if json_uri.endswith(".json") else json_uri) + ".subjects.csv"


def write_subjects_csv(report: dict[str, Any], uri: str, required: bool = True) -> str | None:
    """Write the per-subject rows of ``report`` (one run, or each of ``runs``) as CSV; records ``uri`` in it.

    Several runs share one file with a leading ``predictions`` column. Without per-subject metrics:
    an error when ``required``, else nothing is written (``None``).
    """
    from acol_core.storage import write_bytes

    runs = report.get("runs", [report])
    skipped = [r["subjects"]["skipped"] for r in runs if "per_subject" not in r.get("subjects", {})]
    if skipped:
        if required:
            raise PredictionsError(f"no per-subject metrics to write: {skipped[0]}")
        return None
    if len(runs) == 1:
        text = subjects_csv(runs[0]["subjects"]["per_subject"])
    else:
        text = subjects_csv(
            [{"predictions": r["predictions"], **s} for r in runs for s in r["subjects"]["per_subject"]],
            leading=("predictions",),
        )
    write_bytes(uri, text.encode())
    for r in runs:
        r["subjects"]["csv"] = uri
    return uri
