"""The medical workflow end to end through the real CLI: train on cohort A, test on every subject of cohort
B with thresholds chosen on A's fullsup val rows; per-subject (3-D) metrics and the skull share computed
from B's brain masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from ray_local import with_timeout
from typer.testing import CliRunner
from volumes import head_model, subject

from acol_core.cli import app
from acol_core.export import read_export_info
from acol_core.storage import read_bytes

pytestmark = pytest.mark.integration


def _cli(*args: str) -> dict[str, Any]:
    result = with_timeout(lambda: CliRunner().invoke(app, list(args)), 300)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_train_on_one_cohort_evaluate_another(tmp_path: Path, local_ray: None) -> None:
    brain = head_model()["brain"]
    # Two modalities: models take the dataset's channel count unless a config sets in_channels.
    for i in range(8):
        subject(tmp_path / "site_a", f"a{i}", brain, seed=i, flair=True)
    for i in range(3):
        subject(tmp_path / "site_b", f"b{i}", brain, seed=100 + i, flair=True)
    data_a, data_b = str(tmp_path / "data_a"), str(tmp_path / "data_b")
    nifti = ("--source", "nifti", "-o", "min_tumour_pixels=3", "-o", "modalities=[t1c,flair]")
    _cli(
        "prepare",
        *nifti,
        "--input",
        str(tmp_path / "site_a"),
        "--output",
        data_a,
        "--split-fractions",
        "0.6,0.2,0.2",
    )
    summary = _cli(
        "prepare", *nifti, "--input", str(tmp_path / "site_b"), "--output", data_b, "--split", "test"
    )
    assert {k for k, v in summary["split_counts"].items() if v} == {"test"}

    config = tmp_path / "train.yaml"
    config.write_text("image_size: 32\nbatch_size: 8\naugment: false\nnum_threads: 1\n")
    trained = _cli(
        "train", "--data", data_a, "--model", "cam", "--epochs", "1", "--storage", str(tmp_path / "runs"),
        "--config", str(config),
    )  # fmt: skip
    model = trained["model"]
    assert read_export_info(read_bytes(model)).config.in_channels == 2
    pred_a, pred_b = str(tmp_path / "pred_a"), str(tmp_path / "pred_b")
    _cli("localize", "--model", model, "--data", data_a, "--output", pred_a, "--split", "val")
    _cli("localize", "--model", model, "--data", data_b, "--output", pred_b, "--split", "test")

    # Without --val-data, val predictions of cohort A cannot be joined to cohort B: one clear line.
    refused = CliRunner().invoke(
        app, ["evaluate", "--predictions", pred_b, "--data", data_b, "--val-predictions", pred_a]
    )
    assert refused.exit_code == 2 and "--val-data" in refused.output

    output, table = tmp_path / "eval_b.json", tmp_path / "eval_b.subjects.csv"
    report = _cli(
        "evaluate", "--predictions", pred_b, "--data", data_b, "--val-predictions", pred_a,
        "--val-data", data_a, "--output", str(output),
    )  # fmt: skip
    thresholds = report["thresholds"]
    assert thresholds["fullsup_val_rows"] > 0 and thresholds["external"] is True
    assert thresholds["val_data"] == data_a
    assert json.loads(output.read_text()) == report
    # Per-subject (3-D) metrics over cohort B's three heads, and the CSV beside the JSON.
    subjects = report["subjects"]
    assert subjects["summary"]["subjects"] == 3
    assert {"mean", "sd", "median"} <= set(subjects["summary"]["dice"])
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["subject_id"] for r in rows) == ["b0", "b1", "b2"]
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    # The skull/scalp share comes from B's brain masks (anatomy = head − brain), on every tumour slice.
    overall = report["localization"]["overall"]
    assert overall["off_target_rows"] == overall["pixel_rows"] > 0
    assert 0.0 < overall["off_target_share"] < 1.0
