"""The bad-input corpus through the real `acol` command (subprocesses, no Ray started by any of them).

Inputs that spoil single items (corrupt or truncated images and volumes, NaN voxels, wrong shapes,
unknown labels, missing files) are recorded rejects of a run that goes on (exit 0); inputs that stop
a run (all inputs bad, a missing root, unreachable storage, a checkpoint that is not ours or is cut
short, unknown config keys, an out-of-range δ, a class-count mismatch, a dataset URI without a
manifest, a run name leaving its storage) give exit code 2 and exactly one line on stderr, never a
traceback, and write nothing. Per-item reasons at the source level: tests/test_bad_inputs.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from faultkit import ACOL, driver_tracebacks, free_port
from PIL import Image
from safetensors.torch import save as st_save

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.export import export_bytes
from acol_core.models import create_model

SMOKE_SPACE = Path(__file__).resolve().parents[2] / "tune" / "spaces" / "smoke.yaml"

# --------------------------------------------------------------------------- building the corpus


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _image(seed: int, shape: tuple[int, int] = (16, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def _imagefolder(root: Path) -> dict[str, str]:
    """3 good images; 6 bad ones, each with the reason its reject must give."""
    for i in range(3):
        _write(root / "images" / "cat" / f"good{i}.png", _png(_image(i)))
    _write(root / "images" / "cat" / "truncated.png", _png(_image(7))[:60])
    _write(root / "images" / "cat" / "empty.png", b"")
    _write(root / "images" / "cat" / "garbage.jpg", b"\xff\xd8 not a jpeg")
    _write(root / "images" / "dog" / "unknown.png", _png(_image(8)))  # "dog" is not a class
    _write(root / "images" / "cat" / "notes.txt", "hello")
    _write(root / "images" / "cat" / "badmask.png", _png(_image(9)))
    _write(root / "masks" / "cat" / "badmask.png", _png(np.zeros((4, 4), np.uint8)))  # wrong shape
    return {
        "cat/truncated.png": "truncated",
        "cat/empty.png": "empty file",
        "cat/garbage.jpg": "corrupt",
        "dog/unknown.png": "unknown class 'dog'",
        "cat/notes.txt": "unsupported file type",
        "cat/badmask.png": "does not match image shape",
    }


SHAPE = (12, 10, 6)


def _volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    vol = np.zeros(shape, np.float32)
    vol[2:10, 1:9, 1:5] = 100.0 + np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    return vol


def _nii(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _nifti(root: Path) -> dict[str, str]:
    """2 good subjects; NaN voxels, a truncated volume, a segmentation of the wrong shape, brain masks of
    the wrong shape or orientation, an empty brain mask."""
    for name in ("good1", "good2"):
        _nii(root / "brats" / name / f"{name}-t1c.nii.gz", _volume())
        _nii(root / "brats" / name / f"{name}-seg.nii.gz", np.zeros(SHAPE, np.uint8))
    nan = _volume()
    nan[3, 3, 3] = np.nan
    _nii(root / "brats" / "nan" / "nan-t1c.nii.gz", nan)
    whole = gzip.compress(nib.Nifti1Image(_volume(), np.eye(4)).to_bytes())
    _write(root / "brats" / "cut" / "cut-t1c.nii.gz", whole[: len(whole) // 3])
    _nii(root / "brats" / "shape" / "shape-t1c.nii.gz", _volume())
    _nii(root / "brats" / "shape" / "shape-seg.nii.gz", np.zeros((12, 10, 5), np.uint8))
    brain = (_volume() > 0).astype(np.uint8)
    for name, mask in (("brainshape", brain[:, :, :5]), ("brainflip", brain), ("brainempty", 0 * brain)):
        _nii(root / "brats" / name / f"{name}-t1c.nii.gz", _volume())
        _nii(root / "brats" / name / f"{name}-brainmask.nii.gz", mask)
    nib.save(
        nib.Nifti1Image(brain, np.diag([-1.0, 1, 1, 1])),
        root / "brats" / "brainflip" / "brainflip-brainmask.nii.gz",
    )
    return {
        "nan": "NaN/Inf", "cut": "corrupt", "shape": "shape mismatch",
        "brainshape": "shape mismatch: brain mask", "brainflip": r"affine mismatch: brain mask .* \(LAS\) vs",
        "brainempty": "brain mask .* is empty",
    }  # fmt: skip


def _wsol(root: Path) -> dict[str, str]:
    """2 good images; a missing file and an unknown label."""
    base = root / "wsol"
    for i in range(2):
        _write(base / "img" / f"good{i}.png", _png(_image(20 + i)))
    _write(base / "img" / "label9.png", _png(_image(30)))
    ids = ["img/good0.png", "img/good1.png", "img/missing.png", "img/label9.png"]
    _write(base / "image_ids.txt", "\n".join(ids) + "\n")
    _write(
        base / "class_labels.txt", "img/good0.png,0\nimg/good1.png,1\nimg/missing.png,0\nimg/label9.png,9\n"
    )
    _write(base / "class_names.txt", "bird\nplane\n")
    return {"img/missing.png": "file not found", "img/label9.png": "unknown class label 9"}


def _model_bytes(num_classes: int) -> bytes:
    config = TrainConfig(model="cam", image_size=32, num_classes=num_classes)
    model = create_model("cam", num_classes=num_classes, in_channels=1, backbone="tiny")
    return export_bytes(model, config, [f"c{i}" for i in range(num_classes)])


class _Payload:
    """Unpickling this runs ``open(path, "w")``: it proves a file was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@dataclass
