from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import pyarrow.fs as pafs
import pytest

from acol_core import storage
from acol_core.data.codec import decode_png
from acol_core.data.prepare import finish_dataset, plan_dataset, prepare_dataset, run_shard, start_dataset
from acol_core.data.schema import SCHEMA, Record, Reject
from acol_core.data.shards import (
    MANIFEST_NAME,
    DatasetError,
    begin_dataset,
    open_dataset,
    write_dataset,
    write_manifest,
    write_rejects,
    write_shard,
)
from acol_core.data.splits import assign_subject_splits, select_fullsup, split_counts

PHANTOM = {"num_subjects": 4, "slices_per_subject": 4, "size": 64}


def _record(i: int, split: str, label: int = 0, **kw) -> Record:
    image = np.full((6, 8), i, np.uint8)
    return Record(image_id=f"img-{i}", image=image, label=label, split=split, subject_id=f"s{i}", **kw)


def _items():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 1
    mask[5, 7] = 255
    yield _record(0, "train", 0)
    yield Reject("broken.png", "corrupt or truncated image")
    yield _record(1, "val", 1, mask=mask, boxes=[[2, 1, 4, 2]])
    yield _record(2, "test", 1, labels=[0, 1], anatomy_mask=np.ones((6, 8), np.uint8))
    yield _record(3, "train", -1)
    yield _record(4, "train", 0, volume_shape=(8, 6, 3), affine=np.eye(4) * 2)


def test_write_dataset_roundtrip(tmp_path):
    uri = str(tmp_path / "ds")
    manifest = write_dataset(_items(), uri, ["healthy", "tumour"], {"source": "test"}, rows_per_shard=2)
    assert (manifest.inputs, manifest.accepted, manifest.rejected, manifest.num_rows) == (6, 5, 1, 5)
    assert [s.name for s in manifest.shards] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [s.rows for s in manifest.shards] == [2, 2, 1]
    assert manifest.counts["split"] == {"train": 3, "val": 1, "test": 1}
    assert manifest.counts["class"] == {"healthy": 2, "tumour": 2, "(unlabelled)": 1}
    assert manifest.counts["split_class"]["train"] == {"(unlabelled)": 1, "healthy": 2}

    on_disk = json.loads((tmp_path / "ds" / MANIFEST_NAME).read_text())
    assert on_disk["code_version"] and on_disk["schema_version"] == 1
    assert on_disk["source"] == {"source": "test"}

    ds = open_dataset(uri)
    assert ds.class_names == ["healthy", "tumour"] and ds.num_rows == 5
    table = ds.read_table()
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert rows["img-0"]["labels"] == [0] and rows["img-3"]["labels"] == []
    assert rows["img-2"]["labels"] == [0, 1]
    assert rows["img-1"]["boxes"] == [[2, 1, 4, 2]] and rows["img-0"]["boxes"] is None
    mask = decode_png(rows["img-1"]["mask"])
    assert mask.sum() == 6 + 255 and mask[5, 7] == 255
    assert decode_png(rows["img-2"]["image"]).tolist() == np.full((6, 8), 2).tolist()
    assert rows["img-4"]["volume_shape"] == [8, 6, 3] and rows["img-4"]["affine"][0] == 2.0
    assert (rows["img-1"]["height"], rows["img-1"]["width"]) == (6, 8)

    val = ds.read_table(split="val", columns=["image_id", "split"])
    assert val.column_names == ["image_id", "split"] and val.column("image_id").to_pylist() == ["img-1"]
    assert ds.read_rejects().to_pylist() == [{"source": "broken.png", "reason": "corrupt or truncated image"}]
    assert len(ds.shard_uris()) == 3 and all(u.startswith(uri) for u in ds.shard_uris())


