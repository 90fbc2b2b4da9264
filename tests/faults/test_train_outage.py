"""`acol train` against S3 that goes away mid-checkpoint, then a driver SIGKILLed mid-checkpoint, then
the same command again.

Checkpoints go to this module's own moto server, behind a gate that can cut it off:

1. Run 1 (3 epochs): S3 is cut off on the second request of the epoch-1 checkpoint upload and comes
   back 1.5 s later. Ray retries (the upload, or the worker group from the epoch-0 checkpoint) and
   registers epoch 1. The epoch-2 upload is then held by the gate and the driver is SIGKILLed (with
   its local Ray) as soon as epoch 1 is registered.
2. Run 2, the same command: resumes from epoch 1 and finishes epoch 2.

Each epoch has exactly one registered checkpoint, all complete and loadable; the cut and the killed
uploads leave no registered folder; no credential (fake AWS keys, the Ray token) is in any file of the
run, on S3 or local, nor in its output. (A run that cannot recover, the clear one-line error: see
test_ray_faults.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from faultkit import (
    ACOL,
    FAKE_ACCESS_KEY,
    FAKE_SECRET_KEY,
    MotoServer,
    S3Gate,
    cli_env,
    kill_group,
    readable_forms,
    s3_env,
)

from acol_core.data.prepare import prepare_dataset
from acol_core.export import load_exported
from acol_core.storage import join, read_bytes
from acol_core.train import load_checkpoint_bytes

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 180
# 24 train rows (3 batches of 8), no val rows: no scoring pass per epoch (this module is about storage).
PHANTOM = {
    "num_subjects": 6,
    "slices_per_subject": 4,
    "size": 32,
    "rows_per_shard": 8,
    "split_fractions": (1, 0, 0),
}
CONFIG = {"image_size": 32, "batch_size": 8, "augment": False, "num_threads": 1}
RUN = "s3://faults/runs/outage"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CHECKPOINT = re.compile(rb"(?:PUT|POST) /faults/runs/outage/(checkpoint_\d[^/ ?]*)/")


@dataclass
class Scenario:
    runs: list[subprocess.CompletedProcess] = field(default_factory=list)
    cut_requests: list[str] = field(default_factory=list)  # the checkpoint folder cut off by the outage
    held: list[str] = field(default_factory=list)  # the checkpoint folder whose upload the kill interrupted
    killed_at: dict = field(default_factory=dict)  # the snapshot when the driver was killed
    objects: dict[str, bytes] = field(default_factory=dict)  # every S3 object at the end
    local_files: dict[str, bytes] = field(default_factory=dict)  # the runs' Ray session files and HOME
    token: str = ""


def _folders(data: bytes) -> list[str]:
    return [m.decode() for m in _CHECKPOINT.findall(data)]


def _registered(fs: pafs.FileSystem, folder: str, timeout: float = 60.0) -> None:
    """Wait until Ray's snapshot lists ``folder`` (the controller saved it as a checkpoint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = _snapshot(fs).get("checkpoint_results", [])
        if folder in [r["checkpoint_dir_name"] for r in results]:
            return
        time.sleep(0.1)


