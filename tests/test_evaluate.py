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

from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.evaluate import evaluate_predictions
from acol_core.export import export_model
from acol_core.jobs.localize_job import localize_plain
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
        model="hand",
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
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--predictions", str(tmp_path / "empty"), "--data", phantom], SUCCESS_NAME),
        (["--predictions", pred, "--data", str(tmp_path / "empty")], "_manifest.json"),
    ):
        failed = CliRunner().invoke(app, ["evaluate", *args])
        assert failed.exit_code == 2
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("acol evaluate: error:") and message in lines[0]
