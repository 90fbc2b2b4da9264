"""The Ray Train run on a local in-process Ray: DDP on 2 CPU workers, Ray Data streaming, checkpoints
on local and S3 storage, a worker killed mid-epoch, resuming by run name, the exported model.

One local Ray serves the module (started after the S3 fixture, so its workers inherit the AWS_* env).
Every Ray step runs under a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ray_local import command_lines, injected_fault, with_timeout
from typer.testing import CliRunner

from acol_core.checkpoints import HISTORY_FILE, STATE_FILE, read_checkpoint_epochs
from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.export import MODEL_FILE, load_exported
from acol_core.selection import select_epoch
from acol_core.storage import join, list_dir, read_bytes, resolve
from acol_core.train_session import RunOptions, TrainRunResult

ray = pytest.importorskip("ray")

from acol_core.jobs.train_run import build_datasets, run_training  # noqa: E402
from acol_core.train import load_checkpoint_bytes  # noqa: E402

RUN_TIMEOUT_S = 240.0
# 48 rows: 32 train (2 batches of 8 per worker and epoch with 2 workers), 8 val (some fullsup), 8 test.
PHANTOM = {"num_subjects": 6, "slices_per_subject": 8, "size": 32, "rows_per_shard": 16}


def _config(**changes: Any) -> TrainConfig:
    # augment off: the data pipeline is then deterministic (see the fault test), the loop otherwise is not.
    base = TrainConfig(
        model="acol",
        backbone="tiny",
        model_options={"delta": 0.6},
        image_size=32,
        epochs=2,
        batch_size=8,
        augment=False,
        seed=3,
    )
    return base.replace(**changes)


def _with_timeout(fn: Callable[[], Any], seconds: float = RUN_TIMEOUT_S) -> Any:
    return with_timeout(fn, seconds)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("phantom") / "data")
    prepare_dataset("phantom", uri, **PHANTOM)
    return uri


@pytest.fixture(scope="module")
def reference(local_ray: None, phantom: str, tmp_path_factory: pytest.TempPathFactory) -> TrainRunResult:
    """An uninterrupted 2-worker run on local storage, every checkpoint kept."""
    options = RunOptions(
        data=phantom,
        storage=str(tmp_path_factory.mktemp("runs")),
        name="reference",
        workers=2,
        keep_checkpoints=None,
        deterministic=True,
        max_failures=0,
    )
    return _with_timeout(lambda: run_training(_config(), options))


def _state(checkpoint_uri: str) -> dict:
    return load_checkpoint_bytes(read_bytes(join(checkpoint_uri, STATE_FILE)))


def test_split_selection_streams_decoded_rows(local_ray: None, phantom: str) -> None:
    datasets = _with_timeout(lambda: build_datasets(phantom, _config(), deterministic=True), 60)
    assert sorted(datasets) == ["train", "val"]
    batch = _with_timeout(
        lambda: next(iter(datasets["val"].iter_batches(batch_size=100, batch_format="numpy"))), 60
    )
    n = len(batch["label"])
    assert n == 8  # the manifest's val count, not all 48 rows
    assert batch["image"].shape == (n, 1, 32, 32) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (n, 32, 32) and set(np.unique(batch["mask"])) <= {0, 1, 255}
    assert batch["fullsup"].dtype == bool and batch["fullsup"].any()


def test_sampler_repeats_train_rows_by_class_in_the_stream(local_ray: None, phantom: str) -> None:
    """class_balance sampler under Ray Data: each train row as often as its class's factor (integers here,
    so the count is exact), every copy decoded on its own; val is not resampled."""
    counts = np.bincount(
        open_dataset(phantom).read_table("train", columns=["label"])["label"].to_numpy(), minlength=2
    )
    assert counts.min() > 0
    datasets = _with_timeout(lambda: build_datasets(phantom, _config(sampling_factors=[1.0, 3.0])), 60)
    labels = _with_timeout(
        lambda: np.concatenate([b["label"] for b in datasets["train"].iter_batches(batch_format="numpy")]), 60
    )
    assert np.bincount(labels, minlength=2).tolist() == [int(counts[0]), 3 * int(counts[1])]
    val = _with_timeout(lambda: datasets["val"].count(), 60)
    assert val == 8


def test_run_reports_every_epoch_and_exports_a_loadable_model(reference: TrainRunResult) -> None:
    assert [h["epoch"] for h in reference.history] == [0.0, 1.0]
    for h in reference.history:
        assert h["train_images"] == 16.0  # rank 0's half of the 32 train rows
        assert 0.0 <= h["val_accuracy"] <= 1.0
        assert 0.0 <= h["val_pxap"] <= 1.0 and 0.0 <= h["val_max_box_acc_v2"] <= 1.0
    epochs = read_checkpoint_epochs(reference.run_uri)
    assert sorted(epochs.values()) == [0, 1]
    assert reference.latest_checkpoint_uri.endswith(max(epochs, key=epochs.get))
    assert reference.model_uri == join(reference.checkpoint_uri, MODEL_FILE)
    # kept by the selection rule (8 val rows: too few per class, so the last epoch); the reported
    # metrics are that checkpoint's, with balanced accuracy and per-class recall
    best_epoch = _state(reference.checkpoint_uri)["epoch"]
    assert reference.metrics["epoch"] == best_epoch == reference.selection["epoch"]
    assert best_epoch == select_epoch(reference.history).epoch == 1
    assert "fewer than" in reference.selection["reason"]
    for key in ("val_balanced_accuracy", "val_recall_0", "val_recall_1", "val_rows_0", "val_rows_1"):
        assert key in reference.metrics, key
    counts = reference.class_balance["train_counts"]
    assert sum(counts) == 32 and reference.class_balance["applied"] == (min(counts) / 32 < 0.35)
    info = load_exported(reference.model_uri)[1]
    assert info.extra["class_balance"] == reference.class_balance

    model, info = load_exported(reference.model_uri)
    assert info.class_names == ["healthy", "tumour"] and info.extra["epoch"] == best_epoch
    state = _state(reference.checkpoint_uri)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 32, 32))
    assert out["logits"].shape == (2, 2)


def _s3_files(prefix_uri: str) -> list[str]:
    fs, path = resolve(prefix_uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def test_killed_worker_resumes_from_checkpoint_on_s3(
    reference: TrainRunResult, s3_server: str, aws_secret_key: str, tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed after 1 batch of epoch 1; the run restarts from the epoch-0 checkpoint.

    Data and checkpoints are on S3 here (the workers read and write with the AWS env they inherited).
    With ``deterministic`` Ray Data hands each worker the same rows in the same order every run and
    the local shuffle is seeded by epoch, augmentation is off and gloo's all-reduce is exact, so the
    resumed run must end with exactly the reference run's weights: any state lost or doubled in the
    restart (an epoch trained twice, optimiser momentum or the schedule not restored) would show.
    """
    data = f"{s3_server}/train-ray/data"
    prepare_dataset("phantom", data, **PHANTOM)
    marker = tmp_path / "killed-once"
    options = RunOptions(
        data=data,
        storage=f"{s3_server}/train-ray/runs",
        name="faulty",
        workers=2,
        keep_checkpoints=None,
        deterministic=True,
        max_failures=1,
    )
    with injected_fault("train", {"rank": 1, "epoch": 1, "after_batches": 1, "marker": str(marker)}):
        result = _with_timeout(lambda: run_training(_config(), options))
    assert marker.exists(), "the fault was not injected"
    assert result.run_uri == f"{s3_server}/train-ray/runs/faulty"
    # each epoch was reported (checkpointed) exactly once, in order
    epochs = read_checkpoint_epochs(result.run_uri)
    assert sorted(epochs.values()) == [0, 1]
    assert [h["epoch"] for h in result.history] == [0.0, 1.0]

    final = _state(result.latest_checkpoint_uri)
    expected = _state(reference.latest_checkpoint_uri)
    assert final["epoch"] == expected["epoch"] == 1
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    for mine, theirs in zip(result.history, reference.history, strict=True):
        for key in ("train_loss", "val_accuracy", "val_pxap", "val_max_box_acc_v2"):
            assert mine[key] == theirs[key], (key, mine["epoch"])

    model, info = load_exported(result.model_uri)
    assert info.config.model == "acol" and info.config.model_options == {"delta": 0.6}
    # the fake secret from the environment must not be written into the run's files
    for path in _s3_files(result.run_uri):
        name = path.rsplit("/", 1)[-1]
        if name.endswith((".json", ".pkl", ".txt", ".yaml")) or name in (STATE_FILE, HISTORY_FILE):
            assert aws_secret_key.encode() not in read_bytes(f"s3://{path}"), path


