"""Evaluation of prediction folders: hand-made maps with known scores, the fullsup-val threshold protocol,
the GT-class map rule, refusals, a trained model's numbers, and the CLI. No Ray: predictions are
written with the plain writer (``write_predictions``) or the plain loop (``localize_plain``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from acol_core.batch_localize import localize_plain
from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.evaluate import evaluate_predictions, evaluate_runs
from acol_core.export import export_model
from acol_core.localize import boxes_from_mask
from acol_core.metrics import box_iou_matrix
from acol_core.predictions import (
    PREDICTION_SCHEMA,
    SUCCESS_NAME,
    PredictionsError,
    decode_mask,
    encode_cam,
    encode_mask,
    write_predictions,
)
from acol_core.train import fit, iterate_minibatches

# test: 8 rows (3 tumour); val: 8 rows (5 tumour), all fullsup; train: 16 rows.
PHANTOM = {
    "num_subjects": 8,
    "slices_per_subject": 4,
    "size": 32,
    "rows_per_shard": 8,
    "seed": 0,
    "split_fractions": (0.5, 0.25, 0.25),
}
CLASSES = ["healthy", "tumour"]
MapFn = Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("phantom") / "data")
    prepare_dataset("phantom", uri, **PHANTOM)
    return uri


def _object(mask_png: bytes) -> np.ndarray:
    return (decode_mask(mask_png) == 1).astype(np.float64)


def _hand_predictions(
    data: str,
    out: str,
    splits: tuple[str, ...] = ("val", "test"),
    cam: MapFn = lambda obj: obj,
    cam_gt: MapFn | None = None,
    pred: Callable[[int], int] = lambda label: label,
    model: str = "hand",
) -> str:
    """A predictions folder whose maps are functions of each row's ground-truth object mask."""
    rows = []
    for split in splits:
        for r in open_dataset(data).read_table(split).to_pylist():
            obj = _object(r["mask"])
            label = pred(r["label"])
            rows.append(
                {
                    "image_id": r["image_id"],
                    "pred_label": label,
                    "scores": [1.0 - label, float(label)],
                    "cam": encode_cam(cam(obj)),
                    "mask": encode_mask((obj > 0).astype(np.uint8)),
                    "boxes": [],
                    "cam_gt": None if cam_gt is None or label == r["label"] else encode_cam(cam_gt(obj)),
                    "model": "hand",
                    "checkpoint": "-",
                    "subject_id": r["subject_id"],
                    "slice_index": r["slice_index"],
                    "height": r["height"],
                    "width": r["width"],
                }
            )
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    write_predictions(
        [table],
        out,
        model=model,
        checkpoint="-",
        data=data,
        splits=list(splits),
        threshold=0.5,
        class_names=CLASSES,
    )
    return out


def test_perfect_maps_score_one(phantom: str, tmp_path: Path) -> None:
    report = evaluate_predictions(_hand_predictions(phantom, str(tmp_path / "p")), phantom)
    assert report["rows"] == 8 and report["classification"] == {
        "rows": 8,
        "accuracy": 1.0,
        "balanced_accuracy": 1.0,
        "per_class": {"healthy": 1.0, "tumour": 1.0},
    }
    overall = report["localization"]["overall"]
    assert overall["pixel_rows"] == 3 and overall["box_rows"] == 3
    for key in ("pxap", "max_box_acc", "gt_known_loc", "top1_loc"):
        assert overall[key] == 1.0, key
    # wsolevaluation's box is boundingRect's x + w, one pixel past the object: a perfect map of a
    # w×h lesion scores IoU wh / ((w+1)(h+1)) (less at the border), below 0.7 for small lesions.
    ious = []
    for r in open_dataset(phantom).read_table("test").to_pylist():
        obj = _object(r["mask"])
        if obj.any():
            (x0, y0, x1, y1), (h, w) = boxes_from_mask(obj)[0], obj.shape
            pred = [[x0, y0, min(x1 + 1, w - 1), min(y1 + 1, h - 1)]]
            ious.append(box_iou_matrix(pred, [[x0, y0, x1, y1]])[0, 0])
    expected = np.mean([np.mean([iou >= t for iou in ious]) for t in (0.3, 0.5, 0.7)])
    assert overall["max_box_acc_v2"] == pytest.approx(expected) and expected < 1.0
    assert overall["best_dice"]["dice"] == 1.0 and overall["dice_iou"] == {
        "threshold": pytest.approx(0.01),
        "dice": 1.0,
        "iou": 1.0,
    }
    # Thresholds come from the fullsup val rows: the lowest τ that is best there (wsol's τ=0 keeps
    # values > 0, the object; Dice's τ=0 keeps every pixel).
    assert report["thresholds"]["fullsup_val_rows"] == 8
    assert report["thresholds"]["box"] == 0.0
    assert overall["off_target_share"] == 0.0 and overall["off_target_rows"] == 3
    assert list(report["localization"]["per_class"]) == ["tumour"]
    assert report["localization"]["per_class"]["tumour"]["pxap"] == 1.0


