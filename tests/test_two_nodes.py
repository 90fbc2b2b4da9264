"""Two Ray nodes on one machine: training, localization and a lost node, as on a cluster.

A head (``ray start --head``, custom resource ``node_a``) and a second node (``ray start --address``,
``node_b``) in their own process groups, token auth on, with the S3 settings in their environment (as a
cluster's nodes get them from an instance profile). Everything goes through ``ray job submit
--working-dir . --runtime-env cluster/runtime_env.yaml``, the way cluster/README.md submits work: the
code travels in the working dir, datasets, checkpoints and exports live on the S3 server, and no node
reads another's files.

- ``acol train --workers 2 --placement-strategy STRICT_SPREAD`` puts one worker on each node and ends
  with the weights of a run on the head alone (deterministic data order, no augmentation);
- ``acol localize --actors 2`` runs an actor on each node and writes every row once;
- ``acol tune`` with two concurrent trials whose workers each need most of a node runs one on each;
- the pipeline deployment (flows/prefect.yaml), run by a Prefect worker against the cluster's address,
  trains with one worker per node and localizes with an actor on each, its run folder on S3;
- the second node SIGKILLed (raylet, agents and workers at once) after the first checkpoint: the run
  restarts on the head from that checkpoint and ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_deployment import assert_complete_run, pipeline_worker, worker_env
from prefect_server import prefect_server_at
from ray_head import RAY, Head, Node, ray_head, ray_node

from acol_core.checkpoints import STATE_FILE, read_checkpoint_epochs
from acol_core.data.prepare import prepare_dataset
from acol_core.predictions import read_predictions
from acol_core.storage import StorageError, join, read_bytes
from acol_core.train import load_checkpoint_bytes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
# 48 rows: 32 train (2 batches of 8 per worker and epoch), 8 val, 8 test.
PHANTOM = {"num_subjects": 6, "slices_per_subject": 8, "size": 32, "rows_per_shard": 16}
TRAIN_CONFIG = "image_size: 32\nbatch_size: 8\naugment: false\nseed: 3\nnum_threads: 1\n"
EPOCHS = 4
# Logical CPUs per node: a sweep trial's worker asks for 2, so each node holds one trial, and 1 is left
# for Ray Data's read tasks (which want a whole CPU each).
NODE_CPUS = 3
# What Ray Train rewrites in the run folder each time it registers a checkpoint.
SNAPSHOT = "checkpoint_manager_snapshot.json"


@pytest.fixture(scope="module")
def head(s3_server: str) -> Iterator[Head]:
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    # Node death noticed in ~3 s instead of Ray's default ~30 s (the test waits for it).
    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    with ray_head(
        num_cpus=NODE_CPUS, resources={"node_a": 1}, node_ip="127.0.0.1", extra_env=aws, system_config=fast
    ) as started:
        yield started


@pytest.fixture(scope="module")
def data(s3_server: str) -> str:
    uri = f"{s3_server}/two-nodes/data"
    prepare_dataset("phantom", uri, **PHANTOM)
    return uri


@pytest.fixture(scope="module")
def train_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("two-nodes") / "train.yaml"
    path.write_text(TRAIN_CONFIG)
    return str(path)


def _submit(head: Head, args: list[str], wait: bool = True) -> subprocess.Popen | dict[str, Any]:
    """``ray job submit`` with cluster/runtime_env.yaml from the repository root, as a user would."""
    command = [str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", "."]
    command += ["--runtime-env", "cluster/runtime_env.yaml", "--", *args]
    proc = subprocess.Popen(
        command, cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return _finish(head, proc) if wait else proc


def _finish(head: Head, proc: subprocess.Popen) -> dict[str, Any]:
    """Wait for the submission; the job's record from the job API (status, Ray job id, logs)."""
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s:\n{output[-3000:]}")
    submission = re.search(r"raysubmit_\w+", output)
    assert submission, output[-3000:]
    status, body = head.get(f"/api/jobs/{submission.group()}")
    job = json.loads(body)
    assert status == 200 and job["status"] == "SUCCEEDED", output[-4000:]
    _, logs = head.get(f"/api/jobs/{submission.group()}/logs")
    job["logs"] = json.loads(logs)["logs"]
    return job


def _summary(logs: str) -> dict[str, Any]:
    """The JSON document the ``acol`` verb printed last."""
    start = logs.rindex("\n{\n") + 1
    return json.loads(logs[start : logs.index("\n}\n", start) + 2])