def test_folder_without_manifest_is_not_a_dataset(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(_items(), uri, ["a", "b"], {}, rows_per_shard=2)
    (tmp_path / "unrelated.txt").write_text("keep me")
    os.rename(tmp_path / "unrelated.txt", tmp_path / "ds" / "unrelated.txt")
    begin_dataset(uri)  # a rewrite starts by removing the manifest, then old shards
    with pytest.raises(DatasetError, match=rf"no _manifest.json at {uri}: not a complete dataset"):
        open_dataset(uri)
    assert sorted(os.listdir(uri)) == ["unrelated.txt"]


def test_altered_shard_is_refused(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(_items(), uri, ["a", "b"], {}, rows_per_shard=2)
    path = tmp_path / "ds" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="part-00001.parquet .* does not match the manifest"):
        open_dataset(uri)
    assert open_dataset(uri, verify=False).num_rows == 5  # verify=False trusts the manifest
    path.unlink()
    with pytest.raises(DatasetError, match="part-00001.parquet is listed in the manifest but missing"):
        open_dataset(uri)


def test_manifest_checks_the_input_count(tmp_path):
    uri = str(tmp_path / "ds")
    begin_dataset(uri)
    info = write_shard([_record(0, "train")], uri, 0, ["a"])
    rejects = write_rejects([Reject("x", "bad")], uri)
    with pytest.raises(DatasetError, match=r"accepted \(1\) \+ rejected \(1\) != inputs \(3\)"):
        write_manifest(uri, [info], class_names=["a"], source_description={}, rejects=rejects, inputs=3)
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()
    write_manifest(uri, [info], class_names=["a"], source_description={}, rejects=rejects, inputs=2)
    assert open_dataset(uri).manifest.rejected == 1


def test_writer_refuses_bad_records(tmp_path):
    uri = str(tmp_path / "ds")
    dup = [_record(0, "train"), _record(0, "val")]
    with pytest.raises(DatasetError, match="duplicate image_id"):
        write_dataset(dup, uri, ["a"], {})
    with pytest.raises(ValueError, match="label 3 outside the 2 classes"):
        write_dataset([_record(0, "train", 3)], uri, ["a", "b"], {})
    with pytest.raises(ValueError, match="split must be one of"):
        write_dataset([_record(0, None)], uri, ["a"], {})
    bad_mask = _record(0, "train", mask=np.full((6, 8), 7, np.uint8))
    with pytest.raises(ValueError, match="outside"):
        write_dataset([bad_mask], uri, ["a"], {})
    with pytest.raises(ValueError, match="not inside"):
        write_dataset([_record(0, "train", boxes=[[0, 0, 8, 2]])], uri, ["a"], {})
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (4, (0.7, 0.15, 0.15), (2, 1, 1)),
        (100, (0.7, 0.15, 0.15), (70, 15, 15)),
        (10, (1.0, 0.0, 0.0), (10, 0, 0)),
        (2, (0.7, 0.15, 0.15), (1, 1, 0)),
        (0, (0.7, 0.15, 0.15), (0, 0, 0)),
        (7, (0.5, 0.25, 0.25), (3, 2, 2)),  # largest remainder: 3.5, 1.75, 1.75
    ],
)
def test_split_counts(n, fractions, expected):
    assert split_counts(n, fractions) == expected


def test_subject_split_is_deterministic_and_order_free():
    subjects = [f"s{i}" for i in range(30)]
    a = assign_subject_splits(subjects, seed=3)
    b = assign_subject_splits(list(reversed(subjects)) + subjects[:5], seed=3)
    assert a == b
    assert a != assign_subject_splits(subjects, seed=4)
    with pytest.raises(ValueError, match="summing to 1"):
        assign_subject_splits(subjects, (0.5, 0.5, 0.5))


def test_select_fullsup_takes_n_per_class():
    candidates = [(f"a{i}", 0) for i in range(5)] + [(f"b{i}", 1) for i in range(2)] + [("u", -1)]
    chosen = select_fullsup(candidates, per_class=3, seed=0)
    assert len([c for c in chosen if c.startswith("a")]) == 3
    assert {"b0", "b1"} <= chosen and "u" not in chosen and len(chosen) == 5
    assert chosen == select_fullsup(list(reversed(candidates)), per_class=3, seed=0)