def test_inverted_maps_and_wrong_classes(phantom: str, tmp_path: Path) -> None:
    """Maps that light up everything but the object, and every prediction wrong."""
    report = evaluate_predictions(
        _hand_predictions(
            phantom, str(tmp_path / "p"), cam=lambda obj: 1.0 - obj, pred=lambda label: 1 - label
        ),
        phantom,
    )
    overall = report["localization"]["overall"]
    assert report["classification"]["accuracy"] == 0.0
    assert overall["best_dice"]["dice"] < 0.2 and overall["top1_loc"] == 0.0
    # Only τ = 0 (everything on) catches object pixels: PxAP is the object share of the pixels.
    n_obj = sum(
        _object(m).sum()
        for m in open_dataset(phantom).read_table("test", ["mask"]).column("mask").to_pylist()
        if _object(m).any()
    )
    assert overall["pxap"] == pytest.approx(n_obj / (3 * 32 * 32))
    assert report["maps"]["object_rows_scored_with_predicted_class_map"] == 3


def test_gt_class_map_is_used_where_stored(phantom: str, tmp_path: Path) -> None:
    """Wrong class predicted with a useless map, but the GT class's map stored: GT-known scores 1."""
    out = _hand_predictions(
        phantom,
        str(tmp_path / "p"),
        cam=lambda obj: np.zeros_like(obj),
        cam_gt=lambda obj: obj,
        pred=lambda label: 1 - label,
    )
    report = evaluate_predictions(out, phantom)
    overall = report["localization"]["overall"]
    assert overall["pxap"] == 1.0 and overall["gt_known_loc"] == 1.0
    assert overall["top1_loc"] == 0.0  # the class is wrong
    assert report["maps"]["object_rows_scored_with_predicted_class_map"] == 0


def test_dice_threshold_is_chosen_on_val_not_test(phantom: str, tmp_path: Path) -> None:
    """Val maps separate at τ in (0.3, 0.6]; test maps need τ > 0.35. The report uses val's choice."""
    val = _hand_predictions(
        phantom, str(tmp_path / "val"), ("val",), cam=lambda obj: np.where(obj > 0, 0.6, 0.3)
    )
    test = _hand_predictions(
        phantom, str(tmp_path / "test"), ("test",), cam=lambda obj: np.where(obj > 0, 1.0, 0.35)
    )
    report = evaluate_predictions(test, phantom, val_predictions=val)
    overall = report["localization"]["overall"]
    assert report["thresholds"]["source"] == val and report["thresholds"]["dice"] == pytest.approx(0.30)
    assert overall["dice_iou"]["threshold"] == pytest.approx(0.30) and overall["dice_iou"]["dice"] < 0.5
    assert overall["best_dice"]["dice"] == 1.0 and overall["best_dice"]["threshold"] == pytest.approx(0.35)
    # Without val predictions, the localize threshold is used, and the report says so.
    alone = evaluate_predictions(test, phantom)
    assert alone["thresholds"]["fullsup_val_rows"] == 0 and alone["thresholds"]["dice"] == 0.5
    assert alone["localization"]["overall"]["dice_iou"]["dice"] == 1.0