def _train_args(data: str, storage: str, name: str, config: str, *extra: str) -> list[str]:
    return [
        "acol", "train", "--data", data, "--storage", storage, "--name", name, "--config", config,
        "--model", "acol", "--backbone", "tiny", "--delta", "0.6", "--epochs", str(EPOCHS),
        "--workers", "2", "--cpus-per-worker", "0.5", "--deterministic", "--keep-checkpoints", "10",
        *extra,
    ]  # fmt: skip


def _actor_nodes(head: Head, job_id: str, class_part: str) -> list[str]:
    """Node id of each of the job's actors whose class name contains ``class_part`` (state API)."""
    command = [str(RAY), "list", "actors", "--address", head.dashboard, "--format", "json", "--limit", "1000"]
    command += ["--filter", f"job_id={job_id}", "--detail"]
    done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    actors = json.loads(done.stdout)
    return [a["node_id"] for a in actors if class_part in a["class_name"]]


def _alive_nodes(head: Head) -> int:
    command = [str(RAY), "list", "nodes", "--address", head.dashboard, "--format", "json"]
    command += ["--filter", "state=ALIVE"]
    done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return len(json.loads(done.stdout))


def _drivers(head: Head) -> dict[str, str]:
    """Job id -> status of the cluster's drivers that were not submitted as jobs (a flow run's)."""
    status, body = head.get("/api/jobs/")
    assert status == 200
    return {job["job_id"]: job["status"] for job in json.loads(body) if job.get("type") == "DRIVER"}


def _final_state(run_uri: str) -> dict[str, Any]:
    epochs = read_checkpoint_epochs(run_uri)
    last = max(epochs, key=epochs.get)
    return load_checkpoint_bytes(read_bytes(join(run_uri, last, STATE_FILE)))


@pytest.fixture(scope="module")
def reference(head: Head, data: str, s3_server: str, train_config: str) -> dict[str, Any]:
    """A 2-worker run on the head alone (before any second node joins)."""
    assert _alive_nodes(head) == 1
    storage = f"{s3_server}/two-nodes/runs"
    job = _submit(head, _train_args(data, storage, "one-node", train_config))
    summary = _summary(job["logs"])
    assert summary["epochs"] == EPOCHS
    assert len(set(_actor_nodes(head, job["job_id"], "TrainWorker"))) == 1
    return {"run": summary["run"], "model": summary["model"], "state": _final_state(summary["run"])}


@pytest.fixture
def second_node(head: Head) -> Iterator[Node]:
    with ray_node(head, num_cpus=NODE_CPUS, resources={"node_b": 1}) as node:
        deadline = time.monotonic() + 60
        while _alive_nodes(head) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        yield node


def _assert_same_weights(state: dict[str, Any], expected: dict[str, Any], atol: float) -> None:
    assert state["epoch"] == expected["epoch"] == EPOCHS - 1
    for key, value in expected["model"].items():
        torch.testing.assert_close(state["model"][key], value, atol=atol, rtol=0, msg=key)


def test_one_worker_per_node_matches_a_one_node_run(
    head: Head, second_node: Node, reference: dict[str, Any], data: str, s3_server: str, train_config: str
) -> None:
    storage = f"{s3_server}/two-nodes/runs"
    args = _train_args(data, storage, "two-nodes", train_config, "--placement-strategy", "STRICT_SPREAD")
    job = _submit(head, args)
    assert len(set(_actor_nodes(head, job["job_id"], "TrainWorker"))) == 2, "one worker per node"
    summary = _summary(job["logs"])
    assert summary["run"] == f"{storage}/two-nodes" and summary["epochs"] == EPOCHS
    assert sorted(read_checkpoint_epochs(summary["run"]).values()) == list(range(EPOCHS))
    # gloo's all-reduce over two nodes sums as over two processes on one: the same weights.
    _assert_same_weights(_final_state(summary["run"]), reference["state"], atol=1e-5)


def test_localize_runs_actors_on_both_nodes(
    head: Head, second_node: Node, reference: dict[str, Any], data: str, s3_server: str
) -> None:
    output = f"{s3_server}/two-nodes/pred"
    args = ["acol", "localize", "--model", reference["model"], "--data", data, "--output", output]
    job = _submit(head, [*args, "--split", "all", "--actors", "2", "--batch-size", "4"])
    assert len(set(_actor_nodes(head, job["job_id"], "MapWorker"))) == 2, "one actor per node"
    assert _summary(job["logs"])["rows"] == 48
    ids = read_predictions(output).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 48