class Corpus:
    root: Path
    data: str  # a 2-class phantom dataset
    rejects: dict[str, dict[str, str]]  # source -> {input: reason}
    payload_target: Path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    data = str(root / "data")
    prepare_dataset("phantom", data, num_subjects=4, slices_per_subject=2, size=32, rows_per_shard=8)
    rejects = {"imagefolder": _imagefolder(root), "nifti": _nifti(root), "wsol-metadata": _wsol(root)}
    _write(root / "no-manifest" / "part-00000.parquet", b"PAR1")
    _write(root / "all-bad" / "cat" / "a.png", b"")
    good = _model_bytes(2)
    _write(root / "model.safetensors", good)
    _write(root / "truncated.safetensors", good[: len(good) // 2])
    _write(root / "three-classes.safetensors", _model_bytes(3))
    _write(root / "foreign.safetensors", st_save({"weight": torch.zeros(2, 2)}))
    payload_target = root / "unpickled-was-run"
    buffer = io.BytesIO()
    torch.save({"model": _Payload(str(payload_target))}, buffer)  # a torch checkpoint: zip + pickle
    _write(root / "model.pt", buffer.getvalue())
    _write(root / "plain.pkl", pickle.dumps(_Payload(str(payload_target))))
    _write(root / "unknown-keys.yaml", "epochs: 1\nlearning_rate: 0.1\n")
    _write(root / "delta.yaml", "model: acol\nmodel_options: {delta: 1.5}\n")
    _write(root / "broken.yaml", "epochs: [1, 2\nmodel: acol\n")
    return Corpus(root, data, rejects, payload_target)


# --------------------------------------------------------------------------- the commands


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Corpus], list[str]]
    message: str  # regex the single stderr line must match (failures), or "" for runs that go on
    env: Callable[[], dict[str, str]] = dict


def _closed_endpoint() -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "AWS_ACCESS_KEY_ID": "AKIAUNREACHABLE0000",
        "AWS_SECRET_ACCESS_KEY": "unreachable-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _localize(c: Corpus, model: str, data: str | None = None) -> list[str]:
    out = str(c.root / f"pred-{model}")
    return ["localize", "--model", str(c.root / model), "--data", data or c.data, "--output", out]


def _train(c: Corpus, *extra: str) -> list[str]:
    return ["train", "--data", c.data, "--storage", str(c.root / "runs"), *extra]


PROCEEDS = [
    Case("imagefolder-rejects", lambda c: ["prepare", "--source", "imagefolder", "--input", str(c.root / "images"),
         "--output", str(c.root / "out-imagefolder"), "-o", f"masks={c.root / 'masks'}", "-o", "class_names=[cat]"], ""),
    Case("nifti-rejects", lambda c: ["prepare", "--source", "nifti", "--input", str(c.root / "brats"),
         "--output", str(c.root / "out-nifti")], ""),
    Case("wsol-metadata-rejects", lambda c: ["prepare", "--source", "wsol-metadata", "--input", str(c.root / "wsol"),
         "--output", str(c.root / "out-wsol-metadata")], ""),
]  # fmt: skip

