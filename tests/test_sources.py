from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from acol_core import storage
from acol_core.data.codec import decode_png
from acol_core.data.prepare import prepare_dataset
from acol_core.data.schema import Record, Reject
from acol_core.data.shards import open_dataset
from acol_core.data.sources import (
    DataSourceError,
    InputError,
    Source,
    binarize_mask,
    get_source,
    source_names,
)
from acol_core.data.sources.nifti import from_display, restack, to_display
from acol_core.localize import boxes_from_mask


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _records(source: Source) -> list[Record]:
    items = list(source.iter_items())
    assert not [i for i in items if isinstance(i, Reject)], items
    return items


# ---------------------------------------------------------------- helpers


def test_gt_boxes_inclusive_8_connected_in_raster_order():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:3] = 1
    mask[3, 3] = 1  # touches the first block diagonally: same object
    mask[5, 6:8] = 1
    mask[0, 7] = 255  # ignore is not an object
    assert boxes_from_mask(mask, order="raster") == [[1, 1, 3, 3], [6, 5, 7, 5]]
    assert boxes_from_mask(np.zeros((3, 3), np.uint8), order="raster") == []


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0, 1], [0, 1]), ([0, 255], [0, 1]), ([0, 1, 255], [0, 1, 255]), ([0, 7], [0, 1]), ([0, 0], [0, 0])],
)
def test_binarize_mask_accepts_binary_forms(values, expected):
    out = binarize_mask(np.array([values], np.uint8))
    assert out.dtype == np.uint8 and out.tolist() == [expected]


@pytest.mark.parametrize("values", [[0, 128, 255], [3, 7], [1, 2]])
def test_binarize_mask_refuses_grey_levels(values):
    with pytest.raises(InputError, match="not binary"):
        binarize_mask(np.array([values], np.uint8))


def test_registry():
    assert source_names() == ["imagefolder", "nifti", "phantom", "wsol-metadata"]
    with pytest.raises(DataSourceError, match="unknown source 'folder'"):
        get_source("folder")
    with pytest.raises(DataSourceError, match="has no option"):
        get_source("phantom", colour="red")
    with pytest.raises(DataSourceError, match="root"):
        get_source("imagefolder")
    with pytest.raises(DataSourceError, match="takes no input URI"):
        prepare_dataset("phantom", "/tmp/never", input_uri="/tmp")


# ---------------------------------------------------------------- phantom


def test_phantom_source_records():
    src = get_source("phantom", num_subjects=3, slices_per_subject=4, size=64)
    assert isinstance(src, Source) and src.class_names == ("healthy", "tumour")
    refs = src.list_inputs()
    assert len(refs) == 12 and {r.subject_id for r in refs} == {"sub-0000", "sub-0001", "sub-0002"}
    records = _records(src)
    assert len({r.image_id for r in records}) == 12
    assert {r.label for r in records} == {0, 1}
    for r in records:
        assert r.image.shape == (64, 64) and r.anatomy_mask.any() and set(np.unique(r.anatomy_mask)) <= {0, 1}
        if r.label == 1:
            assert r.mask.sum() >= 1 and r.boxes and r.boxes == boxes_from_mask(r.mask, order="raster")
        else:
            assert not r.mask.any() and r.boxes == []


# ---------------------------------------------------------------- imagefolder