# ---------------------------------------------------------------- prepare


def test_prepare_phantom_splits_by_subject_and_reruns_cleanly(tmp_path):
    uri = str(tmp_path / "ph")
    first = prepare_dataset("phantom", uri, rows_per_shard=5, fullsup_per_class=2, **PHANTOM)
    assert first.num_rows == 16 and first.inputs == 16 and first.rejected == 0
    table = open_dataset(uri).read_table(columns=["image_id", "subject_id", "split", "fullsup", "label"])
    splits_of = defaultdict(set)
    for row in table.to_pylist():
        splits_of[row["subject_id"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values()), splits_of  # no subject in two splits
    assert sorted(next(iter(s)) for s in splits_of.values()) == ["test", "train", "train", "val"]
    fullsup = [r for r in table.to_pylist() if r["fullsup"]]
    assert fullsup and all(r["split"] == "val" for r in fullsup)
    per_class = defaultdict(int)
    for r in fullsup:
        per_class[r["label"]] += 1
    assert all(v <= 2 for v in per_class.values()) and first.counts["fullsup"] == len(fullsup)

    # Same preparation again: identical files; then with bigger shards: no leftovers of the old layout.
    again = prepare_dataset("phantom", uri, rows_per_shard=5, fullsup_per_class=2, **PHANTOM)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]
    prepare_dataset("phantom", uri, rows_per_shard=64, fullsup_per_class=2, **PHANTOM)
    assert sorted(os.listdir(uri)) == ["_manifest.json", "_rejects.parquet", "part-00000.parquet"]
    assert open_dataset(uri).read_table().num_rows == 16


def test_shard_by_shard_equals_one_call(tmp_path):
    one = prepare_dataset("phantom", str(tmp_path / "one"), rows_per_shard=4, fullsup_per_class=1, **PHANTOM)
    plan = plan_dataset("phantom", str(tmp_path / "two"), rows_per_shard=4, fullsup_per_class=1, **PHANTOM)
    plan = type(plan).from_dict(json.loads(json.dumps(plan.to_dict())))  # as a flow would pass it
    start_dataset(plan)
    results = [run_shard(plan, k) for k in reversed(range(plan.num_shards))]  # any order
    two = finish_dataset(plan, results)
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    assert two.counts == one.counts
    with pytest.raises(DatasetError, match="expected results for shards"):
        finish_dataset(plan, results[1:])


@pytest.mark.integration
def test_dataset_on_s3_and_no_secret_in_any_file(s3_server, aws_secret_key, tmp_path):
    uri = storage.join(s3_server, "datasets", "phantom")
    manifest = prepare_dataset("phantom", uri, rows_per_shard=8, **PHANTOM)
    ds = open_dataset(uri)
    assert ds.manifest.num_rows == manifest.num_rows == 16
    assert isinstance(ds.filesystem, pafs.S3FileSystem)
    assert ds.read_table(split="train").num_rows == manifest.counts["split"]["train"]
    assert all(u.startswith("s3://acol-test/datasets/phantom/") for u in ds.shard_uris())

    fs, path = storage.resolve(uri)
    files = [
        i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File
    ]
    assert {os.path.basename(i.path) for i in files} == {
        "_manifest.json",
        "_rejects.parquet",
        "part-00000.parquet",
        "part-00001.parquet",
    }
    secret = aws_secret_key.encode()
    for info in files:
        with fs.open_input_stream(info.path) as f:
            assert secret not in f.read(), info.path
    local = prepare_dataset("phantom", str(tmp_path / "local"), **PHANTOM)
    assert local.shards[0].rows == 16
    for name in os.listdir(tmp_path / "local"):
        assert secret not in (tmp_path / "local" / name).read_bytes()