def test_same_name_and_storage_resumes_with_more_epochs(reference: TrainRunResult, phantom: str) -> None:
    storage = reference.run_uri.rsplit("/", 1)[0]
    before = read_checkpoint_epochs(reference.run_uri)
    options = RunOptions(
        data=phantom,
        storage=storage,
        name="reference",
        workers=2,
        keep_checkpoints=None,
        deterministic=True,
        max_failures=0,
    )
    result = _with_timeout(lambda: run_training(_config(epochs=3), options))
    after = read_checkpoint_epochs(reference.run_uri)
    new = {name: epoch for name, epoch in after.items() if name not in before}
    assert list(new.values()) == [2]  # only the missing epoch was trained
    assert [h["epoch"] for h in result.history] == [0.0, 1.0, 2.0]
    assert result.history[:2] == reference.history
    # the new schedule applies: cosine over 3 epochs, not the finished 2-epoch run's final rate of 0
    assert result.history[2]["lr"] == pytest.approx(
        result.history[0]["lr"] * 0.5 * (1 + np.cos(np.pi * 2 / 3))
    )
    assert "val_pxap" in json.loads(read_bytes(join(result.latest_checkpoint_uri, HISTORY_FILE)))[-1]
    assert set(list_dir(result.latest_checkpoint_uri)) >= {STATE_FILE, MODEL_FILE, HISTORY_FILE}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{missing}"], "no _manifest.json"),
        (["--data", "{data}", "--model", "bogus"], "unknown model 'bogus'"),
        (["--data", "{data}", "--workers", "0"], "workers must be >= 1"),
        (["--data", "{data}", "--delta", "1.5"], "delta must be in (0, 1)"),
        (
            ["--data", "{data}", "--class-balance", "oversample"],
            "class_balance must be one of auto, weights, sampler",
        ),
    ],
)
def test_train_command_fails_in_one_line_before_starting_ray(
    args: list[str], message: str, phantom: str, tmp_path: Path
) -> None:
    values = {"missing": str(tmp_path / "nothing"), "data": phantom}
    argv = ["train", "--storage", str(tmp_path / "runs"), *[a.format(**values) for a in args]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    lines = command_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("acol train: error:") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()
