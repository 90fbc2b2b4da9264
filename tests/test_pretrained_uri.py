"""Pretrained backbone weights from the S3 server, as a cluster uses them: ``acol train --pretrained
s3://...`` fetches the state dict once per node into a cache, loads it (weights only), trains with the
input normalisation the weights expect, and records that normalisation in the export for ``localize``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from acol_core.batch_localize import Localizer
from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.codec import encode_png
from acol_core.data.prepare import prepare_dataset
from acol_core.data.transforms import INPUT_NORMS, prepare_image, standardize
from acol_core.export import export_bytes, read_export_info
from acol_core.models import create_model
from acol_core.models.pretrained import fetch_pretrained
from acol_core.models.registry import create_backbone
from acol_core.storage import read_bytes, write_bytes
from acol_core.sweep.space import parse_space

ACOL = str(Path(sys.executable).parent / "acol")
PHANTOM = {"num_subjects": 4, "slices_per_subject": 4, "size": 32, "rows_per_shard": 16}


def _weights_bytes(seed: int = 7) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A saved RGB state dict (torchvision's layout: 3 input channels) for the tiny backbone."""
    torch.manual_seed(seed)
    state = create_backbone("tiny", in_channels=3).state_dict()
    state = {k: (torch.randn_like(v) if v.dtype.is_floating_point else v) for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


def test_fetch_caches_once_and_refetches_a_replaced_object(s3_server: str, tmp_path: Path) -> None:
    uri = f"{s3_server}/pretrained/cache-test.pth"
    data, _ = _weights_bytes()
    write_bytes(uri, data)
    path = Path(fetch_pretrained(uri, cache_dir=tmp_path))
    assert path == tmp_path / (hashlib.sha256(uri.encode()).hexdigest() + ".pth")
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
    os.utime(path, (1, 1))
    assert Path(fetch_pretrained(uri, cache_dir=tmp_path)).stat().st_mtime == 1  # reused, not fetched
    bigger, _ = _weights_bytes(seed=8)
    write_bytes(uri, bigger + b"\0" * 16)  # replaced (a different size)
    assert Path(fetch_pretrained(uri, cache_dir=tmp_path)).read_bytes() == bigger + b"\0" * 16
    local = tmp_path / "local.pth"
    local.write_bytes(data)
    assert fetch_pretrained(str(local)) == str(local)  # a path is used where it is


def test_input_norms_and_old_exports() -> None:
    x = np.full((2, 1, 4, 4), 0.5, np.float32)
    assert np.allclose(standardize(x), 0.0)  # the phantom's (x - 0.5) / 0.25
    grey = np.mean(INPUT_NORMS["imagenet"][0]), np.mean(INPUT_NORMS["imagenet"][1])
    assert np.allclose(standardize(x, "imagenet"), (0.5 - grey[0]) / grey[1])
    rgb = standardize(np.full((1, 3, 2, 2), 0.5, np.float32), "imagenet")
    assert np.allclose(
        rgb[0, :, 0, 0], [(0.5 - m) / s for m, s in zip(*INPUT_NORMS["imagenet"], strict=True)]
    )
    assert np.array_equal(standardize(x, "none"), x)
    assert TrainConfig(pretrained="w.pth").effective_input_norm == "imagenet"
    assert TrainConfig().effective_input_norm == "phantom"
    assert TrainConfig(pretrained="w.pth", input_norm="phantom").effective_input_norm == "phantom"
    # an export written before input_norm existed (neither in the info nor in the config): the phantom's
    from safetensors.torch import save

    model = create_model("cam", num_classes=2, backbone="tiny")
    data = export_bytes(model, TrainConfig(model="cam", image_size=32, pretrained="w.pth"), ["a", "b"])
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    info = json.loads(header["__metadata__"]["acol_flow"])
    assert info["input_norm"] == "imagenet"
    del info["input_norm"], info["config"]["input_norm"]
    old = save(model.state_dict(), metadata={"acol_flow": json.dumps(info)})
    assert read_export_info(old).input_norm == "phantom"


def test_localize_applies_the_exports_normalisation(tmp_path: Path) -> None:
    config = TrainConfig(model="cam", image_size=32, pretrained="s3://x/w.pth")  # auto -> imagenet
    model = create_model("cam", num_classes=2, backbone="tiny")
    uri = str(tmp_path / "model.safetensors")
    Path(uri).write_bytes(export_bytes(model, config, ["healthy", "tumour"]))
    localizer = Localizer(uri, device="cpu")
    assert localizer.info.input_norm == "imagenet"
    image = (np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) * 7) % 251
    rows = {"image_id": ["a"], "image": [encode_png(image)], "subject_id": ["s"], "slice_index": [0]}
    scores = localizer(rows).column("scores").to_pylist()[0]
    x = standardize(prepare_image(image, 1, 32)[None], "imagenet")
    with torch.no_grad():
        expected = torch.softmax(localizer.model(torch.from_numpy(x))["logits"], dim=1)[0]
    assert np.allclose(scores, expected.numpy(), atol=1e-6)
    with torch.no_grad():
        plain = torch.from_numpy(standardize(prepare_image(image, 1, 32)[None], "phantom"))
        phantom = torch.softmax(localizer.model(plain)["logits"], dim=1)[0]
    assert not np.allclose(scores, phantom.numpy(), atol=1e-6)  # the normalisation matters here


