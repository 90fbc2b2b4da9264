"""Anatomy masks from real-data sources: NIfTI brain masks (anatomy = derived head − brain) and an
imagefolder anatomy-mask folder, through the real `acol prepare`; bad masks are recorded rejects or one
error line; evaluation measures the off-target share only where anatomy exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner
from volumes import AFFINE, SHAPE, head_model, save_volume, subject, t1_volume

from acol_core.cli import app
from acol_core.data.codec import decode_png
from acol_core.data.shards import open_dataset
from acol_core.data.sources import get_source
from acol_core.data.sources.nifti import head_mask, otsu_threshold, to_display
from acol_core.evaluate import evaluate_predictions
from acol_core.metrics import off_target_share
from acol_core.predictions import PREDICTION_SCHEMA, encode_cam, encode_mask, write_predictions


def _canonical_display(volume: np.ndarray) -> dict[int, np.ndarray]:
    """Expected slice images of a volume given on AFFINE's grid, by canonical slice index."""
    canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.uint8), AFFINE)).dataobj)
    return {z: to_display(canonical[:, :, z]) for z in range(canonical.shape[2])}


def _prepare(*args: str) -> dict:
    result = CliRunner().invoke(app, ["prepare", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_otsu_and_head_mask_recover_the_head() -> None:
    model = head_model()
    vol = t1_volume(model, 0)
    assert 12 < otsu_threshold(vol) < 60  # above the skull: the shell is recovered by the hole filling
    np.testing.assert_array_equal(head_mask([vol]), model["head"])  # dark skull shell filled back in
    assert otsu_threshold(np.full((4, 4, 4), 7.0)) == 7.0 and not head_mask([np.full((4, 4, 4), 7.0)]).any()


def test_nifti_anatomy_is_head_minus_brain_through_the_cli(tmp_path: Path) -> None:
    brain = head_model()["brain"]
    for i in range(3):
        subject(tmp_path / "in", f"s{i}", brain, seed=i)
    out = str(tmp_path / "data")
    summary = _prepare(
        "--source", "nifti", "--input", str(tmp_path / "in"), "--output", out, "-o", "min_tumour_pixels=3"
    )
    assert summary["accepted"] == 3 and summary["rejected"] == 0
    rows = open_dataset(out).read_table().to_pylist()
    assert rows and all(r["anatomy_mask"] is not None for r in rows)
    model = head_model()
    expected = _canonical_display(model["head"] & ~model["brain"])
    middle = [r for r in rows if r["subject_id"] == "s1" and r["slice_index"] == 4][0]
    anatomy = decode_png(middle["anatomy_mask"])
    assert anatomy.dtype == np.uint8 and set(np.unique(anatomy)) == {0, 1}
    np.testing.assert_array_equal(anatomy, expected[4].astype(np.uint8))
    for r in rows:  # every slice, and the tumour (inside the brain) never counts as anatomy
        anatomy = decode_png(r["anatomy_mask"])
        np.testing.assert_array_equal(anatomy, expected[r["slice_index"]].astype(np.uint8))
        assert not (anatomy & (decode_png(r["mask"]) == 1)).any()
    assert open_dataset(out).manifest.source["brain_mask"] == "brainmask"


def _predictions(data: str, out: str, cam_of) -> str:
    """Hand-made predictions: each row's map is ``cam_of(row)``."""
    rows = []
    for r in open_dataset(data).read_table("test").to_pylist():
        obj = (decode_png(r["mask"]) == 1).astype(np.uint8)
        rows.append(
            {
                "image_id": r["image_id"], "pred_label": r["label"], "scores": [0.5, 0.5],
                "cam": encode_cam(cam_of(r)), "mask": encode_mask(obj), "boxes": [], "cam_gt": None,
                "model": "hand", "checkpoint": "-", "subject_id": r["subject_id"],
                "slice_index": r["slice_index"], "height": r["height"], "width": r["width"],
            }
        )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    write_predictions([table], out, model="hand", checkpoint="-", data=data, splits=["test"], threshold=0.5,
                      class_names=["healthy", "tumour"])  # fmt: skip
    return out


def _half_on_anatomy(row: dict) -> np.ndarray:
    """Object pixels at 1.0, anatomy pixels (where present) at 0.5."""
    cam = (decode_png(row["mask"]) == 1).astype(np.float64)
    if row["anatomy_mask"] is not None:
        cam = np.maximum(cam, 0.5 * decode_png(row["anatomy_mask"]))
    return cam


def test_off_target_share_from_brain_masks_and_left_out_without(tmp_path: Path) -> None:
    brain = head_model()["brain"]
    subject(tmp_path / "with", "a", brain)
    subject(tmp_path / "with", "b", brain, seed=1)
    subject(tmp_path / "without", "c")
    subject(tmp_path / "without", "d", seed=1)
    for cohort in ("with", "without"):
        _prepare("--source", "nifti", "--input", str(tmp_path / cohort), "--output", str(tmp_path / f"data-{cohort}"),
                 "--split", "test", "-o", "min_tumour_pixels=3")  # fmt: skip

    data = str(tmp_path / "data-with")
    report = evaluate_predictions(
        _predictions(data, str(tmp_path / "p-with"), _half_on_anatomy), data, split="test"
    )
    overall = report["localization"]["overall"]
    rows = [
        r for r in open_dataset(data).read_table("test").to_pylist() if (decode_png(r["mask"]) == 1).any()
    ]
    expected = off_target_share(
        [_half_on_anatomy(r) for r in rows], [decode_png(r["anatomy_mask"]) for r in rows]
    )
    assert overall["off_target_rows"] == len(rows) > 0
    assert overall["off_target_share"] == pytest.approx(expected, abs=0.01) and expected > 0.5

    data = str(tmp_path / "data-without")
    assert all(r["anatomy_mask"] is None for r in open_dataset(data).read_table().to_pylist())
    report = evaluate_predictions(
        _predictions(data, str(tmp_path / "p-without"), _half_on_anatomy), data, split="test"
    )
    overall = report["localization"]["overall"]
    assert "off_target_share" not in overall and "off_target_rows" not in overall  # not available, not 0
    assert overall["pxap"] is not None


def test_bad_brain_masks_are_recorded_rejects(tmp_path: Path) -> None:
    brain = head_model()["brain"]
    root = tmp_path / "in"
    subject(root, "good", brain)
    subject(root, "shape", brain[:, :, :6])
    subject(root, "flipped", brain, brain_affine=np.diag([2.0, 2.0, 3.0, 1.0]))  # another orientation
    subject(root, "empty", np.zeros(SHAPE, bool))
    save_volume(root / "negative" / "negative_t1c.nii.gz", t1_volume(head_model(), 0))
    save_volume(root / "negative" / "negative_brainmask.nii.gz", -brain.astype(np.float32))
    out = tmp_path / "data"
    summary = _prepare("--source", "nifti", "--input", str(root), "--output", str(out))
    reasons = {r["source"]: r["reason"] for r in pq.read_table(out / "_rejects.parquet").to_pylist()}
    assert sorted(reasons) == ["empty", "flipped", "negative", "shape"]
    assert reasons["shape"].startswith("shape mismatch: brain mask shape_brainmask.nii.gz (32, 32, 6)")
    assert (
        reasons["flipped"]
        == "affine mismatch: brain mask flipped_brainmask.nii.gz (RAS) vs flipped_t1c.nii.gz (LAI)"
    )
    assert reasons["empty"] == "brain mask empty_brainmask.nii.gz is empty (no brain voxel)"
    assert reasons["negative"] == "brain mask negative_brainmask.nii.gz has negative values"
    manifest = open_dataset(str(out)).manifest
    assert (summary["accepted"], summary["rejected"]) == (1, 4)
    assert manifest.accepted + manifest.rejected == manifest.inputs == 5


def test_brain_mask_option_sets_the_suffix_or_turns_it_off(tmp_path: Path) -> None:
    brain = head_model()["brain"]
    save_volume(tmp_path / "s" / "s_t1c.nii.gz", t1_volume(head_model(), 0))
    save_volume(tmp_path / "s" / "s_mask-brain.nii.gz", brain.astype(np.uint8))
    records = list(get_source("nifti", root=str(tmp_path), brain_mask="mask-brain").iter_items())
    assert records and all(r.anatomy_mask is not None for r in records)
    off = list(get_source("nifti", root=str(tmp_path), brain_mask="none").iter_items())
    assert off and all(r.anatomy_mask is None for r in off)
    assert all(r.anatomy_mask is None for r in get_source("nifti", root=str(tmp_path)).iter_items())


# --------------------------------------------------------------------------- imagefolder


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, "PNG")


def test_imagefolder_anatomy_masks_by_stem(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ring = np.zeros((16, 20), np.uint8)
    ring[1:15, 1:19] = 255
    ring[3:13, 3:17] = 0
    for name in ("a", "b", "missing", "small"):
        _png(tmp_path / "images" / "cat" / f"{name}.png", rng.integers(0, 255, (16, 20), dtype=np.uint8))
    _png(tmp_path / "anatomy" / "cat" / "a.png", ring)
    _png(tmp_path / "anatomy" / "cat" / "b.png", (ring > 0).astype(np.uint8))  # 0/1 works as well
    _png(tmp_path / "anatomy" / "cat" / "small.png", ring[:8])
    out = tmp_path / "data"
    summary = _prepare("--source", "imagefolder", "--input", str(tmp_path / "images"), "--output", str(out),
                       "-o", f"anatomy_masks={tmp_path / 'anatomy'}")  # fmt: skip
    assert (summary["accepted"], summary["rejected"]) == (2, 2)
    rows = {r["image_id"]: r for r in open_dataset(str(out)).read_table().to_pylist()}
    for name in ("cat/a.png", "cat/b.png"):
        np.testing.assert_array_equal(decode_png(rows[name]["anatomy_mask"]), (ring > 0).astype(np.uint8))
    reasons = {r["source"]: r["reason"] for r in pq.read_table(out / "_rejects.parquet").to_pylist()}
    assert reasons["cat/missing.png"] == f"no anatomy mask for cat/missing.png in {tmp_path / 'anatomy'}"
    assert reasons["cat/small.png"] == "anatomy mask shape (8, 20) does not match image shape (16, 20)"


def test_imagefolder_missing_anatomy_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "cat" / "a.png", np.zeros((8, 8), np.uint8))
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["prepare", "--source", "imagefolder", "--input", str(tmp_path / "images"),
                                      "--output", str(out), "-o", f"anatomy_masks={tmp_path / 'nowhere'}"])  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"acol prepare: error: anatomy masks folder {tmp_path / 'nowhere'} does not exist"], (
        lines
    )
    assert not out.exists()