def test_refusals(phantom: str, tmp_path: Path) -> None:
    val_only = _hand_predictions(phantom, str(tmp_path / "val"), ("val",))
    with pytest.raises(PredictionsError, match="8 of 8 test rows have no prediction"):
        evaluate_predictions(val_only, phantom)
    test_only = _hand_predictions(phantom, str(tmp_path / "test"), ("test",))
    with pytest.raises(PredictionsError, match="no predictions for fullsup val rows"):
        evaluate_predictions(test_only, phantom, val_predictions=test_only)
    (tmp_path / "test" / SUCCESS_NAME).unlink()
    with pytest.raises(PredictionsError, match=SUCCESS_NAME):
        evaluate_predictions(test_only, phantom)


def test_trained_model_numbers_in_range(phantom: str, tmp_path: Path) -> None:
    config = TrainConfig(model="acol", image_size=32, epochs=1, batch_size=8, augment=False)
    arrays = table_to_arrays(open_dataset(phantom).read_table("train"), 1, 32, with_masks=False)
    model = fit(
        config, lambda epoch: iterate_minibatches(arrays, 8, np.random.default_rng(epoch), False)
    ).model
    model_uri = export_model(model, config, CLASSES, str(tmp_path / "model.safetensors"))
    table = localize_plain(model_uri, phantom, "val,test")
    out = str(tmp_path / "pred")
    write_predictions(
        [table],
        out,
        model="acol",
        checkpoint="-",
        data=phantom,
        splits=["val", "test"],
        threshold=0.5,
        class_names=CLASSES,
        extra={"gt_maps": True},
    )
    report = evaluate_predictions(out, phantom)
    overall = report["localization"]["overall"]
    values = [
        report["classification"]["accuracy"],
        overall["pxap"],
        overall["max_box_acc"],
        overall["max_box_acc_v2"],
        overall["gt_known_loc"],
        overall["top1_loc"],
        overall["off_target_share"],
        overall["best_dice"]["dice"],
        overall["dice_iou"]["dice"],
        overall["dice_iou"]["iou"],
    ]
    assert all(0.0 <= v <= 1.0 for v in values), values
    assert overall["pixel_rows"] == 3 and report["thresholds"]["fullsup_val_rows"] == 8
    assert overall["top1_loc"] <= overall["gt_known_loc"]
    assert report["maps"] == {"gt_maps": True, "object_rows_scored_with_predicted_class_map": 0}
    json.dumps(report)  # JSON-ready


