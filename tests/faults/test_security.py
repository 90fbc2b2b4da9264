"""Security properties that need no running service: what our code and configs bind to, that no
checkpoint is ever unpickled, and that ids and paths from the data cannot reach outside their roots.

Credentials in outputs are grepped where real runs happen: test_train_outage.py (`acol train` on S3,
Ray's session logs) and test_ray_faults.py (dataset, model, predictions and metrics on S3). The Prefect
ephemeral server's listening sockets are checked in test_preprocess_outage.py.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from acol_core.checkpoints import (
    HISTORY_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint_state,
    read_checkpoint_epochs,
)
from acol_core.config import TrainConfig
from acol_core.data.schema import Record, Reject
from acol_core.data.shards import write_dataset
from acol_core.data.sources import get_source
from acol_core.export import MODEL_FILE, export_bytes
from acol_core.models import create_model
from acol_core.predictions import encode_cam, encode_mask, predictions_to_nifti, write_predictions
from acol_core.train import checkpoint_bytes

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["acol_core", "flows", "tune", "cluster", "benchmarks", "Makefile", "README.md", "pyproject.toml"]
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        path = REPO / name
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [
        p
        for p in files
        if p.suffix in ("", ".py", ".md", ".yaml", ".yml", ".toml") and "__pycache__" not in p.parts
    ]


# --------------------------------------------------------------------------- bind addresses


# The one exception: inside Kubernetes the RayJob's head must answer KubeRay's submitter pod through the
# head service (cluster-internal), so its dashboard listens on the pod's interfaces, with token auth.
_KUBERNETES_POD = {"cluster/rayjob.yaml", "cluster/README.md"}


def test_nothing_we_ship_binds_all_interfaces() -> None:
    files = _shipped_files()
    assert len(files) > 30
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if re.search(r"0\.0\.0\.0|\[::\]|host\s*[=:]\s*[\"']?::[\"']?\b", line)
        and str(p.relative_to(REPO)) not in _KUBERNETES_POD
    ]
    assert not hits, hits


def test_every_ray_head_we_start_keeps_its_dashboard_on_loopback() -> None:
    heads = []
    for path in _shipped_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"ray start\b.*--head", line):
                heads.append((f"{path.relative_to(REPO)}:{i}", line))
                assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", line), (path, i, line)
    assert {where.split(":")[0] for where, _ in heads} >= {
        "cluster/README.md",
        "cluster/ray-cluster-aws.yaml",
    }
    # The RayJob's head is the Kubernetes exception (see _KUBERNETES_POD): reachable inside the cluster,
    # so every container there, the submitter's too, must run with token authentication.
    rayjob = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] in ("127.0.0.1", "0.0.0.0")
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    templates.append(rayjob["spec"]["submitterPodTemplate"])
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], container["name"]


def test_in_process_ray_and_prefect_servers_default_to_loopback() -> None:
    """``ray.init`` calls either start no dashboard or keep Ray's default host (127.0.0.1); the Prefect
    server we document is started without --host, so its default must be loopback."""
    for path in _shipped_files():
        if path.suffix != ".py":
            continue
        text = path.read_text()
        for call in re.findall(r"ray\.init\((.*?)\)\n", text, flags=re.S):
            host = re.search(r"dashboard_host\s*=\s*([^,)]+)", call)
            assert host is None or host.group(1).strip("'\" ") in _LOOPBACK, (path, call)
        for line in re.findall(r".*prefect server start.*", text):
            host = re.search(r"--host[= ](\S+)", line)
            assert host is None or host.group(1) in _LOOPBACK, (path, line)
    import inspect

    import ray

    assert inspect.signature(ray.init).parameters["dashboard_host"].default in _LOOPBACK
    settings = (
        Path(pytest.importorskip("pydantic").__file__).parents[1] / "prefect/settings/models/server/api.py"
    )
    # Read, not imported: Prefect reads its settings on import, and this process never imports Prefect.
    assert re.search(r'host: str = Field\(\s*default="127\.0\.0\.1"', settings.read_text())


# --------------------------------------------------------------------------- checkpoints are never unpickled


class _Payload:
    """Unpickling this runs ``open(path, "w")``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _checkpoint_folder(run: Path, state: bytes) -> None:
    folder = run / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    config = TrainConfig(model="cam", image_size=32)
    model = create_model("cam", num_classes=2, in_channels=1, backbone="tiny")
    (folder / STATE_FILE).write_bytes(state)
    (folder / MODEL_FILE).write_bytes(export_bytes(model, config, ["a", "b"]))
    (folder / HISTORY_FILE).write_text("[]")