def _wait_latest_epoch(fs: pafs.FileSystem, epoch: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _latest_epoch(_snapshot(fs)) == epoch:
            return True
        time.sleep(0.1)
    return False


def _outage_handler(fs: pafs.FileSystem, gate: S3Gate, cut: list[str]) -> Callable[[bytes], str]:
    """Cut S3 on the second upload request of the second checkpoint (once the first is registered),
    restore it 1.5 s later.

    The first request of the second checkpoint is held until the controller has saved the first one:
    epochs of this tiny model take well under a second, and the test needs a registered checkpoint
    before the outage, whatever the machine's speed.
    """
    requests: dict[str, int] = {}

    def handler(data: bytes) -> str:
        for folder in _folders(data):
            requests[folder] = requests.get(folder, 0) + 1
            first = list(requests)[0]
            if folder != first and requests[folder] == 1:
                _registered(fs, first)
            elif folder != first and not cut:
                cut.append(folder)
                threading.Timer(1.5, gate.restore).start()
                return "cut"
        return "pass"

    return handler


def _hold_handler(
    fs: pafs.FileSystem,
    handler: Callable[[bytes], str],
    seen: list[str],
    release: threading.Event,
    held: list[str],
) -> Callable[[bytes], str]:
    """``handler``, except for the epoch-2 checkpoint: its upload is held until ``release``, then its
    requests are dropped (also those of workers that outlive their killed driver for a moment).

    A new folder after epoch 1 is registered is epoch 2's; a new folder while epoch 0 is still the
    latest is epoch 1 trained again (Ray restarted the workers after the outage) and goes through.
    """

    def hold(data: bytes) -> str:
        new = [f for f in _folders(data) if f not in seen]
        if len(seen) < 2 or not new or (held and new[0] != held[0]):
            return handler(data)
        if not held:
            if not _wait_latest_epoch(fs, 1.0, timeout=30.0):
                return handler(data)
            held.append(new[0])
        release.wait(RUN_TIMEOUT_S)
        return "drop"

    return hold


def _snapshot(fs: pafs.FileSystem) -> dict:
    path = "faults/runs/outage/checkpoint_manager_snapshot.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _latest_epoch(snapshot: dict) -> float | None:
    latest = snapshot.get("latest_checkpoint_result") or {}
    return (latest.get("metrics") or {}).get("epoch")


def _files_under(root: Path) -> dict[str, bytes]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.name.endswith((".sock", ".lock")):
            try:
                out[str(path)] = path.read_bytes()
            except OSError:
                continue  # sockets, files removed while walking
    return out


def _run(
    command: list[str], env: dict[str, str], out: Path, *, kill_when: Callable[[], bool] | None = None
) -> subprocess.CompletedProcess:
    """Run the command in its own process group; SIGKILL the group once ``kill_when()`` is true."""
    with open(out.with_suffix(".out"), "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if kill_when is not None and kill_when():
                    kill_group(proc)
                    break
                time.sleep(0.2)
        finally:
            timed_out = proc.poll() is None
            kill_group(proc)
    err = _ANSI.sub("", out.with_suffix(".err").read_text(errors="replace"))
    if timed_out:
        pytest.fail(f"{command[1]} did not finish within {RUN_TIMEOUT_S} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out.with_suffix(".out").read_text(), err)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("train-outage")
    data = str(root / "data")
    prepare_dataset("phantom", data, **PHANTOM)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    command = [ACOL, "train", "--data", data, "--storage", "s3://faults/runs", "--name", "outage"]
    command += ["--epochs", "3", "--config", str(config), "--keep-checkpoints", "10", "--max-failures", "1"]
    result = Scenario(token=os.environ.get("RAY_AUTH_TOKEN", ""))
    env_patch = pytest.MonkeyPatch()
    with MotoServer(root) as moto, S3Gate(moto.port) as gate, cli_env(root / "home") as env:
        env.update(s3_env(gate.endpoint))
        # This process reads the bucket directly (never through the gate).
        for key, value in s3_env(f"http://127.0.0.1:{moto.port}").items():
            env_patch.setenv(key, value)
        direct = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{moto.port}",
            scheme="http",
            region="us-east-1",
            access_key=FAKE_ACCESS_KEY,
            secret_key=FAKE_SECRET_KEY,
        )
        try:
            # Folders seen in order: epoch 0's, then epoch 1's (cut, retried); the next one is held.
            seen: list[str] = []
            outage = _outage_handler(direct, gate, result.cut_requests)

            def record(data: bytes) -> str:
                seen.extend(f for f in _folders(data) if f not in seen)
                return outage(data)

            release = threading.Event()
            gate.on_request(_hold_handler(direct, record, seen, release, result.held))

            def epoch_1_registered() -> bool:
                snapshot = _snapshot(direct)
                if _latest_epoch(snapshot) == 1.0 and result.held:
                    result.killed_at = snapshot
                    return True
                return False

            try:
                result.runs.append(_run(command, env, root / "run1", kill_when=epoch_1_registered))
            finally:
                release.set()
            result.runs.append(_run(command, env, root / "run2"))
            infos = direct.get_file_info(pafs.FileSelector("faults", recursive=True))
            for info in infos:
                if info.type == pafs.FileType.File:
                    with direct.open_input_stream(info.path) as f:
                        result.objects[info.path] = f.read()
            result.local_files = _files_under(Path(env["RAY_TMPDIR"])) | _files_under(root / "home")
            yield result
        finally:
            env_patch.undo()


def test_storage_outage_at_checkpoint_is_retried(scenario: Scenario) -> None:
    assert scenario.cut_requests, "the outage was never triggered"
    # The run went on after S3 came back: epoch 1 was registered (by a retried upload, or after the
    # workers restarted from epoch 0), in a complete folder.
    registered = {
        r["metrics"]["epoch"]: r["checkpoint_dir_name"] for r in scenario.killed_at["checkpoint_results"]
    }
    assert sorted(registered) == [0.0, 1.0]
    for folder in registered.values():
        names = {
            p.rsplit("/", 1)[-1] for p in scenario.objects if p.startswith(f"faults/runs/outage/{folder}/")
        }
        assert names == {"state.pt", "model.safetensors", "history.json"}, folder


def test_killed_driver_resumes_and_registers_every_epoch_once(scenario: Scenario) -> None:
    killed, final = scenario.runs
    # Killed while the epoch-2 checkpoint was being uploaded (its upload held by the gate).
    assert killed.returncode == -9 and _latest_epoch(scenario.killed_at) == 1.0 and scenario.held
    assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads(final.stdout)
    assert summary["run"] == RUN and summary["epochs"] == 3
    history = json.loads(read_bytes(join(summary["latest_checkpoint"], "history.json")))
    assert [h["epoch"] for h in history] == [0.0, 1.0, 2.0]
    # Epochs 0 and 1 were not trained again: their metrics are the ones the killed runs registered.
    registered = {r["metrics"]["epoch"]: r["metrics"] for r in scenario.killed_at["checkpoint_results"]}
    for h in history[:2]:
        assert h["train_loss"] == registered[h["epoch"]]["train_loss"], h["epoch"]

    # Each epoch has exactly one complete checkpoint folder, and those are the ones Ray registered.
    folders: dict[str, set[str]] = {}
    for path in scenario.objects:
        parts = path.split("/")
        if len(parts) == 5 and parts[3].startswith("checkpoint_"):
            folders.setdefault(parts[3], set()).add(parts[4])
    complete = {
        name for name, files in folders.items() if {"state.pt", "model.safetensors", "history.json"} <= files
    }
    epochs = sorted(
        int(load_checkpoint_bytes(scenario.objects[f"faults/runs/outage/{name}/state.pt"])["epoch"])
        for name in complete
    )
    assert epochs == [0, 1, 2]
    snapshot = json.loads(scenario.objects["faults/runs/outage/checkpoint_manager_snapshot.json"])
    assert {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]} == complete
    # Anything else is an unregistered leftover of the cut or the killed upload, never a complete folder.
    assert set(folders) - complete <= set(scenario.cut_requests + scenario.held)


def test_latest_checkpoint_is_complete_and_loadable(scenario: Scenario) -> None:
    summary = json.loads(scenario.runs[1].stdout)
    latest = summary["latest_checkpoint"]
    state = load_checkpoint_bytes(read_bytes(join(latest, "state.pt")))
    model, info = load_exported(join(latest, "model.safetensors"))
    assert state["epoch"] == 2 and info.extra["epoch"] == 2
    for key, value in model.state_dict().items():
        assert value.equal(state["model"][key]), key


def test_no_credential_in_any_output(scenario: Scenario) -> None:
    secrets = [FAKE_ACCESS_KEY.encode(), FAKE_SECRET_KEY.encode()]
    if scenario.token:
        secrets.append(scenario.token.encode())
    outputs = {f"s3://{k}": v for k, v in scenario.objects.items()} | scenario.local_files
    for i, run in enumerate(scenario.runs, 1):
        outputs[f"run{i} stdout"] = run.stdout.encode()
        outputs[f"run{i} stderr"] = run.stderr.encode()
    assert scenario.objects and scenario.local_files  # something was scanned
    leaks = [
        name
        for name, data in outputs.items()
        for form in readable_forms(name, data)
        for secret in secrets
        if secret in form
    ]
    assert not leaks, sorted(set(leaks))
