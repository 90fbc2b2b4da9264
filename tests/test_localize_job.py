"""Batch localization: the per-batch function, the Ray Data job (1 and 2 actors, rerun, S3, CLI), the
atomic commit, the reader's refusal of uncommitted folders, and NIfTI re-stacking on the source grid.

A tiny ACoL model is trained in-process once for the module; one local Ray (2 CPUs) serves the module,
started after the S3 fixture so that its workers inherit the AWS_* environment. Ray steps run under a
timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa
import pytest
from ray_local import command_lines, with_timeout
from typer.testing import CliRunner

from acol_core import storage
from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.codec import decode_png, encode_png
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.sources.nifti import load_nifti_bytes, to_display
from acol_core.data.transforms import table_to_arrays
from acol_core.export import export_model, load_exported
from acol_core.localize import predicted_boxes
from acol_core.predictions import (
    PREDICTION_SCHEMA,
    SUCCESS_NAME,
    PredictionsError,
    commit_predictions,
    decode_cam,
    decode_mask,
    encode_mask,
    predictions_to_nifti,
    read_predictions,
    read_success,
    staging_uri,
    volume_plan,
    write_predictions,
)
from acol_core.train import fit, iterate_minibatches, select_device

ray = pytest.importorskip("ray")

from acol_core.batch_localize import INPUT_COLUMNS, Localizer, localize_plain, localize_rows, parse_splits  # noqa: E402
from acol_core.jobs.localize_job import LocalizeOptions, run_localize  # noqa: E402

RUN_TIMEOUT_S = 120.0
# 32 rows in 4 shards: test 8 rows (3 tumour), val 8 (fullsup), train 16.
PHANTOM = {
    "num_subjects": 8,
    "slices_per_subject": 4,
    "size": 40,  # the model runs at 32: maps must come back at 40
    "rows_per_shard": 8,
    "seed": 0,
    "split_fractions": (0.5, 0.25, 0.25),
}


def train_tiny_model(data_uri: str, model_uri: str) -> str:
    """One epoch of ACoL on the train rows, exported (seconds on a CPU)."""
    config = TrainConfig(model="acol", image_size=32, epochs=1, batch_size=8, augment=False)
    dataset = open_dataset(data_uri)
    arrays = table_to_arrays(dataset.read_table("train"), 1, 32, with_masks=False)
    result = fit(config, lambda epoch: iterate_minibatches(arrays, 8, np.random.default_rng(epoch), False))
    return export_model(result.model, config, dataset.class_names, model_uri)


def _with_timeout(fn: Callable[[], Any], seconds: float = RUN_TIMEOUT_S) -> Any:
    return with_timeout(fn, seconds)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("phantom") / "data")
    prepare_dataset("phantom", uri, **PHANTOM)
    return uri


@pytest.fixture(scope="module")
def model_uri(phantom: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tiny_model(phantom, str(tmp_path_factory.mktemp("model") / "model.safetensors"))


def _test_rows(data_uri: str, split: str = "test") -> list[dict]:
    return (
        open_dataset(data_uri).read_table(split, columns=["image_id", "height", "width", "label"]).to_pylist()
    )


def _check_predictions(out: str, data_uri: str, split: str = "test") -> pa.Table:
    """Every row of the split exactly once, the schema, PNG sizes = image sizes, masks = thresholded maps."""
    table = read_predictions(out)
    assert table.schema.equals(PREDICTION_SCHEMA)
    rows = {r["image_id"]: r for r in _test_rows(data_uri, split)}
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(rows) and len(set(ids)) == len(ids)
    info = read_success(out)
    for p in table.to_pylist():
        size = (rows[p["image_id"]]["height"], rows[p["image_id"]]["width"])
        cam, mask = decode_png(p["cam"]), decode_png(p["mask"])
        assert cam.dtype == np.uint8 and cam.shape == size and mask.shape == size
        np.testing.assert_array_equal(mask, (cam / 255.0 >= info.threshold).astype(np.uint8))
        assert p["boxes"] == predicted_boxes(cam / 255.0, info.threshold)
        assert abs(sum(p["scores"]) - 1.0) < 1e-5 and p["pred_label"] == int(np.argmax(p["scores"]))
        assert p["model"] == "acol" and p["checkpoint"] == info.checkpoint
    return table


# --------------------------------------------------------------------------- without Ray


def test_parse_splits() -> None:
    assert parse_splits("test") == ["test"]
    assert parse_splits("test,val") == ["val", "test"]
    assert parse_splits("all") == ["train", "val", "test"]
    with pytest.raises(ValueError, match="split"):
        parse_splits("tset")


def test_localize_rows_at_each_images_own_size(model_uri: str) -> None:
    """Non-square images of other sizes than the model's input: maps come back at each image's size."""
    model, info = load_exported(model_uri)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=s, dtype=np.uint8) for s in ((24, 40), (50, 30), (32, 32))]
    rows = {
        "image_id": ["a", "b", "c"],
        "image": [encode_png(im) for im in images],
        "label": [-1, 0, 1],
        "subject_id": ["s", "s", "t"],
        "slice_index": [0, 1, 0],
    }
    table = localize_rows(model, info, rows, 0.4, ("acol", "sha"), select_device("cpu"), gt_maps=True)
    assert table.schema.equals(PREDICTION_SCHEMA) and table.num_rows == 3
    for p, image in zip(table.to_pylist(), images, strict=True):
        cam = decode_png(p["cam"])
        assert cam.shape == image.shape and (p["height"], p["width"]) == image.shape
        np.testing.assert_array_equal(decode_png(p["mask"]), (cam / 255.0 >= 0.4).astype(np.uint8))
        # A normalised map spans [0, 1] unless it is constant (then all 0).
        assert cam.max() in (0, 255) and cam.min() == 0
    labels = rows["label"]
    for p, label in zip(table.to_pylist(), labels, strict=True):
        # cam_gt only where a label exists and differs from the prediction.
        assert (p["cam_gt"] is not None) == (label >= 0 and label != p["pred_label"])
        if p["cam_gt"] is not None:
            assert decode_png(p["cam_gt"]).shape == decode_png(p["cam"]).shape
    empty = localize_rows(model, info, {k: [] for k in rows}, 0.4, ("acol", "sha"), select_device("cpu"))
    assert empty.num_rows == 0 and empty.schema.equals(PREDICTION_SCHEMA)


def test_localizer_threshold_from_export_and_checksum(phantom: str, model_uri: str, tmp_path: Path) -> None:
    model, info = load_exported(model_uri)
    path = str(tmp_path / "m.safetensors")
    export_model(model, info.config, info.class_names, path, threshold=0.3)
    assert Localizer(path).threshold == 0.3
    assert Localizer(path, threshold=0.7).threshold == 0.7
    assert Localizer(model_uri).threshold == 0.5
    with pytest.raises(RuntimeError, match="changed"):
        Localizer(path, expected_sha256="0" * 64)


def test_commit_refuses_wrong_counts_and_keeps_the_old_output(
    phantom: str, model_uri: str, tmp_path: Path
) -> None:
    table = localize_plain(model_uri, phantom, "test", batch_size=3)
    out = str(tmp_path / "pred")
    meta = {
        "model": "acol",
        "checkpoint": "x",
        "data": phantom,
        "splits": ["test"],
        "threshold": 0.5,
        "class_names": ["healthy", "tumour"],
    }
    write_predictions([table.slice(0, 5), table.slice(5)], out, expected_rows=8, **meta)
    assert read_success(out).num_rows == 8 and len(read_success(out).files) == 2
    staging = staging_uri(out)
    write_bytes_table(table.slice(0, 4), storage.join(staging, "x.parquet"))
    with pytest.raises(PredictionsError, match="4 predictions for 8 rows"):
        commit_predictions(staging, out, expected_rows=8, **meta)
    assert not storage.exists(staging)
    assert read_predictions(out).num_rows == 8  # the old output is untouched
    # Duplicated rows are refused too.
    with pytest.raises(PredictionsError, match="duplicate"):
        write_predictions([table, table.slice(0, 1)], out, **meta)
    assert sorted(storage.list_dir(out)) == ["_SUCCESS.json", "pred-00000.parquet", "pred-00001.parquet"]


def write_bytes_table(table: pa.Table, uri: str) -> None:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def test_reader_refuses_a_folder_without_success(phantom: str, model_uri: str, tmp_path: Path) -> None:
    out = str(tmp_path / "pred")
    write_predictions(
        [localize_plain(model_uri, phantom, "test")],
        out,
        model="acol",
        checkpoint="x",
        data=phantom,
        splits=["test"],
        threshold=0.5,
        class_names=["healthy", "tumour"],
    )
    assert read_predictions(out).num_rows == 8
    (tmp_path / "pred" / SUCCESS_NAME).unlink()
    with pytest.raises(PredictionsError, match="_SUCCESS.json"):
        read_predictions(out)
    # An output that holds a dataset is refused before anything is written.
    with pytest.raises(PredictionsError, match="dataset"):
        write_predictions(
            [],
            phantom,
            model="acol",
            checkpoint="x",
            data="elsewhere",
            splits=["test"],
            threshold=0.5,
            class_names=[],
        )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "not found"),
        ("no_manifest", "_manifest.json"),
        ("bad_split", "split"),
        ("bad_threads", "threads_per_actor"),
    ],
)
def test_cli_errors_are_one_line(
    case: str, message: str, phantom: str, model_uri: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    args = {"--model": model_uri, "--data": phantom, "--output": str(tmp_path / "out")}
    if case == "missing_model":
        args["--model"] = str(tmp_path / "nope.safetensors")
    elif case == "no_manifest":
        args["--data"] = str(tmp_path / "empty")
    elif case == "bad_threads":
        args["--threads-per-actor"] = "0"
    else:
        args["--split"] = "tset"
    result = CliRunner().invoke(app, ["localize", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2, result.output
    lines = command_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("acol localize: error:") and message in lines[0]
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()


def test_gate_anatomy_zeroes_the_maps_on_skull_and_scalp(phantom: str, model_uri: str) -> None:
    """``gate="anatomy"``: both stored maps are 0 on each row's anatomy mask; rows without one keep theirs."""
    plain = {r["image_id"]: r for r in localize_plain(model_uri, phantom, "test").to_pylist()}
    gated = localize_plain(model_uri, phantom, "test", gate="anatomy").to_pylist()
    rows = open_dataset(phantom).read_table("test", columns=["image_id", "anatomy_mask"]).to_pylist()
    anatomy = {r["image_id"]: decode_png(r["anatomy_mask"]) for r in rows}
    assert len(gated) == len(plain) and all(m.any() for m in anatomy.values())
    for p in gated:
        skull = anatomy[p["image_id"]] == 1
        for column in ("cam", "cam_gt"):
            if p[column] is not None:
                cam, before = decode_png(p[column]), decode_png(plain[p["image_id"]][column])
                # Zeroed on the anatomy, the rest as it was (not stretched back to [0, 255]).
                assert (cam[skull] == 0).all() and np.array_equal(cam[~skull], before[~skull])
        assert p["pred_label"] == plain[p["image_id"]]["pred_label"]
    assert any(decode_png(plain[i]["cam"])[anatomy[i] == 1].any() for i in anatomy)  # gating changed them
    # Without the column (or with nulls) the maps are the ungated ones.
    model, info = load_exported(model_uri)
    table = open_dataset(phantom).read_table("test", columns=INPUT_COLUMNS)
    batch = {**table.to_pydict(), "anatomy_mask": [None] * table.num_rows}
    ungated = localize_rows(model, info, batch, 0.5, ("acol", "x"), select_device("cpu"), gate="anatomy")
    assert ungated.column("cam").to_pylist() == [
        plain[i]["cam"] for i in table.column("image_id").to_pylist()
    ]