def test_cli_evaluate(phantom: str, tmp_path: Path) -> None:
    pred = _hand_predictions(phantom, str(tmp_path / "p"))
    result = CliRunner().invoke(
        app, ["evaluate", "--predictions", pred, "--data", phantom, "--output", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["localization"]["overall"]["pxap"] == 1.0
    assert json.loads((tmp_path / "m.json").read_text()) == report
    # The phantom's subjects have several slices: their CSV lands next to the JSON, and the JSON says where.
    csv_lines = (tmp_path / "m.subjects.csv").read_text().splitlines()
    assert report["subjects"]["csv"] == str(tmp_path / "m.subjects.csv")
    assert len(csv_lines) == 1 + report["subjects"]["summary"]["subjects"] and csv_lines[0].startswith(
        "subject_id"
    )
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--predictions", str(tmp_path / "empty"), "--data", phantom], SUCCESS_NAME),
        (["--predictions", pred, "--data", str(tmp_path / "empty")], "_manifest.json"),
    ):
        failed = CliRunner().invoke(app, ["evaluate", *args])
        assert failed.exit_code == 2
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("acol evaluate: error:") and message in lines[0]


@pytest.fixture(scope="module")
def cohort_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second cohort: other subjects (another seed) under the same image ids."""
    uri = str(tmp_path_factory.mktemp("cohort_b") / "data")
    prepare_dataset("phantom", uri, **{**PHANTOM, "seed": 1})
    return uri


def test_thresholds_from_another_dataset(phantom: str, cohort_b: str, tmp_path: Path) -> None:
    """Val maps of cohort A separate at τ = 0.30; cohort B's test maps need τ > 0.35: A's choice applies."""
    val_a = _hand_predictions(
        phantom, str(tmp_path / "val"), ("val",), cam=lambda obj: np.where(obj > 0, 0.6, 0.3)
    )
    test_b = _hand_predictions(
        cohort_b, str(tmp_path / "b"), ("test",), cam=lambda obj: np.where(obj > 0, 1.0, 0.35)
    )
    report = evaluate_predictions(test_b, cohort_b, val_predictions=val_a, val_data=phantom)
    thresholds = report["thresholds"]
    assert (
        thresholds["source"] == val_a and thresholds["val_data"] == phantom and thresholds["external"] is True
    )
    assert thresholds["fullsup_val_rows"] == 8 and thresholds["dice"] == pytest.approx(0.30)
    overall = report["localization"]["overall"]
    assert (
        overall["pixel_rows"] > 0
        and overall["dice_iou"]["dice"] < 0.5
        and overall["best_dice"]["dice"] == 1.0
    )
    # Same image ids in both cohorts: without --val-data, A's maps are never joined to B's masks.
    with pytest.raises(PredictionsError, match="name their dataset with --val-data"):
        evaluate_predictions(test_b, cohort_b, val_predictions=val_a)
    with pytest.raises(PredictionsError, match="give --val-predictions too"):
        evaluate_predictions(test_b, cohort_b, val_data=phantom)
    own = evaluate_predictions(val_a, phantom, split="val")
    assert own["thresholds"]["external"] is False and own["thresholds"]["val_data"] == phantom
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--predictions",
            test_b,
            "--data",
            cohort_b,
            "--val-predictions",
            val_a,
            "--val-data",
            phantom,
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["thresholds"] == thresholds


def _subject_truth(data: str) -> dict[str, dict[str, np.ndarray]]:
    """Per test subject, its slices' masks stacked in slice order, and their labels."""
    rows = sorted(
        open_dataset(data).read_table("test").to_pylist(), key=lambda r: (r["subject_id"], r["slice_index"])
    )
    out: dict[str, dict[str, list]] = {}
    for r in rows:
        entry = out.setdefault(r["subject_id"], {"masks": [], "labels": []})
        entry["masks"].append(decode_mask(r["mask"]))
        entry["labels"].append(r["label"])
    return {k: {"masks": np.stack(v["masks"]), "labels": np.array(v["labels"])} for k, v in out.items()}


@pytest.mark.parametrize("case", ["perfect", "all_on"])
def test_per_subject_volume_metrics(phantom: str, tmp_path: Path, case: str) -> None:
    """perfect: maps = object masks, classes right -> Dice 1 per subject with tumour. all_on: every slice
    predicted tumour with a map of ones -> every scored voxel predicted: Dice = 2·G / (G + S) per subject
    (G tumour voxels, S non-ignored voxels of all its slices), every subject detected."""
    if case == "perfect":
        pred = _hand_predictions(phantom, str(tmp_path / "p"))
    else:
        pred = _hand_predictions(phantom, str(tmp_path / "p"), cam=np.ones_like, pred=lambda label: 1)
    subjects = evaluate_predictions(pred, phantom)["subjects"]
    truth = _subject_truth(phantom)
    assert subjects["positive_class"] == "tumour" and [
        s["subject_id"] for s in subjects["per_subject"]
    ] == sorted(truth)
    for s in subjects["per_subject"]:
        masks = truth[s["subject_id"]]["masks"]
        g, scored = int((masks == 1).sum()), int((masks != 255).sum())
        assert s["slices"] == len(masks) and s["gt_voxels"] == g and s["gt_tumour"] == (g > 0)
        if case == "perfect":
            assert s["pred_voxels"] == g and (s["dice"] == 1.0 if g else s["dice"] is None)
        else:
            assert s["pred_voxels"] == scored and s["pred_tumour"]
            assert s["dice"] == (pytest.approx(2 * g / (g + scored)) if g else None)
    summary = subjects["summary"]
    with_tumour = sum(1 for v in truth.values() if (v["masks"] == 1).any())
    assert summary["subjects"] == len(truth) and summary["subjects_with_tumour"] == with_tumour
    detection = summary["detection"]
    assert detection["tp"] == with_tumour and detection["fn"] == 0
    if case == "perfect":
        assert summary["dice"]["mean"] == 1.0 and summary["dice"]["median"] == 1.0
        assert detection["fp"] == 0 and detection["tn"] == len(truth) - with_tumour
    else:
        assert detection["tn"] == 0 and detection["fp"] == len(truth) - with_tumour


def _noisy(k: int) -> MapFn:
    """Seed k's maps: the object at 0.5 plus noise of seed k, so that PxAP differs between seeds."""
    return lambda obj: np.clip(0.5 * obj + 0.7 * np.random.default_rng(k).random(obj.shape), 0, 1)


def test_seed_summary_and_paired_comparison(phantom: str, tmp_path: Path) -> None:
    seeds = [_hand_predictions(phantom, str(tmp_path / f"s{k}"), cam=_noisy(k)) for k in range(3)]
    poor = _hand_predictions(
        phantom, str(tmp_path / "poor"), cam=lambda obj: np.random.default_rng(9).random(obj.shape)
    )
    report = evaluate_runs(seeds, phantom, compare_to=[poor], n_boot=300, seed=0)
    assert report["predictions"] == seeds and len(report["runs"]) == 3
    singles = [evaluate_predictions(uri, phantom) for uri in seeds]
    assert report["runs"] == singles
    values = [r["localization"]["overall"]["pxap"] for r in singles]
    assert len(set(values)) == 3
    pxap_stats = report["seeds"]["localization.overall.pxap"]
    assert pxap_stats["n"] == 3 and pxap_stats["mean"] == pytest.approx(np.mean(values))
    assert pxap_stats["sd"] == pytest.approx(np.std(values, ddof=1))
    assert report["seeds"]["subjects.dice.mean"]["n"] == 3  # the per-subject summary is summarised too
    poor_pxap = evaluate_predictions(poor, phantom)["localization"]["overall"]["pxap"]
    assert [c["b"] for c in report["comparison"]] == [poor] * 3 and [
        c["a"] for c in report["comparison"]
    ] == seeds
    for comparison, value in zip(report["comparison"], values, strict=True):
        assert comparison["diff"] == pytest.approx(value - poor_pxap, abs=1e-9)
        assert comparison["low"] <= comparison["diff"] <= comparison["high"] and comparison["n_boot"] == 300
    # One run with --compare-to: its own report plus the comparison.
    one = evaluate_runs(seeds[:1], phantom, compare_to=[poor], n_boot=50)
    assert one["localization"] == singles[0]["localization"] and len(one["comparison"]) == 1


def test_seed_refusals_and_cli(phantom: str, cohort_b: str, tmp_path: Path) -> None:
    seeds = [_hand_predictions(phantom, str(tmp_path / f"s{k}"), cam=_noisy(k)) for k in range(2)]
    other_model = _hand_predictions(phantom, str(tmp_path / "other"), model="cam")
    other_data = _hand_predictions(cohort_b, str(tmp_path / "b"))
    for uris, message in (
        ([*seeds, other_model], "their model differ"),
        ([seeds[0], other_data], "their data differ"),
        ([seeds[0], seeds[0]], "listed twice"),
    ):
        with pytest.raises(PredictionsError, match=message):
            evaluate_runs(uris, phantom)
    with pytest.raises(PredictionsError, match="--compare-to takes 1 or 2"):
        evaluate_runs(seeds, phantom, compare_to=[other_model] * 3)
    failed = CliRunner().invoke(
        app, ["evaluate", "--predictions", f"{seeds[0]},{other_model}", "--data", phantom]
    )
    lines = failed.stderr.strip().splitlines()
    assert failed.exit_code == 2 and len(lines) == 1 and "seeds of one model" in lines[0]
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--predictions", ",".join(seeds), "--data", phantom, "--compare-to", other_model,
         "--n-boot", "100", "--output", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seeds"]["localization.overall.pxap"]["n"] == 2 and len(report["comparison"]) == 2
    csv_lines = (tmp_path / "m.subjects.csv").read_text().splitlines()
    assert csv_lines[0].startswith("predictions,subject_id") and csv_lines[1].startswith(seeds[0])
    assert json.loads(out.read_text()) == report