def _imagefolder(tmp_path: Path) -> tuple[Path, Path]:
    root, masks = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(0)
    _write(root / "cat" / "p1_a.png", _png(rng.integers(0, 255, (8, 10), dtype=np.uint8)))
    _write(root / "cat" / "p2_b.png", _png(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(buf, "JPEG")
    _write(root / "dog" / "sub" / "p1_c.jpg", buf.getvalue())
    mask = np.zeros((8, 10), np.uint8)
    mask[2:4, 5:9] = 255
    _write(masks / "cat" / "p1_a.png", _png(mask))
    _write(masks / "dog" / "sub" / "p1_c.png", _png(np.zeros((8, 10), np.uint8)))
    return root, masks


def test_imagefolder_source(tmp_path):
    root, masks = _imagefolder(tmp_path)
    src = get_source("imagefolder", root=str(root), masks=str(masks), subject_pattern=r"(p\d)_")
    assert src.class_names == ("cat", "dog")
    records = {r.image_id: r for r in _records(src)}
    assert set(records) == {"cat/p1_a.png", "cat/p2_b.png", "dog/sub/p1_c.jpg"}
    a, b, c = records["cat/p1_a.png"], records["cat/p2_b.png"], records["dog/sub/p1_c.jpg"]
    assert (a.label, b.label, c.label) == (0, 0, 1)
    assert (a.subject_id, b.subject_id, c.subject_id) == ("p1", "p2", "p1")
    assert a.mask.sum() == 8 and a.boxes == [[5, 2, 8, 3]]
    assert b.mask is None and b.boxes is None and b.image.shape == (8, 10, 3)
    assert c.mask is not None and not c.mask.any() and c.boxes == []
    assert src.describe()["masks"] == str(masks)


def test_imagefolder_prepare_keeps_subjects_together(tmp_path):
    root, masks = _imagefolder(tmp_path)
    manifest = prepare_dataset(
        "imagefolder",
        str(tmp_path / "out"),
        input_uri=str(root),
        subject_pattern=r"(p\d)_",
        split_fractions=(0.5, 0.5, 0),
    )
    assert manifest.inputs == 3 and manifest.accepted == 3 and manifest.class_names == ["cat", "dog"]
    rows = open_dataset(str(tmp_path / "out")).read_table(columns=["subject_id", "split"]).to_pylist()
    assert len({r["split"] for r in rows if r["subject_id"] == "p1"}) == 1


# ---------------------------------------------------------------- wsol-metadata


def _wsol_boxes(tmp_path: Path) -> tuple[Path, Path]:
    images, meta = tmp_path / "images", tmp_path / "metadata"
    rng = np.random.default_rng(1)
    for split, names in {
        "train": ["001.Bird/a.png", "002.Cat/b.png"],
        "val": ["001.Bird/c.png"],
        "test": ["002.Cat/d.png"],
    }.items():
        for name in names:
            _write(images / name, _png(rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)))
        (meta / split).mkdir(parents=True)
        (meta / split / "image_ids.txt").write_text("".join(f"{n}\n" for n in names))
        (meta / split / "class_labels.txt").write_text("".join(f"{n},{int(n[2]) - 1}\n" for n in names))
        (meta / split / "image_sizes.txt").write_text("".join(f"{n},9,6\n" for n in names))
        # CUB-style x1 = x0 + w can reach the width: clipped to the last column.
        (meta / split / "localization.txt").write_text("".join(f"{n},1,2,9,4\n{n},0,0,2,2\n" for n in names))
    return images, meta


def test_wsol_metadata_boxes_keep_their_split(tmp_path):
    images, meta = _wsol_boxes(tmp_path)
    src = get_source("wsol-metadata", root=str(images), metadata=str(meta), class_names=["bird", "cat"])
    records = {r.image_id: r for r in _records(src)}
    assert {k: (r.split, r.label) for k, r in records.items()} == {
        "001.Bird/a.png": ("train", 0),
        "002.Cat/b.png": ("train", 1),
        "001.Bird/c.png": ("val", 0),
        "002.Cat/d.png": ("test", 1),
    }
    assert records["001.Bird/c.png"].boxes == [[1, 2, 8, 4], [0, 0, 2, 2]]
    assert records["001.Bird/c.png"].mask is None

    manifest = prepare_dataset(
        "wsol-metadata", str(tmp_path / "out"), input_uri=str(images), metadata=str(meta), fullsup_per_class=1
    )
    assert manifest.class_names == ["0", "1"]  # no names given: indices
    assert manifest.counts["split"] == {"train": 2, "val": 1, "test": 1}
    assert manifest.counts["fullsup"] == 1


def test_single_split_overrides_the_metadata_split(tmp_path):
    images, meta = _wsol_boxes(tmp_path)
    manifest = prepare_dataset(
        "wsol-metadata", str(tmp_path / "out"), input_uri=str(images), metadata=str(meta), split="test"
    )
    assert manifest.counts["split"] == {"train": 0, "val": 0, "test": 4}  # an external test cohort
    assert manifest.preparation["split_policy"] == {"mode": "single", "split": "test"}
    with pytest.raises(ValueError, match="either a single split or split fractions"):
        prepare_dataset("wsol-metadata", str(tmp_path / "x"), input_uri=str(images), split="test",
                        split_fractions=(0.8, 0.1, 0.1))  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_wsol_metadata_openimages_masks(tmp_path):
    images = tmp_path / "OpenImages"
    _write(images / "val" / "k1" / "x.png", _png(np.zeros((4, 5, 3), np.uint8)))
    first, second, ignore = (np.zeros((4, 5), np.uint8) for _ in range(3))
    first[0, 0:2] = 255
    second[3, 4] = 255
    ignore[0:2, 0:4] = 255  # the ignore box covers part of the first object
    _write(images / "val" / "k1" / "x_m1.png", _png(first))
    _write(images / "val" / "k1" / "x_m2.png", _png(second))
    _write(images / "val" / "k1" / "x_ignore.png", _png(ignore))
    (images / "image_ids.txt").write_text("val/k1/x.png\n")
    (images / "class_labels.txt").write_text("val/k1/x.png,0\n")
    (images / "class_names.txt").write_text("cheese\n")
    (images / "localization.txt").write_text(
        "val/k1/x.png,val/k1/x_m1.png,val/k1/x_ignore.png\nval/k1/x.png,val/k1/x_m2.png,\n"
    )
    (record,) = _records(get_source("wsol-metadata", root=str(images)))
    assert record.split is None and record.boxes is None and record.label == 0
    expected = np.zeros((4, 5), np.uint8)
    expected[0:2, 0:4] = 255
    expected[0, 0:2] = 1
    expected[3, 4] = 1
    np.testing.assert_array_equal(record.mask, expected)


# ---------------------------------------------------------------- nifti


def _volume(shape=(12, 10, 6)) -> np.ndarray:
    vol = np.zeros(shape, np.float32)
    vol[2:10, 1:9, 1:5] = np.linspace(100, 300, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    return vol


def _seg(shape=(12, 10, 6)) -> np.ndarray:
    seg = np.zeros(shape, np.int16)
    seg[3:6, 2:5, 2] = 2  # 9 pixels: tumour slice
    seg[7, 3:5, 3] = 1  # 2 pixels: below min_tumour_pixels, ignored
    return seg


AFFINE = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, -3.0, 15], [0, 0, 0, 1]])


