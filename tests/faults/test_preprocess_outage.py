"""Preparing a dataset on S3 while S3 goes away mid-write: `acol prepare` and the Prefect flow.

S3 is this module's own moto server behind a gate that cuts it off at the upload of one shard. Each
run must fail with one clear line, leave no manifest (an earlier complete dataset at the same URI
included: its manifest goes first), and a re-run once S3 is back must write exactly the dataset a
clean run writes (row count, shard checksums, rejects). The flow runs in a subprocess (Prefect reads its
settings on import; this process never imports Prefect) with an ephemeral API, whose server must
listen on the loopback interface only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import (
    ACOL,
    MotoServer,
    S3Gate,
    driver_tracebacks,
    kill_group,
    listening_sockets,
    s3_env,
)

from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import DatasetError, Manifest, open_dataset, read_manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PHANTOM = {"num_subjects": 4, "slices_per_subject": 4, "size": 32}
ROWS_PER_SHARD = 4  # 16 one-row inputs -> 4 shards
FLOW_TIMEOUT_S = 150

# Two flow runs in one process (one ephemeral API): the first meets the outage; the second runs once the
# test has restored S3 (it writes "restored"). Retries keep their count; only their back-off is cut.
_FLOW_SCRIPT = """
import json, sys, time
from pathlib import Path
import flows.preprocess as fp

out, handshake = sys.argv[1], Path(sys.argv[2])
options = json.loads(sys.argv[3])
fp.shard_task = fp.shard_task.with_options(retry_delay_seconds=0)
for attempt in ("outage", "rerun"):
    state = fp.preprocess(output_uri=out, source_options=options, rows_per_shard=4, fullsup_per_class=1,
                          return_state=True)
    print("REPORT " + json.dumps({"attempt": attempt, "state": state.type.value, "message": state.message}),
          flush=True)
    if attempt == "outage":
        (handshake / "failed").touch()
        while not (handshake / "restored").exists():
            time.sleep(0.1)
"""


@dataclass
class Outage:
    moto: MotoServer
    gate: S3Gate
    env: dict[str, str]  # a client of the gate


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The dataset a clean run writes (local: checksums do not depend on where the shards are)."""
    uri = str(tmp_path_factory.mktemp("reference") / "data")
    return prepare_dataset("phantom", uri, rows_per_shard=ROWS_PER_SHARD, fullsup_per_class=1, **PHANTOM)


@pytest.fixture()
def outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    """A fresh moto server and gate; this process reads and writes the bucket directly."""
    with MotoServer(tmp_path) as moto, S3Gate(moto.port) as gate:
        for key, value in s3_env(f"http://127.0.0.1:{moto.port}").items():
            monkeypatch.setenv(key, value)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
        env.update(s3_env(gate.endpoint), PYTHONPATH=str(REPO), HOME=str(tmp_path / "home"))
        yield Outage(moto, gate, env)


def _assert_same_dataset(uri: str, reference: Manifest) -> None:
    dataset = open_dataset(uri)  # verifies every shard's sha256 against the manifest
    shards = [(s.name, s.rows, s.sha256) for s in dataset.manifest.shards]
    assert shards == [(s.name, s.rows, s.sha256) for s in reference.shards]
    assert dataset.manifest.rejects.sha256 == reference.rejects.sha256
    assert dataset.manifest.counts == reference.counts
    assert dataset.num_rows == reference.num_rows == 16


def _assert_no_manifest(uri: str) -> None:
    with pytest.raises(DatasetError, match="no _manifest.json"):
        read_manifest(uri)


def test_cli_prepare_fails_in_one_line_and_reruns_to_the_clean_dataset(
    outage: Outage, reference: Manifest
) -> None:
    out = "s3://faults/cli-data"
    prepare_dataset("phantom", out, rows_per_shard=ROWS_PER_SHARD, fullsup_per_class=1, **PHANTOM)  # complete
    command = [ACOL, "prepare", "--output", out, "--rows-per-shard", str(ROWS_PER_SHARD)]
    command += ["--fullsup-per-class", "1", *[f"-o{k}={v}" for k, v in PHANTOM.items()]]
    outage.gate.cut_on(rb"(?:PUT|POST) /faults/cli-data/part-00001\.parquet")
    failed = subprocess.run(command, env=outage.env, capture_output=True, text=True, timeout=120)
    assert outage.gate.cuts == 1, "the outage was never triggered"
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("acol prepare: error: cannot write s3://faults/cli-data/part-00001.parquet: ")
    assert "AWS Error NETWORK_CONNECTION" in lines[-1]
    assert [line for line in lines if "error" in line] == lines[-1:] and not driver_tracebacks(failed.stderr)
    outage.gate.restore()
    _assert_no_manifest(out)  # the earlier complete dataset's manifest went first

    rerun = subprocess.run(command, env=outage.env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["accepted"] == 16
    _assert_same_dataset(out, reference)


def test_flow_fails_clearly_without_manifest_and_reruns_to_the_clean_dataset(
    outage: Outage, reference: Manifest, tmp_path: Path
) -> None:
    out = "s3://faults/flow-data"
    prepare_dataset("phantom", out, rows_per_shard=ROWS_PER_SHARD, fullsup_per_class=1, **PHANTOM)
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    env = {
        **outage.env,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    outage.gate.cut_on(rb"(?:PUT|POST) /faults/flow-data/part-00002\.parquet")
    command = [sys.executable, "-c", _FLOW_SCRIPT, out, str(handshake), json.dumps(PHANTOM)]
    log = tmp_path / "flow.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + FLOW_TIMEOUT_S
            while not (handshake / "failed").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the first flow run did not end:\n{log.read_text()[-4000:]}")
                time.sleep(0.2)
            # Between the runs the ephemeral API is up: its server must listen on loopback only.
            listening = listening_sockets(proc.pid)
            outage.gate.restore()
            _assert_no_manifest(out)
            (handshake / "restored").touch()
            proc.wait(timeout=FLOW_TIMEOUT_S)
        finally:
            kill_group(proc)
    text = log.read_text()
    reports = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("REPORT ")]
    assert [r["state"] for r in reports] == ["FAILED", "COMPLETED"], text[-4000:]
    message = reports[0]["message"]
    # Shards are written in parallel: the first task to fail may be any of them.
    assert re.search(r"StorageError: cannot write s3://faults/flow-data/part-\d{5}\.parquet: ", message), (
        message
    )
    assert "NETWORK_CONNECTION" in message and "\n" not in message
    _assert_same_dataset(out, reference)
    assert listening, "the ephemeral Prefect server was not found"
    assert all(address.startswith(("127.0.0.1:", "[::1]:")) for address in listening), listening
