"""`ray job submit -- acol train` against a real Ray head started by this test, token auth on.

The head runs from the project's venv (so the job's `acol` and `python` are ours) with its own temp dir
and its own HOME (the auth token goes to ``$HOME/.ray/auth_token``: the user's is never touched), on
free ports. It is stopped by its process group, never with ``ray stop`` (that would kill every Ray on
the host, other test sessions' included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from acol_core.checkpoints import HISTORY_FILE, read_checkpoint_epochs
from acol_core.data.prepare import prepare_dataset
from acol_core.export import MODEL_FILE, load_exported

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # what clients of this head run with (HOME with the token, auth mode, PATH)
    token: str


def _stop_group(pgid: int, grace_s: float = 4.0) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
        if not [s for s in alive.split() if not s.startswith("Z")]:
            return
        time.sleep(0.3)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    if not RAY.exists():
        pytest.skip(f"no ray CLI at {RAY}")
    # Short paths: Ray's socket paths under the temp dir must stay below 107 characters.
    home = tempfile.mkdtemp(prefix="arh", dir="/tmp")
    temp_dir = tempfile.mkdtemp(prefix="art", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        HOME=home,
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    # With RAY_AUTH_MODE=token, `ray start` wants the token to exist: generate it into $HOME/.ray.
    subprocess.run(
        [str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    token = (Path(home) / ".ray" / "auth_token").read_text().strip()
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        # Defaults are fixed ports (52365, 10001) that another head on this host may hold.
        "--dashboard-agent-listen-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    command = [
        str(RAY),
        "start",
        "--head",
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    for flag, port in ports.items():
        command += [flag, str(port)]
    # A new session: every process of this head (GCS, raylet, dashboard, workers) shares its group id.
    start = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pgid = start.pid
    try:
        output, _ = start.communicate(timeout=120)
        if start.returncode != 0:
            pytest.fail(f"ray start failed:\n{output[-3000:]}")
        yield Head(f"http://127.0.0.1:{dashboard_port}", env, token)
    finally:
        if start.poll() is None:
            start.kill()
        _stop_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_head_refuses_requests_without_the_token(ray_head: Head) -> None:
    assert _get(f"{ray_head.dashboard}/api/jobs/", None)[0] in (401, 403)
    assert _get(f"{ray_head.dashboard}/api/jobs/", ray_head.token)[0] == 200


def test_submitted_train_job_writes_checkpoint_and_metrics(ray_head: Head, tmp_path: Path) -> None:
    data, storage = str(tmp_path / "data"), str(tmp_path / "runs")
    prepare_dataset("phantom", data, num_subjects=6, slices_per_subject=4, size=32, rows_per_shard=16)
    config = tmp_path / "train.yaml"
    config.write_text("image_size: 32\nbatch_size: 8\naugment: true\nseed: 1\n")
    command = [
        str(RAY),
        "job",
        "submit",
        "--address",
        ray_head.dashboard,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--",
        "acol",
        "train",
        "--data",
        data,
        "--storage",
        storage,
        "--name",
        "job",
        "--model",
        "acol",
        "--backbone",
        "tiny",
        "--delta",
        "0.6",
        "--epochs",
        "1",
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--config",
        str(config),
    ]
    try:
        done = subprocess.run(
            command, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{str(exc.stdout)[-3000:]}")
    output = done.stdout + done.stderr
    submission = re.search(r"raysubmit_\w+", output)
    assert submission, output[-3000:]
    status, body = _get(f"{ray_head.dashboard}/api/jobs/{submission.group()}", ray_head.token)
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body[-2000:]
    assert done.returncode == 0
    status, body = _get(f"{ray_head.dashboard}/api/jobs/{submission.group()}/logs", ray_head.token)
    logs = json.loads(body)["logs"]
    # acol train's JSON summary, the last thing the entrypoint prints
    summary = json.loads(logs[logs.rindex('{\n  "run"') :].split("\n}\n")[0] + "\n}")
    assert summary["epochs"] == 1 and summary["model"].endswith(MODEL_FILE)

    run = os.path.join(storage, "job")
    epochs = read_checkpoint_epochs(run)
    assert list(epochs.values()) == [0]
    checkpoint = os.path.join(run, next(iter(epochs)))
    history = json.loads(Path(checkpoint, HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [0.0]
    assert history[0]["train_images"] > 0 and 0.0 <= history[0]["val_accuracy"] <= 1.0
    model, info = load_exported(os.path.join(checkpoint, MODEL_FILE))
    assert info.config.model_options == {"delta": 0.6} and info.config.image_size == 32