def _nifti_subject(root: Path, subject: str, affine=AFFINE) -> None:
    folder = root / subject
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(_volume(), affine), folder / f"{subject}-t1c.nii.gz")
    nib.save(nib.Nifti1Image(_volume() * 2 + 5, affine), folder / f"{subject}-flair.nii")
    nib.save(nib.Nifti1Image(_seg(), affine), folder / f"{subject}-seg.nii.gz")


def test_display_orientation_roundtrip():
    plane = np.arange(12).reshape(4, 3)  # (x, y)
    shown = to_display(plane)
    assert shown.shape == (3, 4) and shown[0, 0] == plane[0, 2]  # top row is the highest y (anterior)
    np.testing.assert_array_equal(from_display(shown), plane)


def test_nifti_source_slices_on_the_canonical_grid(tmp_path):
    _nifti_subject(tmp_path, "BraTS-001")
    src = get_source("nifti", root=str(tmp_path), modalities="t1c,flair", min_tumour_pixels=5)
    records = _records(src)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(_seg(), AFFINE))
    ref_seg = np.asarray(canonical.dataobj) > 0
    # Slices 1..4 carry head; the z flip maps them to canonical 1..4 as well (6 slices).
    assert [r.slice_index for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r.image.shape == (10, 12, 2) and r.image.dtype == np.uint16
        assert r.image.min() == 0  # background
        assert r.volume_shape == (12, 10, 6) and r.subject_id == "BraTS-001"
        np.testing.assert_allclose(np.asarray(r.affine).reshape(4, 4), canonical.affine)
        assert r.image_id == f"BraTS-001/z{r.slice_index:03d}"
    assert max(int(r.image.max()) for r in records) == 65535  # clipped per volume, not per slice
    by_z = {r.slice_index: r for r in records}
    tumour_z = int(np.argmax(ref_seg.sum(axis=(0, 1)) == 9))
    small_z = int(np.argmax(ref_seg.sum(axis=(0, 1)) == 2))
    assert by_z[tumour_z].label == 1 and len(by_z[tumour_z].boxes) == 1
    assert by_z[small_z].label == 0 and by_z[small_z].boxes == []
    assert set(np.unique(by_z[small_z].mask)) == {0, 255}  # too small to count, not background either
    restacked = restack({z: r.mask > 0 for z, r in by_z.items()}, records[0].volume_shape, bool)
    np.testing.assert_array_equal(restacked, ref_seg)


def test_nifti_prepare_roundtrip(tmp_path):
    for subject in ("s1", "s2", "s3"):
        _nifti_subject(tmp_path / "in", subject)
    manifest = prepare_dataset(
        "nifti", str(tmp_path / "out"), input_uri=str(tmp_path / "in"), min_tumour_pixels=5, rows_per_shard=4
    )
    assert (manifest.inputs, manifest.accepted, manifest.num_rows) == (3, 3, 12)
    assert manifest.class_names == ["healthy", "tumour"] and len(manifest.shards) == 3
    row = open_dataset(str(tmp_path / "out")).read_table().to_pylist()[0]
    assert decode_png(row["image"]).shape == (10, 12)  # default: one modality
    assert row["volume_shape"] == [12, 10, 6] and len(row["affine"]) == 16


# ---------------------------------------------------------------- S3 input


@pytest.mark.integration
def test_imagefolder_from_s3_to_s3(s3_server, tmp_path):
    root, masks = _imagefolder(tmp_path)
    base = storage.join(s3_server, "sources-test")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(
            storage.join(base, "images", path.relative_to(root).as_posix()), path.read_bytes()
        )
    manifest = prepare_dataset(
        "imagefolder", storage.join(base, "out"), input_uri=storage.join(base, "images")
    )
    assert manifest.num_rows == 3 and manifest.class_names == ["cat", "dog"]
    assert open_dataset(storage.join(base, "out")).read_table().num_rows == 3