FAILS = [
    Case("all-inputs-rejected", lambda c: ["prepare", "--source", "imagefolder", "--input", str(c.root / "all-bad"),
         "--output", str(c.root / "out-all-bad")], r"no usable input: all 1 inputs were rejected"),
    Case("missing-input-root", lambda c: ["prepare", "--source", "imagefolder", "--input", str(c.root / "nowhere"),
         "--output", str(c.root / "out-nowhere")], r"input root .*nowhere does not exist"),
    Case("unknown-source-option", lambda c: ["prepare", "--output", str(c.root / "out-opt"), "-o", "subjects=3"],
         r"source 'phantom' has no option\(s\) subjects"),
    Case("unreachable-output", lambda c: ["prepare", "--output", "s3://acol-nowhere/data"],
         r"cannot reach S3 at http://127\.0\.0\.1:\d+ for bucket 'acol-nowhere'", _closed_endpoint),
    Case("unreachable-data", lambda c: ["train", "--data", "s3://acol-nowhere/data", "--storage", str(c.root / "runs")],
         r"cannot look up s3://acol-nowhere/data/_manifest\.json: .*NETWORK_CONNECTION", _closed_endpoint),
    Case("truncated-export", lambda c: _localize(c, "truncated.safetensors"),
         r"damaged model export: the file is truncated"),
    Case("torch-pickle-as-export", lambda c: _localize(c, "model.pt"), r"not a safetensors file"),
    Case("plain-pickle-as-export", lambda c: _localize(c, "plain.pkl"), r"not a safetensors file"),
    Case("foreign-safetensors", lambda c: _localize(c, "foreign.safetensors"), r"not an acol-flow model export"),
    Case("class-count-mismatch", lambda c: _localize(c, "three-classes.safetensors"),
         r"dataset has 2 classes, the model 3"),
    Case("evaluate-no-manifest", lambda c: ["evaluate", "--predictions", str(c.root / "no-manifest"),
         "--data", str(c.root / "no-manifest")], r"no _(manifest|SUCCESS)\.json at .*no-manifest"),
    Case("config-unknown-keys", lambda c: _train(c, "--config", str(c.root / "unknown-keys.yaml")),
         r"unknown config keys: learning_rate \(known: "),
    Case("config-delta-out-of-range", lambda c: _train(c, "--config", str(c.root / "delta.yaml")),
         r"delta must be in \(0, 1\), got 1\.5"),
    Case("config-not-yaml", lambda c: _train(c, "--config", str(c.root / "broken.yaml")), r"while parsing"),
    Case("run-name-leaves-storage", lambda c: _train(c, "--name", "../escaped"),
         r"run name must be a plain folder name"),
    Case("sweep-name-leaves-storage", lambda c: ["tune", "--space", str(SMOKE_SPACE), "--data", c.data, "--trials",
         "1", "--storage", str(c.root / "runs"), "--name", "../escaped"], r"sweep name must be a plain folder name"),
]  # fmt: skip


def _run(case: Case, corpus: Corpus) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "PREFECT_"))}
    env.update(HOME=str(corpus.root / "home"), **case.env())
    return subprocess.run(
        [ACOL, *case.argv(corpus)], env=env, capture_output=True, text=True, timeout=120, cwd=corpus.root
    )


@pytest.fixture(scope="module")
def results(corpus: Corpus) -> dict[str, subprocess.CompletedProcess]:
    """Every case's run; three at a time (each is a Python start-up, mostly imports)."""
    cases = PROCEEDS + FAILS
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda case: _run(case, corpus), cases))
    return {case.id: result for case, result in zip(cases, done, strict=True)}


@pytest.mark.parametrize("case", PROCEEDS, ids=[c.id for c in PROCEEDS])
def test_spoiled_items_are_recorded_rejects_of_a_run_that_goes_on(
    case: Case, corpus: Corpus, results: dict[str, subprocess.CompletedProcess]
) -> None:
    result = results[case.id]
    assert result.returncode == 0, result.stderr
    assert not driver_tracebacks(result.stderr)
    summary = json.loads(result.stdout)
    source = case.id.removesuffix("-rejects")
    expected = corpus.rejects[source]
    rejects = pq.read_table(Path(summary["output"]) / "_rejects.parquet").to_pylist()
    assert sorted(r["source"] for r in rejects) == sorted(expected)
    for reject in rejects:
        assert re.search(expected[reject["source"]], reject["reason"]), reject
    manifest = json.loads((Path(summary["output"]) / "_manifest.json").read_text())
    assert summary["rejected"] == manifest["rejected"] == len(expected)
    assert manifest["accepted"] + manifest["rejected"] == manifest["inputs"] and summary["accepted"] > 0


@pytest.mark.parametrize("case", FAILS, ids=[c.id for c in FAILS])
def test_input_that_stops_the_run_is_one_line_and_exit_2(
    case: Case, corpus: Corpus, results: dict[str, subprocess.CompletedProcess]
) -> None:
    result = results[case.id]
    verb = case.argv(corpus)[0]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    # One error line, last; before it at most the verb's own progress lines ("prepare (shards): 1/1", where
    # Ray's logs go) when stderr is not a terminal.
    *before, last = result.stderr.strip().splitlines()
    allowed = rf"{verb} \(\w+\): \d+/\d+|acol {verb}: Ray's logs go to .*|Token authentication is enabled.*"
    assert all(re.fullmatch(allowed, line) for line in before), result.stderr[-2000:]
    assert last.startswith(f"acol {verb}: error: ") and re.search(case.message, last), last
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "unreachable-secret" not in result.stderr


def test_failed_runs_wrote_nothing(corpus: Corpus, results: dict[str, subprocess.CompletedProcess]) -> None:
    assert all(results[c.id].returncode == 2 for c in FAILS)
    leftovers = sorted(
        p.name for p in corpus.root.iterdir() if p.name.startswith(("pred-", "runs", "escaped"))
    )
    assert leftovers == []
    assert sorted(os.listdir(corpus.root / "out-all-bad")) == ["_rejects.parquet"]  # the reasons, no dataset
    assert not (corpus.root / "out-nowhere").exists() and not (corpus.root / "out-opt").exists()
    assert not corpus.payload_target.exists(), "a pickle was loaded"