def test_cli_bad_gate_is_one_line(phantom: str, model_uri: str, tmp_path: Path) -> None:
    args = [
        "localize",
        "--model",
        model_uri,
        "--data",
        phantom,
        "--output",
        str(tmp_path / "o"),
        "--gate",
        "brain",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = command_lines(result.stderr)
    assert lines == ["acol localize: error: gate must be one of none, anatomy, got 'brain'"]


# --------------------------------------------------------------------------- Ray Data


def test_ray_one_then_two_actors_rerun_replaces(
    local_ray: None, phantom: str, model_uri: str, tmp_path: Path
) -> None:
    out = str(tmp_path / "pred")
    seen: list[tuple[int, int]] = []
    first = _with_timeout(
        lambda: run_localize(
            LocalizeOptions(
                model_uri, phantom, out, actors=1, batch_size=3, progress=lambda d, t: seen.append((d, t))
            )
        )
    )
    assert first.info.num_rows == 8 and seen[-1] == (8, 8)
    # On CPU the one actor's torch takes the node's 2 CPUs, not its 0.5-CPU scheduling share.
    assert json.loads((tmp_path / "pred" / SUCCESS_NAME).read_text())["extra"]["threads_per_actor"] == 2
    one = _check_predictions(out, phantom)
    # Leftovers a crashed run could leave: an old prediction file and a staging folder.
    shutil.copy(tmp_path / "pred" / "pred-00000.parquet", tmp_path / "pred" / "pred-00042.parquet")
    (tmp_path / "pred" / "_tmp-crashed").mkdir()
    (tmp_path / "pred" / "_tmp-crashed" / "x.parquet").write_bytes(b"junk")
    second = _with_timeout(
        lambda: run_localize(LocalizeOptions(model_uri, phantom, out, actors=2, batch_size=2))
    )
    two = _check_predictions(out, phantom)
    names = sorted(storage.list_dir(out))
    assert names == sorted([SUCCESS_NAME] + [f["name"] for f in second.info.files])
    success = json.loads((tmp_path / "pred" / SUCCESS_NAME).read_text())
    assert success["num_rows"] == 8 and success["splits"] == ["test"] and success["data"] == phantom
    assert success["extra"]["actors"] == 2 and success["checkpoint"] == first.info.checkpoint
    assert success["extra"]["threads_per_actor"] == 1
    # Same model, same rows: the same predictions whatever the pool size and batching.
    by_id = {r["image_id"]: r for r in one.to_pylist()}
    plain = {r["image_id"]: r for r in localize_plain(model_uri, phantom, "test", batch_size=8).to_pylist()}
    for r in two.to_pylist():
        for other in (by_id[r["image_id"]], plain[r["image_id"]]):
            assert r["pred_label"] == other["pred_label"]
            assert np.abs(decode_cam(r["cam"]) - decode_cam(other["cam"])).max() <= 1.5 / 255


# --------------------------------------------------------------------------- NIfTI

# Voxel axis i runs posterior (-y), j right (+x), k superior (+z): not RAS, so restacking must permute
# and flip back. Canonical shape is (J, I, K); slices are 28 rows × 36 columns.
AFFINE = np.array([[0.0, 1.5, 0.0, -10.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]])
SHAPE = (28, 36, 5)


def _nifti_input(root: Path) -> np.ndarray:
    rng = np.random.default_rng(1)
    volume = (rng.random(SHAPE) * 100 + 50).astype(np.float32)
    volume[:, :, 0] = 0  # an empty slice: skipped by the source, so never predicted
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:15, 10:22, 1:4] = 1
    seg[20:24, 3:6, 2] = 1
    volume[seg > 0] += 80
    folder = root / "sub-01"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, AFFINE), folder / "sub-01-t1c.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), folder / "sub-01-seg.nii.gz")
    return seg


