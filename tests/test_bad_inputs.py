"""Bad inputs, each built on disk next to a good one: a Reject with a reason, never a crash or a silent drop.

Whole inputs that cannot be used at all (missing root, nothing in it) raise one DataSourceError.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from acol_core.data.prepare import prepare_dataset
from acol_core.data.schema import Reject
from acol_core.data.shards import open_dataset
from acol_core.data.sources import DataSourceError, get_source


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _image(shape=(8, 10)) -> np.ndarray:
    return np.random.default_rng(sum(shape)).integers(0, 255, shape, dtype=np.uint8)


@dataclass
class Case:
    id: str
    source: str
    build: Callable[[Path], dict[str, Any]]  # writes a good and a bad input, returns the options
    reason: str  # regex the bad input's reject reason must match


# ---------------------------------------------------------------- imagefolder


def _folder(tmp: Path, bad: Callable[[Path], None], **options: Any) -> dict[str, Any]:
    root = tmp / "images"
    _write(root / "cat" / "good.png", _png(_image()))
    bad(root)
    return {"root": str(root), **options}


def _outside(tmp: Path) -> Path:
    target = tmp / "outside" / "secret.png"
    _write(target, _png(_image()))
    return target


def _masks(tmp: Path, mask: np.ndarray) -> dict[str, Any]:
    _write(tmp / "masks" / "cat" / "bad.png", _png(mask))
    return {"masks": str(tmp / "masks")}


IMAGEFOLDER = [
    Case(
        "truncated-png",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "cat" / "bad.png", _png(_image())[:60])),
        "truncated",
    ),
    Case(
        "zero-byte",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "cat" / "bad.png", b"")),
        "empty file",
    ),
    Case(
        "garbage-jpeg",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "cat" / "bad.jpg", b"\xff\xd8junk")),
        "corrupt",
    ),
    Case(
        "unknown-class",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "dog" / "bad.png", _png(_image())), class_names=["cat"]),
        "unknown class 'dog'",
    ),
    Case(
        "mask-not-binary",
        "imagefolder",
        lambda t: _folder(
            t,
            lambda r: _write(r / "cat" / "bad.png", _png(_image())),
            **_masks(t, np.tile(np.array([0, 128, 255], np.uint8), (8, 4))[:, :10]),
        ),
        "not binary",
    ),
    Case(
        "mask-shape",
        "imagefolder",
        lambda t: _folder(
            t,
            lambda r: _write(r / "cat" / "bad.png", _png(_image())),
            **_masks(t, np.zeros((4, 4), np.uint8)),
        ),
        "does not match image shape",
    ),
    Case(
        "mask-truncated",
        "imagefolder",
        lambda t: (
            _write(t / "masks" / "cat" / "bad.png", _png(_image())[:50]),
            _folder(t, lambda r: _write(r / "cat" / "bad.png", _png(_image())), masks=str(t / "masks")),
        )[1],
        "mask cat/bad.png: .*truncated",
    ),
    Case(
        "over-pixel-limit",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "cat" / "bad.png", _png(_image((20, 20)))), max_pixels=100),
        "exceeds the limit of 100 pixels",
    ),
    Case(
        "symlink-file-escape",
        "imagefolder",
        lambda t: _folder(t, lambda r: os.symlink(_outside(t), r / "cat" / "bad.png")),
        "escapes the input root",
    ),
    Case(
        "symlink-dir-escape",
        "imagefolder",
        lambda t: _folder(t, lambda r: os.symlink(_outside(t).parent, r / "cat" / "linked")),
        "escapes the input root",
    ),
    Case(
        "not-an-image",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "cat" / "notes.txt", b"hi")),
        "unsupported file type",
    ),
    Case(
        "outside-class-folder",
        "imagefolder",
        lambda t: _folder(t, lambda r: _write(r / "loose.png", _png(_image()))),
        "not inside a class folder",
    ),
    Case(
        "subject-pattern",
        "imagefolder",
        lambda t: _folder(
            t, lambda r: _write(r / "cat" / "zz.png", _png(_image())), subject_pattern=r"^cat/(g)"
        ),
        "subject pattern",
    ),
]


# ---------------------------------------------------------------- wsol-metadata


def _wsol(
    tmp: Path, bad_id: str, labels: str = "", sizes: str = "", loc: str = "", extra=None
) -> dict[str, Any]:
    root = tmp / "wsol"
    _write(root / "img" / "good.png", _png(_image()))
    if extra:
        extra(root)
    (root / "image_ids.txt").write_text(f"img/good.png\n{bad_id}\n")
    (root / "class_labels.txt").write_text(f"img/good.png,0\n{labels}")
    (root / "image_sizes.txt").write_text(f"img/good.png,10,8\n{sizes}")
    (root / "localization.txt").write_text(f"img/good.png,1,1,3,3\n{loc}")
    (root / "class_names.txt").write_text("bird\n")
    return {"root": str(root)}


def _bad_png(root: Path) -> None:
    _write(root / "img" / "bad.png", _png(_image()))


WSOL = [
    Case(
        "unknown-label",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", "img/bad.png,1\n", extra=_bad_png),
        "unknown class label 1",
    ),
    Case(
        "missing-label",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", extra=_bad_png),
        "no entry in class_labels",
    ),
    Case(
        "malformed-label",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", "img/bad.png,x\n", extra=_bad_png),
        "malformed class label",
    ),
    Case(
        "dotdot-escape",
        "wsol-metadata",
        lambda t: (_write(t / "secret.png", _png(_image())), _wsol(t, "../secret.png", "../secret.png,0\n"))[
            1
        ],
        "escapes the input root",
    ),
    Case(
        "symlink-escape",
        "wsol-metadata",
        lambda t: _wsol(
            t,
            "img/link.png",
            "img/link.png,0\n",
            extra=lambda r: os.symlink(_outside(t), r / "img" / "link.png"),
        ),
        "escapes the input root",
    ),
    Case(
        "missing-file",
        "wsol-metadata",
        lambda t: _wsol(t, "img/nope.png", "img/nope.png,0\n"),
        "file not found",
    ),
    Case(
        "size-mismatch",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", "img/bad.png,0\n", "img/bad.png,11,8\n", extra=_bad_png),
        "image_sizes.txt says 11×8",
    ),
    Case(
        "inverted-box",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", "img/bad.png,0\n", loc="img/bad.png,5,1,2,3\n", extra=_bad_png),
        "inverted or outside",
    ),
    Case(
        "malformed-localization",
        "wsol-metadata",
        lambda t: _wsol(t, "img/bad.png", "img/bad.png,0\n", loc="img/bad.png,5,1,2\n", extra=_bad_png),
        "malformed localization line",
    ),
    Case(
        "mask-not-binary",
        "wsol-metadata",
        lambda t: _wsol(
            t,
            "img/bad.png",
            "img/bad.png,0\n",
            loc="img/bad.png,img/m.png,\n",
            extra=lambda r: (
                _bad_png(r),
                _write(r / "img" / "m.png", _png(np.arange(80, dtype=np.uint8).reshape(8, 10))),
            ),
        ),
        "mask img/m.png is not binary",
    ),
    Case("duplicate-id", "wsol-metadata", lambda t: _wsol(t, "img/good.png"), "duplicate image id"),
]


# ---------------------------------------------------------------- nifti

SHAPE = (12, 10, 6)


def _vol(shape=SHAPE) -> np.ndarray:
    vol = np.zeros(shape, np.float32)
    vol[2:10, 1:9, 1:5] = 100.0 + np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    return vol


def _save(path: Path, data: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def _nifti(tmp: Path, bad: Callable[[Path], None], **options: Any) -> dict[str, Any]:
    root = tmp / "brats"
    _save(root / "good" / "good-t1c.nii.gz", _vol())
    _save(root / "good" / "good-seg.nii.gz", np.zeros(SHAPE, np.uint8))
    bad(root / "bad")
    return {"root": str(root), **options}


def _bad_t1c(data: np.ndarray, seg: np.ndarray | None = None, seg_affine=None) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        _save(folder / "bad-t1c.nii.gz", data)
        if seg is not None:
            _save(folder / "bad-seg.nii.gz", seg, seg_affine)

    return build


def _raw(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: _write(folder / name, data)


def _nan_volume() -> np.ndarray:
    vol = _vol()
    vol[3, 3, 3] = np.nan
    return vol


def _truncated_gz() -> bytes:
    buf = io.BytesIO()
    nib.Nifti1Image(_vol(), np.eye(4)).to_file_map(
        {"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)}
    )
    return gzip.compress(buf.getvalue())[:400]


NIFTI = [
    Case("truncated-gz", "nifti", lambda t: _nifti(t, _raw("bad-t1c.nii.gz", _truncated_gz())), "corrupt"),
    Case("zero-byte", "nifti", lambda t: _nifti(t, _raw("bad-t1c.nii.gz", b"")), "empty file"),
    Case("not-nifti", "nifti", lambda t: _nifti(t, _raw("bad-t1c.nii", b"\x00" * 400)), "corrupt NIfTI"),
    Case("nan-voxels", "nifti", lambda t: _nifti(t, _bad_t1c(_nan_volume())), "NaN/Inf"),
    Case(
        "inf-in-seg",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(_vol(), np.full(SHAPE, np.inf, np.float32))),
        "NaN/Inf",
    ),
    Case(
        "seg-shape",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(_vol(), np.zeros((12, 10, 5), np.uint8))),
        "shape mismatch",
    ),
    Case(
        "seg-affine",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(_vol(), np.zeros(SHAPE, np.uint8), np.diag([2.0, 1, 1, 1]))),
        "affine mismatch",
    ),
    Case(
        "modality-shape",
        "nifti",
        lambda t: (
            _nifti(
                t,
                lambda f: (
                    _save(f / "bad-t1c.nii.gz", _vol()),
                    _save(f / "bad-flair.nii.gz", _vol((12, 10, 7))),
                ),
                modalities=["t1c", "flair"],
            )
            | _also_good_flair(t)
        ),
        "shape mismatch: bad-flair",
    ),
    Case(
        "four-d",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(np.zeros((*SHAPE, 2), np.float32))),
        "expected a 3-D volume",
    ),
    Case(
        "missing-modality",
        "nifti",
        lambda t: _nifti(t, _raw("bad-flair.nii.gz", b"x")),
        "missing modality 't1c'",
    ),
    Case(
        "ambiguous-modality",
        "nifti",
        lambda t: _nifti(t, lambda f: (_save(f / "a-t1c.nii.gz", _vol()), _save(f / "b-t1c.nii", _vol()))),
        "ambiguous",
    ),
    Case(
        "over-voxel-limit",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(_vol((20, 20, 6))), max_voxels=1000),
        "over the limit of 1000",
    ),
    Case(
        "seg-not-labels",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(_vol(), np.full(SHAPE, 0.5, np.float32))),
        "not a label map",
    ),
    Case(
        "empty-volume",
        "nifti",
        lambda t: _nifti(t, _bad_t1c(np.zeros(SHAPE, np.float32))),
        "no slice with enough foreground",
    ),
    Case(
        "symlink-escape",
        "nifti",
        lambda t: _nifti(
            t,
            lambda f: (
                _save(t / "elsewhere" / "x-t1c.nii.gz", _vol()),
                f.mkdir(parents=True),
                os.symlink(t / "elsewhere" / "x-t1c.nii.gz", f / "bad-t1c.nii.gz"),
            ),
        ),
        "escapes the input root",
    ),
]


def _also_good_flair(tmp: Path) -> dict[str, Any]:
    _save(tmp / "brats" / "good" / "good-flair.nii.gz", _vol())
    return {}


CASES = IMAGEFOLDER + WSOL + NIFTI


@pytest.mark.parametrize("case", CASES, ids=[f"{c.source}-{c.id}" for c in CASES])
def test_bad_input_is_rejected_with_a_reason(case: Case, tmp_path: Path):
    options = case.build(tmp_path)
    source = get_source(case.source, **options)
    refs = source.list_inputs()
    outcomes = [source.read_input(ref.key) for ref in refs]
    rejects = [o for o in outcomes if isinstance(o, Reject)]
    accepted = [o for o in outcomes if not isinstance(o, Reject)]
    assert len(rejects) == 1, rejects
    assert len(accepted) + len(rejects) == len(refs)
    assert all(records for records in accepted)
    assert rejects[0].reason and rejects[0].source
    assert re.search(case.reason, rejects[0].reason), rejects[0]


def test_rejects_land_in_the_dataset(tmp_path: Path):
    root = tmp_path / "images"
    _write(root / "cat" / "a.png", _png(_image()))
    _write(root / "cat" / "b.png", b"")
    _write(root / "dog" / "c.png", _png(_image())[:70])
    manifest = prepare_dataset("imagefolder", str(tmp_path / "out"), input_uri=str(root))
    assert (manifest.inputs, manifest.accepted, manifest.rejected) == (3, 1, 2)
    rejects = open_dataset(str(tmp_path / "out")).read_rejects().to_pylist()
    assert [r["source"] for r in rejects] == ["cat/b.png", "dog/c.png"]
    assert "empty file" in rejects[0]["reason"] and "truncated" in rejects[1]["reason"]


def test_all_inputs_rejected_is_an_error_without_a_manifest(tmp_path: Path):
    root = tmp_path / "images"
    _write(root / "cat" / "a.png", b"")
    with pytest.raises(
        DataSourceError, match=r"no usable input: all 1 inputs were rejected \(cat/a.png: empty file"
    ):
        prepare_dataset("imagefolder", str(tmp_path / "out"), input_uri=str(root))
    assert sorted(os.listdir(tmp_path / "out")) == ["_rejects.parquet"]
    assert pq.read_table(tmp_path / "out" / "_rejects.parquet").num_rows == 1


def _touch_dirs(*paths: Path) -> None:
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize(
    ("source", "setup", "message"),
    [
        ("imagefolder", lambda t: {"root": str(t / "missing")}, "does not exist"),
        (
            "imagefolder",
            lambda t: (_write(t / "file", b"x"), {"root": str(t / "file")})[1],
            "is not a folder",
        ),
        ("imagefolder", lambda t: (_touch_dirs(t / "r"), {"root": str(t / "r")})[1], "no class folders"),
        ("imagefolder", lambda t: (_touch_dirs(t / "r" / "cat"), {"root": str(t / "r")})[1], "no files"),
        (
            "nifti",
            lambda t: (_write(t / "r" / "x-t1c.nii.gz", b"x"), {"root": str(t / "r")})[1],
            "no subject folders",
        ),
        (
            "nifti",
            lambda t: (_touch_dirs(t / "r" / "s"), {"root": str(t / "r"), "modalities": "a,b,c,d,e"})[1],
            "1 to 4 modalities",
        ),
        ("wsol-metadata", lambda t: (_touch_dirs(t / "r"), {"root": str(t / "r")})[1], "no image_ids.txt"),
        (
            "wsol-metadata",
            lambda t: (_write(t / "r" / "image_ids.txt", b"a.png\n"), {"root": str(t / "r")})[1],
            "class_labels.txt missing",
        ),
        (
            "wsol-metadata",
            lambda t: (
                _write(t / "r" / "image_ids.txt", b""),
                _write(t / "r" / "class_labels.txt", b""),
                {"root": str(t / "r")},
            )[2],
            "no image ids",
        ),
    ],
    ids=[
        "missing-root",
        "root-is-file",
        "empty-root",
        "empty-classes",
        "flat-nifti",
        "five-modalities",
        "no-metadata",
        "no-labels",
        "empty-ids",
    ],
)
def test_unusable_input_is_one_clear_error(source, setup, message, tmp_path: Path):
    with pytest.raises(DataSourceError, match=message):
        get_source(source, **setup(tmp_path))
