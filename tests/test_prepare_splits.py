"""`acol prepare` split policies through the real CLI: an external cohort (`--split test`), custom
fractions (`--split-fractions`), their validation, and the fullsup count that scales with the val split.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from acol_core.cli import app
from acol_core.data.shards import open_dataset
from acol_core.data.splits import FULLSUP_FLOOR, FULLSUP_FRACTION, fullsup_count, parse_fractions

PHANTOM = ["-o", "num_subjects=8", "-o", "slices_per_subject=2", "-o", "size=32"]


def _prepare(*args: str) -> dict:
    result = CliRunner().invoke(app, ["prepare", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _subjects_by_split(uri: str) -> dict[str, set[str]]:
    table = open_dataset(uri).read_table(columns=["subject_id", "split"]).to_pylist()
    out: dict[str, set[str]] = {}
    for row in table:
        out.setdefault(row["split"], set()).add(row["subject_id"])
    return out


def test_split_test_puts_every_phantom_subject_in_test(tmp_path: Path) -> None:
    out = str(tmp_path / "external")
    summary = _prepare("--output", out, "--split", "test", *PHANTOM)
    assert summary["split_counts"] == {"train": 0, "val": 0, "test": 16}
    dataset = open_dataset(out)
    assert set(_subjects_by_split(out)) == {"test"} and len(_subjects_by_split(out)["test"]) == 8
    assert dataset.manifest.preparation["split_policy"] == {"mode": "single", "split": "test"}
    assert dataset.manifest.counts["fullsup"] == 0  # no val rows to mark


def test_split_fractions_set_the_subject_shares(tmp_path: Path) -> None:
    out = str(tmp_path / "custom")
    summary = _prepare("--output", out, "--split-fractions", "0.5,0.25,0.25", *PHANTOM)
    subjects = _subjects_by_split(out)
    assert {k: len(v) for k, v in subjects.items()} == {"train": 4, "val": 2, "test": 2}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["val"] & subjects["test"])
    assert summary["split_counts"] == {"train": 8, "val": 4, "test": 4}
    policy = open_dataset(out).manifest.preparation["split_policy"]
    assert policy == {"mode": "fractions", "fractions": [0.5, 0.25, 0.25], "seed": 0}


def test_default_split_is_70_15_15_and_recorded(tmp_path: Path) -> None:
    out = str(tmp_path / "default")
    _prepare("--output", out, "-o", "num_subjects=20", "-o", "slices_per_subject=1", "-o", "size=32")
    subjects = _subjects_by_split(out)
    assert {k: len(v) for k, v in subjects.items()} == {"train": 14, "val": 3, "test": 3}
    assert open_dataset(out).manifest.preparation["split_policy"]["fractions"] == [0.7, 0.15, 0.15]


def _nifti_cohort(root: Path, subjects: int) -> None:
    vol = np.zeros((12, 10, 6), np.float32)
    vol[2:10, 1:9, 1:5] = np.linspace(100, 300, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    for i in range(subjects):
        folder = root / f"sub-{i}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(vol + i, np.eye(4)), folder / f"sub-{i}-t1c.nii.gz")


def test_split_test_on_a_nifti_cohort(tmp_path: Path) -> None:
    _nifti_cohort(tmp_path / "site-b", 3)
    out = str(tmp_path / "site-b-data")
    summary = _prepare(
        "--source", "nifti", "--input", str(tmp_path / "site-b"), "--output", out, "--split", "test"
    )
    assert summary["accepted"] == 3 and summary["split_counts"] == {"train": 0, "val": 0, "test": 12}
    assert _subjects_by_split(out) == {"test": {"sub-0", "sub-1", "sub-2"}}
    assert open_dataset(out).manifest.preparation["split_policy"]["split"] == "test"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "test", "--split-fractions", "0.8,0.1,0.1"], "mutually exclusive"),
        (["--split", "holdout"], "split must be one of train, val, test, got 'holdout'"),
        (["--split-fractions", "0.5,0.5"], "three non-negative numbers summing to 1"),
        (["--split-fractions", "0.5,0.6,0.1"], "three non-negative numbers summing to 1"),
        (["--split-fractions", "-0.1,0.6,0.5"], "three non-negative numbers summing to 1"),
        (["--split-fractions", "a,b,c"], "three comma-separated numbers, got 'a,b,c'"),
        (["--split-fractions", "nan,0.5,0.5"], "three non-negative numbers summing to 1"),
        (["--fullsup-per-class", "-1"], "fullsup per class must be >= 0"),
    ],
)
def test_bad_split_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prepare", "--output", str(out), *args, *PHANTOM])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acol prepare: error: ") and message in lines[0], lines
    assert result.stdout == "" and not out.exists()


def test_parse_fractions() -> None:
    assert parse_fractions(" 0.8, 0.1 ,0.1") == (0.8, 0.1, 0.1)
    assert parse_fractions("0,0,1") == (0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- fullsup count


@pytest.mark.parametrize(
    ("candidates", "per_class", "expected"),
    [
        (0, None, 0),
        (4, None, 4),  # fewer than the floor: all of them
        (10, None, FULLSUP_FLOOR),
        (100, None, 10),  # 0.1 × 100 = the floor
        (101, None, 11),  # ceil(10.1)
        (250, None, 25),
        (250, 3, 3),  # an explicit count wins
        (2, 5, 2),
        (50, 0, 0),
    ],
)
def test_fullsup_count(candidates: int, per_class: int | None, expected: int) -> None:
    assert (FULLSUP_FLOOR, FULLSUP_FRACTION) == (10, 0.1)
    assert fullsup_count(candidates, per_class) == expected


def _candidates_and_fullsup(uri: str) -> tuple[Counter, Counter]:
    rows = open_dataset(uri).read_table(columns=["split", "label", "mask", "boxes", "fullsup"]).to_pylist()
    candidates: Counter = Counter()
    chosen: Counter = Counter()
    for r in rows:
        if r["split"] == "val" and r["label"] >= 0 and (r["mask"] is not None or r["boxes"] is not None):
            candidates[r["label"]] += 1
        if r["fullsup"]:
            assert r["split"] == "val"
            chosen[r["label"]] += 1
    return candidates, chosen


def test_fullsup_default_scales_with_the_val_split(tmp_path: Path) -> None:
    # 30 subjects × 12 slices, 80 % of the subjects in val: ~290 val rows, well over 100 per class.
    big = ["-o", "num_subjects=30", "-o", "slices_per_subject=12", "-o", "size=32"]
    out = str(tmp_path / "scaled")
    _prepare("--output", out, "--split-fractions", "0.1,0.8,0.1", *big)
    candidates, chosen = _candidates_and_fullsup(out)
    assert min(candidates.values()) > 100, candidates  # so the fraction, not the floor, decides
    assert chosen == {c: math.ceil(0.1 * n) for c, n in candidates.items()}
    manifest = open_dataset(out).manifest
    assert manifest.preparation["fullsup_policy"] == {"mode": "scaled", "floor": 10, "fraction": 0.1}
    assert manifest.preparation["fullsup_per_class"] is None

    fixed = str(tmp_path / "fixed")
    _prepare("--output", fixed, "--split-fractions", "0.1,0.8,0.1", "--fullsup-per-class", "3", *big)
    assert _candidates_and_fullsup(fixed)[1] == {c: 3 for c in candidates}
    assert open_dataset(fixed).manifest.preparation["fullsup_policy"] == {"mode": "fixed", "per_class": 3}
