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
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect_server import PREFECT, prefect_env, prefect_server_at, run, start, stop
from ray_head import ray_head

from acol_core.runs import read_run

# The smoke preset's models (flows.pipeline is not imported here: Prefect reads its settings on import).
SMOKE_SPECS = [
    {"label": "cam", "model": "cam", "options": {}},
    {"label": "acol", "model": "acol", "options": {"delta": 0.9}},
    {"label": "cam+gate", "model": "cam", "options": {}, "reuse": "cam", "localize": {"gate": "anatomy"}},
]
SMOKE_MODELS = [spec["label"] for spec in SMOKE_SPECS]
STAGES = {"preprocess", "train", "localize", "evaluate", "report"}

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


def _assert_complete_run(run_uri: str, labels: list[str]) -> dict:
    """Every stage's output for every model; returns the report's summary (label -> column -> value)."""
    record = read_run(run_uri)
    assert list(record.models) == labels
    assert set(record.stages) == STAGES and all(seconds >= 0 for seconds in record.stages.values())
    for label, entry in record.models.items():
        trained = entry.source.removeprefix("reuse:") if entry.source.startswith("reuse:") else label
        assert (
            entry.model_uri == f"{run_uri}/models/{trained}.safetensors" and Path(entry.model_uri).is_file()
        )
        assert entry.predictions_uri == f"{run_uri}/predictions/{label}"
        assert (Path(entry.predictions_uri) / "_SUCCESS.json").is_file()
        assert entry.evaluation_uri == f"{run_uri}/evaluation/{label}.json"
        evaluation = json.loads(Path(entry.evaluation_uri).read_text())
        assert evaluation["split"] == "test" and evaluation["rows"] > 0
        assert 0.0 <= evaluation["localization"]["overall"]["pxap"] <= 1.0
        assert evaluation["thresholds"]["fullsup_val_rows"] > 0  # thresholds chosen on fullsup val rows
        # The phantom's subjects are volumes: their per-subject CSV lies beside the JSON.
        csv_uri = f"{run_uri}/evaluation/{label}.subjects.csv"
        assert evaluation["subjects"]["csv"] == csv_uri and Path(csv_uri).read_text().startswith(
            "subject_id,"
        )
        assert entry.epochs == 1 and entry.backbone == "tiny" and entry.source in ("train", "reuse:cam")
        if entry.localize.get("gate") == "anatomy":  # localized with the anatomy gate: recorded, applied
            success = json.loads((Path(entry.predictions_uri) / "_SUCCESS.json").read_text())
            assert success["extra"]["gate"] == "anatomy", success
    page = (Path(run_uri) / "report" / "index.html").read_text()
    assert all(f"<td>{label}</td>" in page for label in labels) and "centre-gaussian" in page
    return json.loads((Path(run_uri) / "report" / "summary.json").read_text())


def test_local_run_of_the_smoke_preset_writes_every_stage(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "run")
    with _ray_tmpdir() as ray_tmp:
        env = prefect_env(tmp_path / "home", None) | {"RAY_TMPDIR": ray_tmp}
        done = run([sys.executable, "-m", "flows.pipeline", "--preset", "smoke", "--run", run_uri], env, 600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = _assert_complete_run(run_uri, SMOKE_MODELS)
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
        # The worker, and the flow runs it starts, reach the head with its token; RAY_ADDRESS=auto finds
        # the head through its RAY_TMPDIR. This process's own token is not passed on.
        worker_env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
        worker_env |= {k: v for k, v in head.env.items() if k.startswith("RAY_")}
        worker_env |= {"RAY_AUTH_TOKEN": head.token, "RAY_ADDRESS": "auto"}
        for cmd in (
            [PREFECT, "work-pool", "create", "acol-process", "--type", "process", "--overwrite"],
            [
                PREFECT,
                "--no-prompt",
                "deploy",
                "--prefect-file",
                "flows/prefect.yaml",
                "--name",
                "pipeline-phantom",
            ],
        ):
            done = run(cmd, env, timeout=120)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        log = root / "worker.log"
        worker = start([PREFECT, "worker", "start", "--pool", "acol-process"], worker_env, log)
        try:
            params = {
                "run_uri": run_uri,
                "source_options": {"num_subjects": 12, "slices_per_subject": 4, "size": 32},
                "models": SMOKE_SPECS,
                "train": {"epochs": 1, "image_size": 32, "augment": False},
            }
            cmd = [PREFECT, "deployment", "run", "pipeline/pipeline-phantom", "--params", json.dumps(params)]
            done = run([*cmd, "--watch", "--watch-timeout", "500"], env, timeout=560)
            assert done.returncode == 0, done.stdout[-3000:] + log.read_text()[-5000:]
        finally:
            stop(worker, signal.SIGINT)
        # The stages ran on the head's cluster: its job list shows the flow run's driver, finished.
        status, body = head.get("/api/jobs/")
        assert status == 200
        drivers = [job for job in json.loads(body) if job.get("type") == "DRIVER"]
        assert drivers and all(job["status"] == "SUCCEEDED" for job in drivers), body[-2000:]
    _assert_complete_run(run_uri, SMOKE_MODELS)