NIFTI_OPTIONS = {"split_fractions": (0, 0, 1), "min_tumour_pixels": 1}


@pytest.fixture(scope="module")
def nifti_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, np.ndarray]:
    """(dataset URI, input root, segmentation) of one subject, every slice in the test split."""
    base = tmp_path_factory.mktemp("nifti")
    seg = _nifti_input(base / "in")
    uri = str(base / "data")
    prepare_dataset("nifti", uri, input_uri=str(base / "in"), **NIFTI_OPTIONS)
    return uri, str(base / "in"), seg


def test_restack_hand_made_masks_gives_the_source_segmentation(nifti_data: tuple, tmp_path: Path) -> None:
    """Predictions whose masks are the ground truth re-stack onto the source file's voxels exactly."""
    data, _, seg = nifti_data
    rows = open_dataset(data).read_table("test").to_pylist()
    assert len(rows) == SHAPE[2] - 1
    table = pa.Table.from_pylist(
        [
            {
                "image_id": r["image_id"],
                "pred_label": r["label"],
                "scores": [0.5, 0.5],
                "cam": encode_mask((decode_mask(r["mask"]) == 1).astype(np.uint8) * 255),
                "mask": encode_mask((decode_mask(r["mask"]) == 1).astype(np.uint8)),
                "boxes": [],
                "cam_gt": None,
                "model": "hand",
                "checkpoint": "-",
                "subject_id": r["subject_id"],
                "slice_index": r["slice_index"],
                "height": r["height"],
                "width": r["width"],
            }
            for r in rows
        ],
        schema=PREDICTION_SCHEMA,
    )
    pred = str(tmp_path / "pred")
    write_predictions(
        [table],
        pred,
        model="hand",
        checkpoint="-",
        data=data,
        splits=["test"],
        threshold=0.5,
        class_names=["healthy", "tumour"],
    )
    for orientation in ("original", "canonical"):
        out = tmp_path / orientation
        files = predictions_to_nifti(pred, data, str(out), orientation)
        assert sorted(Path(f).name for f in files) == ["sub-01_cam.nii.gz", "sub-01_mask.nii.gz"]
        mask = nib.load(out / "sub-01_mask.nii.gz")
        cam = nib.load(out / "sub-01_cam.nii.gz")
        expected = nib.Nifti1Image(seg, AFFINE)
        if orientation == "canonical":
            expected = nib.as_closest_canonical(expected)
        assert mask.shape == expected.shape and cam.shape == expected.shape
        np.testing.assert_allclose(mask.affine, expected.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))
        np.testing.assert_allclose(cam.get_fdata(), np.asarray(expected.dataobj, np.float64))


