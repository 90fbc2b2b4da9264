"""Layering: the core modules import and work without Ray (Ray belongs to ``acol_core/jobs/`` only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ``sys.modules["ray"] = None`` makes any ``import ray`` (or ``ray.*``) raise ImportError.
_NO_RAY = """
import sys
sys.modules["ray"] = None
import acol_core.sweep.results
import acol_core.sweep.space
import acol_core.batch_localize
import acol_core.viz
import acol_core.checkpoints
import acol_core.train_session
import acol_core.balance
import acol_core.faults
import acol_core.data.transforms
from acol_core.sweep.space import load_space
space = load_space("tune/spaces/smoke.yaml")
assert space.params, "the smoke space has parameters"
print("ok", sorted(space.params))
"""


def test_sweep_space_and_results_import_and_parse_without_ray() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_RAY], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")


def test_the_check_fails_when_a_module_needs_ray() -> None:
    """The guard itself works: importing the Tune driver with Ray blocked fails."""
    code = 'import sys\nsys.modules["ray"] = None\nimport acol_core.jobs.sweep\n'
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0 and "ray" in done.stderr
