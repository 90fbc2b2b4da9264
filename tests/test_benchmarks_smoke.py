"""The benchmark harness end to end at minimal sizes: every benchmark reports, every ratio is usable.

No timing assertions: the machine is shared, so only the shape of the report is checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_RATIOS = {
    "train_cost": {"acol_over_cam_tiny", "coatt_pair_over_two_cam_tiny", "coatt_over_cam_batch_tiny"},
    "coattention_memory": {"memory_efficient_over_naive_28", "time_efficient_over_naive_28"},
    "data_path": {"loader_over_raw_png", "loader_over_train_tiny"},
    "preprocess": {"parquet_over_png_files", "two_over_one_task"},
}
SKIPPED_IN_SMOKE = {"ray_train", "localize"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--mode", "smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # ~11 s of work; generous because the CI host may be shared
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1
    assert "| benchmark" in done.stdout  # the printed table
    return json.loads(files[0].read_text())


def test_every_benchmark_reports(report: dict) -> None:
    assert set(report["benchmarks"]) == set(EXPECTED_RATIOS) | SKIPPED_IN_SMOKE
    for name in SKIPPED_IN_SMOKE:
        assert report["benchmarks"][name]["skipped"]


@pytest.mark.parametrize("name", sorted(EXPECTED_RATIOS))
def test_ratios_are_finite_and_positive(report: dict, name: str) -> None:
    res = report["benchmarks"][name]
    assert "error" not in res and not res.get("errors"), res
    assert set(res["ratios"]) == EXPECTED_RATIOS[name]
    for key, value in res["ratios"].items():
        assert math.isfinite(value) and value > 0, (key, value)


def test_environment_is_recorded(report: dict) -> None:
    env = report["environment"]
    for key in ("device", "torch_threads", "cpu_count", "load_average", "git_commit", "threads_reason"):
        assert key in env
    assert env["torch_threads"] >= 1 and len(env["load_average"]) == 3
    assert report["mode"] == "smoke"
