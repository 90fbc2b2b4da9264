"""`ray job submit -- acol tune` against a real Ray head (token auth on) started by this test."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_head import RAY, Head, ray_head

from acol_core.data.prepare import prepare_dataset
from acol_core.sweep.space import load_space

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    if not RAY.exists():
        pytest.skip(f"no ray CLI at {RAY}")
    with ray_head(num_cpus=2) as started:
        yield started


def test_submitted_sweep_writes_its_table_and_succeeds(head: Head, tmp_path: Path) -> None:
    data, storage = str(tmp_path / "data"), str(tmp_path / "sweeps")
    prepare_dataset("phantom", data, seed=3, num_subjects=8, slices_per_subject=4, size=32, rows_per_shard=16)
    command = [str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO)]
    command += ["--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--"]
    command += ["acol", "tune", "--space", "tune/spaces/smoke.yaml", "--data", data, "--trials", "4"]
    command += ["--storage", storage, "--name", "smoke"]
    try:
        done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{str(exc.stdout)[-3000:]}")
    output = done.stdout + done.stderr
    submission = re.search(r"raysubmit_\w+", output)
    assert submission, output[-3000:]
    status, body = head.get(f"/api/jobs/{submission.group()}")
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body[-2000:]
    assert done.returncode == 0
    jobs = json.loads(head.get("/api/jobs/")[1])
    assert submission.group() in {job["submission_id"] for job in jobs}
    assert head.get("/api/jobs/", token=None)[0] in (401, 403)

    logs = json.loads(head.get(f"/api/jobs/{submission.group()}/logs")[1])["logs"]
    assert "sweep: trial " in logs and " started (" in logs  # one line per trial event in the job's logs
    summary = json.loads(logs[logs.rindex('{\n  "sweep_uri"') :].split("\n}\n")[0] + "\n}")

    space = load_space(str(REPO / "tune" / "spaces" / "smoke.yaml"))
    rows = pq.read_table(summary["table_uri"]).to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    for row in rows:
        assert row["status"] in ("completed", "stopped"), row
        assert row["model"] in ("cam", "acol") and (row["delta"] is not None) == (row["model"] == "acol")
        assert row["trial_name"].startswith(row["model"])
        assert 0.0 <= row["best_val_pxap"] <= 1.0
        assert space.params["lr"].low <= row["lr"] <= space.params["lr"].high
    best = max(rows, key=lambda r: r["best_val_pxap"])
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert Path(summary["best_model_uri"]).stat().st_size > 0
    assert set(summary["test_metrics"]) >= {"test_pxap", "test_max_box_acc_v2"}