def test_sweep_trials_run_on_both_nodes(head: Head, second_node: Node, data: str, s3_server: str) -> None:
    storage = f"{s3_server}/two-nodes/sweeps"
    args = ["acol", "tune", "--space", "tune/spaces/smoke.yaml", "--data", data, "--trials", "2"]
    args += ["--storage", storage, "--name", "two-nodes", "--workers-per-trial", "1"]
    job = _submit(head, [*args, "--cpus-per-worker", "2", "--max-concurrent-trials", "2"])
    assert len(set(_actor_nodes(head, job["job_id"], "TrainWorker"))) == 2, "one trial per node"
    summary = _summary(job["logs"])
    assert sum(summary["counts"].values()) == 2, summary["counts"]
    assert summary["best_model_uri"].startswith(f"{storage}/two-nodes/")
    assert read_bytes(summary["best_model_uri"])[:8]  # the best trial's export is on S3


def test_pipeline_deployment_runs_on_both_nodes(
    head: Head, second_node: Node, s3_server: str, tmp_path: Path
) -> None:
    run_uri = f"{s3_server}/two-nodes/pipeline"
    # The smoke preset's data and training; one model, two workers and two localize actors per stage.
    params = {
        "run_uri": run_uri,
        "source_options": {"num_subjects": 12, "slices_per_subject": 4, "size": 32},
        "models": [{"label": "acol", "model": "acol", "options": {"delta": 0.9}}],
        "train": {"epochs": 1, "image_size": 32, "batch_size": 16, "augment": False},
        "workers": 2,
        "placement_strategy": "STRICT_SPREAD",
        "actors": 2,
    }
    before = _drivers(head)
    with prefect_server_at(tmp_path) as (env, root):
        # The flow run reaches the cluster at the head's GCS address, with the S3 settings of this process.
        with pipeline_worker(env, worker_env(env, head, head.gcs), root) as run_deployment:
            run_deployment(params)
    drivers = {k: v for k, v in _drivers(head).items() if k not in before}
    assert list(drivers.values()) == ["SUCCEEDED"], drivers  # the flow run's Ray driver, finished
    job_id = next(iter(drivers))
    assert len(set(_actor_nodes(head, job_id, "TrainWorker"))) == 2, "one train worker per node"
    assert len(set(_actor_nodes(head, job_id, "MapWorker"))) == 2, "one localize actor per node"
    assert_complete_run(run_uri, ["acol"])


def test_lost_node_mid_training_resumes_from_the_last_checkpoint(
    head: Head, second_node: Node, reference: dict[str, Any], data: str, s3_server: str, train_config: str
) -> None:
    storage = f"{s3_server}/two-nodes/runs"
    run = f"{storage}/node-lost"
    args = _train_args(data, storage, "node-lost", train_config, "--placement-strategy", "SPREAD")
    proc = _submit(head, [*args, "--max-failures", "2"], wait=False)
    killed: dict[str, Any] = {}

    def kill_after_first_checkpoint() -> None:
        """SIGKILL the second node as soon as Ray Train has registered a checkpoint."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(StorageError):
                snapshot = json.loads(read_bytes(join(run, SNAPSHOT)))
                if snapshot.get("checkpoint_results"):
                    second_node.kill()
                    killed["registered"] = len(snapshot["checkpoint_results"])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    job = _finish(head, proc)
    killer.join(5)
    assert "registered" in killed, "the node was not killed during the run"
    workers = _actor_nodes(head, job["job_id"], "TrainWorker")
    # 2 workers spread over both nodes, then 2 more started on the head after the loss
    assert len(set(workers)) == 2, "the workers were not spread over both nodes before the loss"
    assert len(workers) == 4, f"no restart after the node loss ({killed['registered']} checkpoints then)"
    # Resumed from a checkpoint, not from scratch: epoch 0 was trained once. (A later epoch may have
    # been uploaded but not yet registered when the node died: Ray redoes that one.)
    assert list(read_checkpoint_epochs(run).values()).count(0) == 1
    assert set(read_checkpoint_epochs(run).values()) == set(range(EPOCHS))
    summary = _summary(job["logs"])
    assert summary["epochs"] == EPOCHS
    _assert_same_weights(_final_state(run), reference["state"], atol=1e-5)
