"""The Prefect preprocess flow: ephemeral runs (clean, shard retried, retries exhausted) and deployments
run against a real Prefect server (process worker from flows/prefect.yaml; ``prefect flow serve`` to S3).

Prefect reads its settings when first imported, so every flow run happens in a subprocess with its own
``PREFECT_HOME``; the pytest process never imports Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect_server import PREFECT, prefect_env, prefect_server_at, run, start, stop, wait_until

from acol_core import storage
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import MANIFEST_NAME, DatasetError, Manifest, open_dataset, read_manifest

PHANTOM = {"num_subjects": 4, "slices_per_subject": 4, "size": 64}
ROWS_PER_SHARD = 4  # 16 one-row inputs -> 4 shards
FLAKY_SHARD = 2
SHARD_RETRIES = 3  # flows.preprocess.SHARD_RETRIES (not imported: that would import Prefect here)

# Runs four flows in one ephemeral API: clean, shard FLAKY_SHARD failing once, failing every time, and
# an external cohort (every subject in test).
# run_shard is wrapped in the flow's process: the shard task calls it through the prepare module.
_EPHEMERAL_SCRIPT = """
import json, sys
import acol_core.data.prepare as prepare
import flows.preprocess as fp

root, options = sys.argv[1], json.loads(sys.argv[2])
rows_per_shard, flaky = int(sys.argv[3]), int(sys.argv[4])
real_run_shard = prepare.run_shard
calls, fail = {}, {"once": None, "always": None}

def run_shard(plan, index, source=None):
    calls[index] = calls.get(index, 0) + 1
    if index == fail["always"] or (index == fail["once"] and calls[index] == 1):
        raise OSError(f"injected failure in shard {index}")
    return real_run_shard(plan, index, source)

prepare.run_shard = run_shard
report = {}
for case in ("clean", "retry", "exhausted", "external"):
    calls.clear()
    fail["once"] = flaky if case == "retry" else None
    fail["always"] = flaky if case == "exhausted" else None
    if case == "exhausted":  # same retries, no back-off: only the waiting is cut
        fp.shard_task = fp.shard_task.with_options(retry_delay_seconds=0)
    # "external": every subject into test, the fullsup count left to its (scaled) default.
    split = {"split": "test"} if case == "external" else {"fullsup_per_class": 1}
    state = fp.preprocess(output_uri=f"{root}/{case}", source_options=options,
                          rows_per_shard=rows_per_shard, return_state=True, **split)
    summary = state.result() if state.is_completed() else None
    report[case] = {"state": state.type.value, "summary": summary, "calls": calls.copy()}
print("REPORT " + json.dumps(report))
"""


def _shard_digests(manifest: Manifest) -> list[tuple[str, int, str]]:
    return [(s.name, s.rows, s.sha256) for s in manifest.shards]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """What ``acol prepare`` writes for the flow's arguments."""
    uri = str(tmp_path_factory.mktemp("reference") / "data")
    return prepare_dataset("phantom", uri, rows_per_shard=ROWS_PER_SHARD, fullsup_per_class=1, **PHANTOM)


def _assert_same_dataset(uri: str, reference: Manifest) -> None:
    dataset = open_dataset(uri)  # verifies every shard's sha256
    assert _shard_digests(dataset.manifest) == _shard_digests(reference)
    assert dataset.manifest.rejects.sha256 == reference.rejects.sha256
    assert dataset.manifest.counts == reference.counts
    assert dataset.num_rows == reference.num_rows == 16


# --------------------------------------------------------------------------- ephemeral (no server)


