"""The pipeline deployment on a Prefect server and a Ray cluster, and the checks of a finished run, shared by
test_pipeline_flow.py (one Ray head, local run folder) and test_two_nodes.py (two nodes, run folder on S3).

    with ray_head() as head, prefect_server_at(tmp_path) as (env, root):
        with pipeline_worker(env, worker_env(env, head, "auto"), root) as run_deployment:
            done = run_deployment({"run_uri": ..., "models": SMOKE_SPECS, ...})
    assert_complete_run(run_uri, SMOKE_MODELS)

Nothing here imports Prefect or Ray (the pytest process never does): the deployment is created and run
with the ``prefect`` CLI, and the run folder is read through ``acol_core.storage`` (a path or s3://).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect_server import PREFECT, run, start, stop
from ray_head import Head

from acol_core.runs import read_run
from acol_core.storage import exists, read_bytes

__all__ = [
    "DEPLOYMENT",
    "SMOKE_MODELS",
    "SMOKE_SPECS",
    "STAGES",
    "assert_complete_run",
    "pipeline_worker",
    "worker_env",
]

# The smoke preset's models (flows.pipeline is not imported here: Prefect reads its settings on import).
SMOKE_SPECS = [
    {"label": "cam", "model": "cam", "options": {}},
    {"label": "acol", "model": "acol", "options": {"delta": 0.9}},
    {"label": "cam+gate", "model": "cam", "options": {}, "reuse": "cam", "localize": {"gate": "anatomy"}},
]
SMOKE_MODELS = [spec["label"] for spec in SMOKE_SPECS]
STAGES = {"preprocess", "train", "localize", "evaluate", "report"}
DEPLOYMENT = "pipeline/pipeline-phantom"  # from flows/prefect.yaml


def worker_env(env: dict[str, str], head: Head, address: str) -> dict[str, str]:
    """The Prefect worker's environment: ``env`` (the Prefect client's) with the head's Ray settings.

    The worker, and the flow runs it starts, reach the cluster at ``address`` (``auto`` finds the head
    through its RAY_TMPDIR) with the head's token; this process's own token is not passed on.
    """
    out = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    out |= {k: v for k, v in head.env.items() if k.startswith("RAY_")}
    return out | {"RAY_AUTH_TOKEN": head.token, "RAY_ADDRESS": address}


@contextlib.contextmanager
def pipeline_worker(
    env: dict[str, str], worker: dict[str, str], root: Path, watch_timeout_s: int = 500
) -> Iterator[Callable[[dict[str, Any]], subprocess.CompletedProcess]]:
    """Create the process work pool and the pipeline deployment, start a worker with the ``worker``
    environment; yield ``run_deployment(params)`` (``prefect deployment run --watch``, exit 0 when the
    flow run Completed). The worker is stopped before the caller stops the server (else the server's
    SIGTERM hangs); its log is ``root/worker.log``."""
    deploy = [PREFECT, "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml"]
    for cmd in (
        [PREFECT, "work-pool", "create", "acol-process", "--type", "process", "--overwrite"],
        [*deploy, "--name", DEPLOYMENT.split("/")[1]],
    ):
        done = run(cmd, env, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = root / "worker.log"
    proc = start([PREFECT, "worker", "start", "--pool", "acol-process"], worker, log)

    def run_deployment(params: dict[str, Any]) -> subprocess.CompletedProcess:
        cmd = [PREFECT, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params)]
        done = run([*cmd, "--watch", "--watch-timeout", str(watch_timeout_s)], env, watch_timeout_s + 60)
        assert done.returncode == 0, done.stdout[-3000:] + log.read_text()[-5000:]
        return done

    try:
        yield run_deployment
    finally:
        stop(proc, signal.SIGINT)


def _text(uri: str) -> str:
    return read_bytes(uri).decode()


def assert_complete_run(run_uri: str, labels: list[str], epochs: int = 1) -> dict:
    """Every stage's output for every model (a run folder on a path or on S3); returns the report's
    summary (label -> column -> value)."""
    record = read_run(run_uri)
    assert list(record.models) == labels
    assert set(record.stages) == STAGES and all(seconds >= 0 for seconds in record.stages.values())
    assert exists(f"{run_uri}/data/_manifest.json")  # the dataset the flow prepared
    for label, entry in record.models.items():
        trained = entry.source.removeprefix("reuse:") if entry.source.startswith("reuse:") else label
        assert entry.model_uri == f"{run_uri}/models/{trained}.safetensors" and exists(entry.model_uri)
        assert entry.predictions_uri == f"{run_uri}/predictions/{label}"
        success = json.loads(_text(f"{entry.predictions_uri}/_SUCCESS.json"))
        assert entry.evaluation_uri == f"{run_uri}/evaluation/{label}.json"
        evaluation = json.loads(_text(entry.evaluation_uri))
        assert evaluation["split"] == "test" and evaluation["rows"] > 0
        assert 0.0 <= evaluation["localization"]["overall"]["pxap"] <= 1.0
        assert evaluation["thresholds"]["fullsup_val_rows"] > 0  # thresholds chosen on fullsup val rows
        # The phantom's subjects are volumes: their per-subject CSV lies beside the JSON.
        csv_uri = f"{run_uri}/evaluation/{label}.subjects.csv"
        assert evaluation["subjects"]["csv"] == csv_uri and _text(csv_uri).startswith("subject_id,")
        assert entry.epochs == epochs and entry.backbone == "tiny"
        assert entry.source in ("train", "reuse:cam")
        if entry.localize.get("gate") == "anatomy":  # localized with the anatomy gate: recorded, applied
            assert success["extra"]["gate"] == "anatomy", success
    page = _text(f"{run_uri}/report/index.html")
    assert all(f"<td>{label}</td>" in page for label in labels) and "centre-gaussian" in page
    return json.loads(_text(f"{run_uri}/report/summary.json"))