def test_sweep_space_takes_pretrained() -> None:
    space = parse_space(
        {
            "fixed": {"backbone": "tiny", "pretrained": "s3://bucket/w.pth", "input_norm": "imagenet"},
            "params": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        }
    )
    config = space.train_config({"lr": 0.005})
    assert config.pretrained == "s3://bucket/w.pth" and config.effective_input_norm == "imagenet"


def test_missing_pretrained_uri_fails_in_one_line_before_ray(s3_server: str, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    prepare_dataset("phantom", data, **PHANTOM)
    argv = ["train", "--data", data, "--storage", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*argv, "--pretrained", f"{s3_server}/pretrained/missing.pth"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no pretrained weights at" in lines[0] and "missing.pth" in lines[0], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_train_cli_with_pretrained_weights_on_s3(s3_server: str, tmp_path: Path) -> None:
    """A real ``acol train`` process (its own local Ray, one worker) with the weights on S3."""
    uri = f"{s3_server}/pretrained/tiny-rgb.pth"
    data_bytes, state = _weights_bytes()
    write_bytes(uri, data_bytes)
    data = f"{s3_server}/pretrained/data"
    prepare_dataset("phantom", data, **PHANTOM)
    config = tmp_path / "train.yaml"
    # A learning rate so small that the backbone's conv kernels stay the loaded ones: proof they were.
    config.write_text("image_size: 32\nbatch_size: 8\naugment: false\nlr: 1.0e-12\nepochs: 1\n")
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="apr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ACOL_PRETRAINED_CACHE")}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    argv = [ACOL, "train", "--data", data, "--storage", f"{s3_server}/pretrained/runs", "--name", "pre"]
    argv += ["--model", "cam", "--backbone", "tiny", "--config", str(config), "--pretrained", uri]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{\n") :])
    # fetched once into the node's cache under $HOME
    cached = (
        home / ".cache" / "acol-flow" / "pretrained" / (hashlib.sha256(uri.encode()).hexdigest() + ".pth")
    )
    assert cached.read_bytes() == data_bytes
    info = read_export_info(read_bytes(summary["model"]))
    assert info.config.pretrained == uri and info.input_norm == "imagenet"
    assert "0.449" in info.normalization or "0.485" in info.normalization
    from acol_core.export import load_exported

    model, _ = load_exported(summary["model"])
    trained = model.backbone.state_dict()
    for key, value in state.items():
        if value.dim() == 4 and key != "block1.0.weight":  # conv kernels (the first one is adapted to grey)
            torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0, msg=key)
    first = trained["block1.0.weight"]
    torch.testing.assert_close(
        first, state["block1.0.weight"].mean(dim=1, keepdim=True) * 3, atol=1e-6, rtol=0
    )
