"""The ACoL δ × fusion study script runs end to end on a tiny phantom and reports every fusion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from acol_core.models import FUSIONS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "acol_fusion_study.py"


def test_study_reports_both_branches_and_every_fusion(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    args = ["--data", str(tmp_path / "data"), "--deltas", "0.5", "0.9", "--seeds", "0", "--epochs", "1"]
    args += ["--subjects", "12", "--slices", "4", "--size", "32", "--out", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["delta"], r["seed"]) for r in rows] == [(0.5, 0), (0.9, 0)]
    expected = {"A", "B"} | {f"fused_{f}" for f in FUSIONS if f != "a"}
    for row in rows:
        assert expected <= set(row)
        assert all(0.0 <= row[k]["pxap"] <= 1.0 and 0.0 <= row[k]["off_target"] <= 1.0 for k in expected)
    assert "median test PxAP" in done.stdout and "fused_joint" in done.stdout