@pytest.mark.parametrize("kind", ["torch-save-with-object", "plain-pickle"])
def test_a_planted_checkpoint_is_refused_and_not_run(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "payload-ran"
    payload = {"epoch": 0, "model": _Payload(str(target))}
    if kind == "plain-pickle":
        state = pickle.dumps(payload, protocol=2)
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        state = buffer.getvalue()
    _checkpoint_folder(tmp_path / "run", state)
    with pytest.raises(
        CheckpointError, match=r"state\.pt: not a checkpoint this code wrote, or damaged"
    ) as err:
        read_checkpoint_epochs(str(tmp_path / "run"))  # resuming loads state.pt the same way
    assert isinstance(err.value.__cause__, pickle.UnpicklingError) and "\n" not in str(err.value)
    assert not target.exists()


def test_a_truncated_checkpoint_is_a_clear_error_not_a_partial_state() -> None:
    good = checkpoint_bytes({"epoch": 3, "model": {"w": torch.ones(64, 64)}})
    assert load_checkpoint_state(good, "ok")["epoch"] == 3
    for cut in (good[: len(good) // 2], good[:100], b""):
        with pytest.raises(CheckpointError, match="cut: not a checkpoint this code wrote, or damaged"):
            load_checkpoint_state(cut, "cut")


def test_incomplete_checkpoint_folders_are_not_checkpoints(tmp_path: Path) -> None:
    """What an upload cut short leaves (the outage test on S3 makes them for real)."""
    run = tmp_path / "run"
    _checkpoint_folder(run, checkpoint_bytes({"epoch": 0}))
    partial = run / "checkpoint_2026-01-01_00-00-01.000000"
    partial.mkdir()
    (partial / HISTORY_FILE).write_text("[]")  # state.pt and the model never arrived
    assert list(read_checkpoint_epochs(str(run)).values()) == [0]


# --------------------------------------------------------------------------- ids and paths from the data


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "mask_path",
    ["../outside.png", "img/../../outside.png", "/etc/passwd", "C:/outside.png", "img\\..\\..\\x.png"],
)
def test_annotation_paths_cannot_leave_the_input_root(mask_path: str, tmp_path: Path) -> None:
    root = tmp_path / "wsol"
    (root / "img").mkdir(parents=True)
    image = np.zeros((8, 8), np.uint8)
    (root / "img" / "a.png").write_bytes(_png(image))
    (tmp_path / "outside.png").write_bytes(_png(image))
    (root / "image_ids.txt").write_text("img/a.png\n")
    (root / "class_labels.txt").write_text("img/a.png,0\n")
    (root / "localization.txt").write_text(f"img/a.png,{mask_path},\n")
    source = get_source("wsol-metadata", root=str(root), class_names=["a"])
    out = source.read_input(source.list_inputs()[0].key)
    assert isinstance(out, Reject) and "escapes the input root" in out.reason, out


def test_image_names_with_dots_stay_inside_the_root(tmp_path: Path) -> None:
    """File names that look like traversal (``..x``, ``a..b``) are plain names: read, and kept as ids."""
    root = tmp_path / "images"
    for name in ("a..b.png", "..x.png", "...png"):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        (root / "cat" / name).write_bytes(_png(np.full((4, 4), 7, np.uint8)))
    source = get_source("imagefolder", root=str(root))
    outs = [source.read_input(ref.key) for ref in source.list_inputs()]
    # Names starting with a dot are hidden files: not listed, so not read.
    assert [o[0].image_id for o in outs] == ["cat/a..b.png"]


@pytest.mark.parametrize("subject", ["../../outside", "/abs/outside", "..", "a/../../b", "sub\\..\\..\\x"])
def test_subject_ids_cannot_write_outside_the_nifti_output(subject: str, tmp_path: Path) -> None:
    """``localize --nifti-out`` names one file per subject: a crafted id must stay a file name."""
    data, pred, out = tmp_path / "data", tmp_path / "pred", tmp_path / "deep" / "out"
    records = [
        Record(
            image_id=f"{subject}|z{z}",
            image=np.full((4, 5), 9, np.uint8),
            label=0,
            split="test",
            subject_id=subject,
            slice_index=z,
            volume_shape=(5, 4, 2),
            affine=np.eye(4),
        )
        for z in range(2)
    ]
    write_dataset(records, str(data), ["a", "b"], {"source": "crafted"})
    rows = {
        "image_id": [r.image_id for r in records],
        "pred_label": [0, 0],
        "scores": [[1.0, 0.0]] * 2,
        "cam": [encode_cam(np.ones((4, 5)))] * 2,
        "mask": [encode_mask(np.ones((4, 5), np.uint8))] * 2,
        "boxes": [[[0, 0, 4, 3]]] * 2,
        "cam_gt": [None, None],
        "model": ["cam"] * 2,
        "checkpoint": ["x"] * 2,
        "subject_id": [subject] * 2,
        "slice_index": [0, 1],
        "height": [4, 4],
        "width": [5, 5],
    }
    import pyarrow as pa

    from acol_core.predictions import PREDICTION_SCHEMA

    meta = {"model": "cam", "checkpoint": "x", "data": str(data), "splits": ["test"], "threshold": 0.5}
    write_predictions(
        [pa.Table.from_pydict(rows, schema=PREDICTION_SCHEMA)], str(pred), class_names=["a", "b"], **meta
    )
    written = predictions_to_nifti(str(pred), str(data), str(out), orientation="canonical")
    assert len(written) == 2
    for uri in written:
        path = Path(uri).resolve()
        assert path.parent == out.resolve() and path.exists(), uri
    every_file = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.parts[0] in ("data", "pred", "deep") for p in every_file), every_file
    assert json.loads((pred / "_SUCCESS.json").read_text())["num_rows"] == 2