@pytest.fixture(scope="module")
def ephemeral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("ephemeral")
    args = [str(root / "out"), json.dumps(PHANTOM), str(ROWS_PER_SHARD), str(FLAKY_SHARD)]
    proc = run(
        [sys.executable, "-c", _EPHEMERAL_SCRIPT, *args],
        prefect_env(root / "prefect-home", None),
        timeout=150,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out", json.loads(lines[-1].removeprefix("REPORT "))


def test_ephemeral_flow_writes_what_prepare_writes(ephemeral: tuple[Path, dict], reference: Manifest) -> None:
    out, report = ephemeral
    clean = report["clean"]
    assert clean["state"] == "COMPLETED"
    assert clean["calls"] == {str(k): 1 for k in range(4)}
    _assert_same_dataset(str(out / "clean"), reference)
    assert clean["summary"] == {
        "output_uri": str(out / "clean"),
        "inputs": 16,
        "accepted": 16,
        "rejected": 0,
        "rows": 16,
        "shards": 4,
        "split_counts": reference.split_counts,
        "fullsup": reference.counts["fullsup"],
    }


def test_ephemeral_shard_failing_once_is_retried(ephemeral: tuple[Path, dict], reference: Manifest) -> None:
    out, report = ephemeral
    retry = report["retry"]
    assert retry["state"] == "COMPLETED"
    assert retry["calls"] == {"0": 1, "1": 1, str(FLAKY_SHARD): 2, "3": 1}
    _assert_same_dataset(str(out / "retry"), reference)


def test_ephemeral_shard_failing_always_fails_the_flow(ephemeral: tuple[Path, dict]) -> None:
    out, report = ephemeral
    exhausted = report["exhausted"]
    assert exhausted["state"] == "FAILED"
    assert exhausted["calls"][str(FLAKY_SHARD)] == 1 + SHARD_RETRIES
    assert not (out / "exhausted" / MANIFEST_NAME).exists()  # no manifest, no dataset
    with pytest.raises(DatasetError):
        read_manifest(str(out / "exhausted"))


def test_ephemeral_flow_takes_an_external_cohort(ephemeral: tuple[Path, dict], tmp_path: Path) -> None:
    out, report = ephemeral
    external = report["external"]
    assert external["state"] == "COMPLETED"
    assert external["summary"]["split_counts"] == {"train": 0, "val": 0, "test": 16}
    assert external["summary"]["fullsup"] == 0  # no val rows, nothing to mark
    manifest = read_manifest(str(out / "external"))
    assert manifest.preparation["split_policy"] == {"mode": "single", "split": "test"}
    same = prepare_dataset(
        "phantom", str(tmp_path / "ref"), rows_per_shard=ROWS_PER_SHARD, split="test", **PHANTOM
    )
    _assert_same_dataset(str(out / "external"), same)


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A Prefect server on a free port; yields the client environment and a log folder."""
    with prefect_server_at(tmp_path_factory.mktemp("prefect-server")) as started:
        yield started


def _run_deployment(
    env: dict[str, str], output_uri: str, source: str = "phantom"
) -> subprocess.CompletedProcess:
    params = {
        "source": source,
        "output_uri": output_uri,
        "rows_per_shard": ROWS_PER_SHARD,
        "fullsup_per_class": 1,
        "source_options": json.dumps(PHANTOM),
    }
    cmd = [PREFECT, "deployment", "run", "preprocess/phantom", "--watch", "--watch-timeout", "90"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value}"]
    return run(cmd, env, timeout=120)


def _delete_deployment(env: dict[str, str]) -> None:
    """Served and worker deployments of one name do not mix: each test leaves the server without it."""
    run([PREFECT, "deployment", "delete", "preprocess/phantom"], env, timeout=60)


@pytest.mark.integration
def test_deployment_from_prefect_yaml_on_process_worker(
    prefect_server: tuple[dict[str, str], Path], reference: Manifest, tmp_path: Path
) -> None:
    env, root = prefect_server
    for cmd in (
        [PREFECT, "work-pool", "create", "acol-process", "--type", "process", "--overwrite"],
        [PREFECT, "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml", "--name", "phantom"],
    ):
        done = run(cmd, env, timeout=60)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = root / "worker.log"
    worker = start([PREFECT, "worker", "start", "--pool", "acol-process"], env, log)
    try:
        out = str(tmp_path / "data")
        done = _run_deployment(env, out)
        assert done.returncode == 0, done.stdout[-3000:] + log.read_text()[-3000:]
        _assert_same_dataset(out, reference)
        # A source that does not exist fails the run (exit 1), and writes nothing.
        bad = _run_deployment(env, str(tmp_path / "bad"), source="nope")
        assert bad.returncode == 1, bad.stdout[-2000:]
        assert not (tmp_path / "bad").exists()
    finally:
        stop(worker, signal.SIGINT)
        _delete_deployment(env)


@pytest.mark.integration
def test_served_deployment_writes_to_s3(
    prefect_server: tuple[dict[str, str], Path], s3_server: str, reference: Manifest
) -> None:
    env, root = prefect_server
    env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}  # set by s3_server
    log = root / "serve.log"
    serve = start([PREFECT, "flow", "serve", "flows/preprocess.py:preprocess", "--name", "phantom"], env, log)
    try:
        wait_until(lambda: "is being served" in log.read_text(), serve, log, "prefect flow serve")
        out = f"{s3_server}/flows/preprocess-{uuid.uuid4().hex[:8]}"
        done = _run_deployment(env, out)
        assert done.returncode == 0, done.stdout[-3000:] + log.read_text()[-3000:]
        _assert_same_dataset(out, reference)
        assert storage.exists(storage.join(out, MANIFEST_NAME))
    finally:
        stop(serve, signal.SIGINT)
        _delete_deployment(env)