def test_original_orientation_needs_the_source_file(tmp_path: Path) -> None:
    """A dataset whose input root has gone: refused up front (canonical still works)."""
    _nifti_input(tmp_path / "in")
    data = str(tmp_path / "data")
    prepare_dataset("nifti", data, input_uri=str(tmp_path / "in"), **NIFTI_OPTIONS)
    shutil.rmtree(tmp_path / "in")
    with pytest.raises(PredictionsError, match="not reachable"):
        volume_plan(data, ["test"], "original")
    plan = volume_plan(data, ["test"], "canonical")
    assert plan["sub-01"]["shape"] == (SHAPE[1], SHAPE[0], SHAPE[2])


def test_cli_localize_on_s3_with_nifti_out(
    local_ray: None, s3_server: str, nifti_data: tuple, model_uri: str
) -> None:
    """Model, dataset, predictions and volumes on S3 (moto), 2 actors, through the CLI."""
    local_data, input_root, _ = nifti_data
    data = f"{s3_server}/localize/data"
    prepare_dataset("nifti", data, input_uri=input_root, **NIFTI_OPTIONS)
    model = f"{s3_server}/localize/model.safetensors"
    storage.write_bytes(model, Path(model_uri).read_bytes())
    out, vols = f"{s3_server}/localize/pred", f"{s3_server}/localize/volumes"
    argv = [
        "localize",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--nifti-out",
        vols,
        "--actors",
        "2",
        "--batch-size",
        "2",
    ]
    result = _with_timeout(lambda: CliRunner().invoke(app, argv))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == SHAPE[2] - 1 and summary["nifti_files"] == 2
    assert "localize (rows): " in result.stderr and "Ray's logs are in" in result.stderr
    table = _check_predictions(out, data)
    assert [n for n in storage.list_dir(out) if n.startswith("_tmp-")] == []
    plain = localize_plain(model_uri, local_data, "test")
    assert dict(zip(*[table.column(c).to_pylist() for c in ("image_id", "pred_label")], strict=True)) == dict(
        zip(*[plain.column(c).to_pylist() for c in ("image_id", "pred_label")], strict=True)
    )
    # The mask volume: the source file's grid and axes, predicted slices where they were, 0 elsewhere.
    mask = load_nifti_bytes(storage.read_bytes(f"{vols}/sub-01_mask.nii.gz"))
    assert mask.shape == SHAPE
    np.testing.assert_allclose(mask.affine, AFFINE, atol=1e-6)
    canonical = np.asarray(nib.as_closest_canonical(mask).dataobj)
    predicted = {r["slice_index"]: decode_mask(r["mask"]) for r in table.to_pylist()}
    assert set(predicted) == {1, 2, 3, 4}
    for z in range(SHAPE[2]):
        plane = to_display(canonical[:, :, z])
        np.testing.assert_array_equal(plane, predicted.get(z, np.zeros_like(plane)))
    assert any(p.any() for p in predicted.values())
