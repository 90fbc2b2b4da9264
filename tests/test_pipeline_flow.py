"""The end-to-end pipeline flow: locally (ephemeral Prefect API, in-process Ray, the smoke preset) and as a
deployment from flows/prefect.yaml run by `prefect deployment run` on a process worker, against a real
Prefect server and a Ray head started with `ray start --head` (token auth on).

Flows run in subprocesses (Prefect reads its settings when first imported; see prefect_server.py), each
with its own PREFECT_HOME and a short RAY_TMPDIR (Ray's socket paths must stay below 107 characters).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_deployment import (
    SMOKE_MODELS,
    SMOKE_SPECS,
    STAGES,
    assert_complete_run,
    pipeline_worker,
    worker_env,
)
from prefect_server import prefect_env, prefect_server_at, run
from ray_head import ray_head

# Each case runs the flow in one process (one ephemeral API); none may leave a run folder behind.
_BAD_PARAMS_SCRIPT = """
import json, sys
from flows.pipeline import pipeline

root, cases = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, params in cases.items():
    try:
        pipeline(run_uri=f"{root}/{name}", **params)
        out[name] = "no error"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print("ERRORS " + json.dumps(out))
"""
BAD_PARAMS = {
    "unknown_model": ({"models": [{"model": "cam"}, {"model": "unet"}]}, "models[1]: unknown model 'unet'"),
    "label_twice": (
        {"models": [{"model": "cam"}, {"model": "acol", "label": "cam"}]},
        "label 'cam' used twice",
    ),
    "label_escapes": ({"models": [{"model": "cam", "label": "../cam"}]}, "model label '../cam'"),
    "unknown_key": ({"models": [{"model": "cam", "delta": 0.5}]}, "models[0]: unknown key(s) delta"),
    "train_key": ({"train": {"epoch": 2}}, "unknown config keys: epoch"),
    "model_train_key": (
        {"models": [{"model": "cam", "train": {"harmonize": "n4"}}]},
        "models[0]: train: harmonize must be none or brain",
    ),
    "gpus": ({"gpus_per_worker": -1}, "gpus_per_worker must be >= 0"),
    "reuse_unknown": (
        {"models": [{"model": "cam", "reuse": "acol"}]},
        "reuse names no earlier label: 'acol'",
    ),
    "bad_gate": ({"models": [{"model": "cam", "localize": {"gate": "brain"}}]}, "gate must be one of"),
    "bad_delta": ({"models": [{"model": "acol", "options": {"delta": 1.5}}]}, "delta must be in (0, 1)"),
    "sweep_space": ({"sweep": {"trials": 2}}, "sweep: give 'space'"),
    "sweep_inline": ({"sweep": {"space": {"params": {}}}}, "params must be a non-empty mapping"),
    "placement": ({"placement_strategy": "ANY"}, "placement_strategy must be one of PACK, SPREAD"),
    "actors": ({"actors": 0}, "actors must be >= 1, got 0"),
    "sweep_label": (
        {"models": [{"model": "cam", "label": "sweep-best"}], "sweep": {"space": "tune/spaces/smoke.yaml"}},
        "the label 'sweep-best' is kept",
    ),
}


@contextlib.contextmanager
def _ray_tmpdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="apl", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_local_run_of_the_smoke_preset_writes_every_stage(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "run")
    with _ray_tmpdir() as ray_tmp:
        env = prefect_env(tmp_path / "home", None) | {"RAY_TMPDIR": ray_tmp}
        done = run([sys.executable, "-m", "flows.pipeline", "--preset", "smoke", "--run", run_uri], env, 600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = assert_complete_run(run_uri, SMOKE_MODELS)
    # Stage progress is logged with elapsed seconds.
    for stage in STAGES:
        assert f"stage {stage} done in " in done.stdout + done.stderr
    # The printed table is the report's summary.
    table = done.stdout[done.stdout.index("model ") :]
    for label in [*SMOKE_MODELS, "centre-gaussian"]:
        line = next(line for line in table.splitlines() if line.startswith(label + " "))
        assert f"{summary[label]['PxAP']:.3f}" in line
    assert f"report: {run_uri}/report/index.html" in done.stdout


def test_bad_parameters_fail_before_any_work(tmp_path: Path) -> None:
    cases = {name: params for name, (params, _) in BAD_PARAMS.items()}
    env = prefect_env(tmp_path / "home", None)
    done = run([sys.executable, "-c", _BAD_PARAMS_SCRIPT, str(tmp_path), json.dumps(cases)], env, 300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERRORS ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    errors = json.loads(lines[-1].removeprefix("ERRORS "))
    for name, (_, message) in BAD_PARAMS.items():
        assert message in errors[name], (name, errors[name])
        assert not (tmp_path / name).exists()  # not even run.json


# The train and sweep tasks hand gpus_per_worker to Ray Train / Tune: -1 reaches their checks (which
# raise before Ray starts), so the error proves the value got through.
_GPUS_SCRIPT = """
import sys
from flows.pipeline import sweep_task, train_task

root = sys.argv[1]
spec = {"label": "cam", "model": "cam", "options": {}}
for name, call in {
    "train": lambda: train_task.fn(root, root + "/data", spec, {"image_size": 32}, 1, gpus_per_worker=-1.0),
    "sweep": lambda: sweep_task.fn(
        root, root + "/data", {"space": "tune/spaces/smoke.yaml", "trials": 1, "name": "s",
        "max_concurrent_trials": None}, 0, gpus_per_worker=-1.0),
}.items():
    try:
        call()
        print(name, "no error")
    except Exception as exc:
        print(name, type(exc).__name__, exc)
"""


def test_train_and_sweep_tasks_pass_gpus_per_worker_on(tmp_path: Path) -> None:
    env = prefect_env(tmp_path / "home", None)
    done = run([sys.executable, "-c", _GPUS_SCRIPT, str(tmp_path)], env, 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = dict(
        line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("train ", "sweep "))
    )
    for task in ("train", "sweep"):
        assert lines[task].startswith("ConfigError") and "gpus_per_worker >= 0" in lines[task], lines


@pytest.mark.integration
def test_deployment_runs_on_a_worker_against_a_ray_head(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "run")
    with ray_head(num_cpus=2) as head, prefect_server_at(tmp_path) as (env, root):
        with pipeline_worker(env, worker_env(env, head, "auto"), root) as run_deployment:
            run_deployment(
                {
                    "run_uri": run_uri,
                    "source_options": {"num_subjects": 12, "slices_per_subject": 4, "size": 32},
                    "models": SMOKE_SPECS,
                    "train": {"epochs": 1, "image_size": 32, "augment": False},
                }
            )
        # The stages ran on the head's cluster: its job list shows the flow run's driver, finished.
        status, body = head.get("/api/jobs/")
        assert status == 200
        drivers = [job for job in json.loads(body) if job.get("type") == "DRIVER"]
        assert drivers and all(job["status"] == "SUCCEEDED" for job in drivers), body[-2000:]
    assert_complete_run(run_uri, SMOKE_MODELS)
