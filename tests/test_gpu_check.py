"""``scripts/gpu-check``: the one command that proves the GPU path. CI runs its ``--dry-run`` (the same
steps on CPU: DDP with gloo on 2 workers, a localize job with 2 actors, the JSON report); without a GPU
the real mode stops at once with one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHON=sys.executable, HOME=str(home))
    return env


@pytest.mark.integration
def test_dry_run_trains_localizes_and_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    ray_tmp = tempfile.mkdtemp(prefix="agc", dir="/tmp")  # Ray's socket paths must stay short
    env = _env(tmp_path) | {"RAY_TMPDIR": ray_tmp}
    try:
        done = subprocess.run(
            [str(SCRIPT), "--dry-run", "--output", str(output), "--workdir", str(tmp_path / "work")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gpu-check (dry-run): ok" in done.stdout
    report = json.loads(output.read_text())
    assert report["ok"] is True and report["mode"] == "dry-run"
    assert set(report["steps"]) == {"cuda", "train", "localize"}
    train = report["steps"]["train"]
    assert train["workers"] == 2 and train["backend"] == "gloo" and train["epochs"] == 2
    assert train["images_per_s"] > 0 and train["train_loss"] == train["train_loss"]  # not NaN
    localize = report["steps"]["localize"]
    assert localize["actors"] == 2 and localize["rows"] == 16 and localize["rows_per_s"] > 0
    # the run's checkpoints and the predictions are where --workdir put them
    assert any(p.name == "model.safetensors" for p in (tmp_path / "work" / "runs").rglob("*"))
    assert (tmp_path / "work" / "predictions" / "_SUCCESS.json").exists()


def test_without_a_gpu_the_real_mode_fails_in_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real mode would run")
    output = tmp_path / "report.json"
    done = subprocess.run(
        [str(SCRIPT), "--output", str(output)],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error:") and "no CUDA" in lines[0], lines
    assert not output.exists()
