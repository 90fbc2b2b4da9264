"""Ray jobs that lose processes: a localize actor SIGKILLed mid-job, a batch that kills every actor it
reaches, a training run whose worker dies with no restarts left. Data and predictions live on the
session's S3 server; the last test greps every output for credentials.

One local Ray (2 CPUs, token auth on) serves the module, started after the S3 fixture so that its
workers inherit the AWS_* environment. Every Ray step runs under a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import typer
from ray_local import injected_fault, with_timeout

from acol_core import storage
from acol_core.cli import clear_errors
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.export import export_model
from acol_core.models import create_model
from acol_core.predictions import SUCCESS_NAME, decode_cam, read_predictions, read_success

ray = pytest.importorskip("ray")

from faultkit import ACOL, readable_forms  # noqa: E402

from acol_core.batch_localize import localize_plain  # noqa: E402
from acol_core.checkpoints import read_checkpoint_epochs  # noqa: E402
from acol_core.jobs.localize_job import ACTOR_RESTARTS, LocalizeError, LocalizeOptions, run_localize  # noqa: E402
from acol_core.jobs.train_run import TrainingError, run_training  # noqa: E402
from acol_core.train_session import RunOptions  # noqa: E402

pytestmark = pytest.mark.integration

TIMEOUT_S = 150.0
# 48 rows, all in the test split: 12 batches of 4 for the localize job.
PHANTOM = {
    "num_subjects": 6,
    "slices_per_subject": 8,
    "size": 32,
    "rows_per_shard": 8,
    "split_fractions": (0, 0, 1),
}


def _with_timeout(fn: Callable[[], Any], seconds: float = TIMEOUT_S) -> Any:
    return with_timeout(fn, seconds)


@pytest.fixture(scope="module")
def s3_data(s3_server: str) -> str:
    uri = f"{s3_server}/ray-faults/data"
    prepare_dataset("phantom", uri, **PHANTOM)
    return uri


@pytest.fixture(scope="module")
def model_uri(s3_server: str) -> str:
    """An untrained tiny ACoL export: the faults are about the job, not the weights."""
    config = TrainConfig(model="acol", image_size=32)
    model = create_model("acol", num_classes=2, in_channels=1, backbone="tiny")
    return export_model(model, config, ["healthy", "tumour"], f"{s3_server}/ray-faults/model.safetensors")


@pytest.fixture(scope="module")
def image_ids(s3_data: str) -> list[str]:
    return open_dataset(s3_data).read_table(columns=["image_id"]).column("image_id").to_pylist()


def _fault(tmp_path: Path, image_id: str, times: int) -> dict[str, Any]:
    marker_dir = tmp_path / "deaths"
    marker_dir.mkdir()
    return {"image_id": image_id, "times": times, "marker_dir": str(marker_dir)}


@pytest.fixture(scope="module")
def killed_actor_run(
    local_ray: None, s3_data: str, model_uri: str, image_ids: list[str], s3_server: str, tmp_path_factory
) -> tuple[Any, str, dict[str, Any]]:
    """A 2-actor job whose actor holding row 20 is SIGKILLed once, mid-job."""
    out = f"{s3_server}/ray-faults/pred"
    fault = _fault(tmp_path_factory.mktemp("killed-actor"), image_ids[20], times=1)
    with injected_fault("localize", fault):
        result = _with_timeout(
            lambda: run_localize(LocalizeOptions(model_uri, s3_data, out, actors=2, batch_size=4))
        )
    return result, out, fault


def test_actor_killed_mid_job_still_writes_every_row_once(
    killed_actor_run: tuple[Any, str, dict[str, Any]], s3_data: str, model_uri: str, image_ids: list[str]
) -> None:
    result, out, fault = killed_actor_run
    assert len(os.listdir(fault["marker_dir"])) == 1, "the fault was not injected"
    assert result.info.num_rows == 48
    table = read_predictions(out)
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(image_ids) and len(set(ids)) == len(ids)
    # The retried batch gives what an undisturbed run gives.
    plain = {r["image_id"]: r for r in localize_plain(model_uri, s3_data, "test", batch_size=48).to_pylist()}
    for row in table.to_pylist():
        other = plain[row["image_id"]]
        assert row["pred_label"] == other["pred_label"]
        assert np.abs(decode_cam(row["cam"]) - decode_cam(other["cam"])).max() <= 1.5 / 255


def test_batch_that_kills_every_actor_fails_clearly_and_commits_nothing(
    local_ray: None, s3_data: str, model_uri: str, image_ids: list[str], s3_server: str, tmp_path: Path
) -> None:
    out = f"{s3_server}/ray-faults/pred-poisoned"
    fault = _fault(tmp_path, image_ids[5], times=100)  # every actor that gets row 5 dies
    with injected_fault("localize", fault), pytest.raises(LocalizeError) as err:
        _with_timeout(lambda: run_localize(LocalizeOptions(model_uri, s3_data, out, actors=2, batch_size=4)))
    message = str(err.value)
    assert "\n" not in message and "ActorDiedError" in message and "nothing was committed" in message, message
    # The batch was retried, but not forever (Ray Data's default: the job would hang, not fail).
    assert 2 <= len(os.listdir(fault["marker_dir"])) <= 2 * (1 + ACTOR_RESTARTS)
    assert storage.list_dir(out) == []  # no _SUCCESS.json, no prediction file, no staging folder
    with pytest.raises(Exception, match=SUCCESS_NAME):
        read_predictions(out)


def test_training_that_cannot_recover_fails_in_one_line(local_ray: None, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    prepare_dataset("phantom", data, num_subjects=4, slices_per_subject=4, size=32, split_fractions=(1, 0, 0))
    config = TrainConfig(model="acol", image_size=32, epochs=2, batch_size=8, augment=False, num_threads=1)
    options = RunOptions(
        data=data,
        storage=str(tmp_path / "runs"),
        name="doomed",
        max_failures=0,
        keep_checkpoints=None,
    )
    fault = {"rank": 0, "epoch": 1, "after_batches": 1, "marker": str(tmp_path / "killed")}
    with injected_fault("train", fault), pytest.raises(TrainingError) as err:
        _with_timeout(lambda: run_training(config, options))
    message = str(err.value)
    assert (tmp_path / "killed").exists()
    assert "\n" not in message and message.startswith("run 'doomed' failed: rank 0: "), message
    assert "run the same command again to resume" in message
    assert list(read_checkpoint_epochs(str(tmp_path / "runs" / "doomed")).values()) == [0]  # kept

    @clear_errors
    def train() -> None:
        raise err.value

    with pytest.raises(typer.Exit) as exit_info:
        train()
    assert exit_info.value.exit_code == 1


def test_no_credential_in_predictions_metrics_or_output(
    killed_actor_run: tuple[Any, str, dict[str, Any]],
    s3_server: str,
    s3_data: str,
    aws_secret_key: str,
    tmp_path: Path,
) -> None:
    """Every object the dataset, model and localize outputs left on S3, and `acol evaluate`'s output."""
    pred = killed_actor_run[1]
    metrics = f"{s3_server}/ray-faults/metrics.json"
    done = subprocess.run(
        [ACOL, "evaluate", "--predictions", pred, "--data", s3_data, "--output", metrics],
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["rows"] == 48
    assert read_success(pred).num_rows == 48
    fs, root = storage.resolve(f"{s3_server}/ray-faults")
    outputs = {"evaluate stdout": done.stdout, "evaluate stderr": done.stderr}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            outputs[info.path] = storage.read_bytes(f"s3://{info.path}")
    assert any(name.endswith("metrics.json") for name in outputs) and len(outputs) > 10
    secrets = [aws_secret_key.encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    secrets.append(os.environ["RAY_AUTH_TOKEN"].encode())
    leaks = [
        name
        for name, data in outputs.items()
        for form in readable_forms(name, data)
        for secret in secrets
        if secret in form
    ]
    assert not leaks, leaks
