"""The Ray-free parts of a training run: the plan fitted to the dataset, the checkpoint folder, the
workers' schedule and the result's kept checkpoint (``tests/test_train_ray.py`` runs them under Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acol_core.balance import repeat_rows, resolve_class_balance
from acol_core.checkpoints import read_checkpoint, read_checkpoint_epochs, write_checkpoint
from acol_core.config import ConfigError, TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.export import MODEL_FILE, load_exported
from acol_core.models import create_model
from acol_core.storage import join
from acol_core.train_session import (
    RunOptions,
    checkpoint_due,
    plan_run,
    shuffle_seed,
    summarize_run,
    val_fits_in_memory,
)

CONFIG = TrainConfig(model="cam", backbone="tiny", image_size=32, epochs=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("phantom") / "data")
    prepare_dataset("phantom", uri, num_subjects=6, slices_per_subject=4, size=32, rows_per_shard=16)
    return uri


def test_plan_fits_the_config_to_the_dataset(phantom: str, tmp_path: Path) -> None:
    plan = plan_run(CONFIG.replace(num_classes=5), RunOptions(data=phantom, storage=str(tmp_path)))
    assert plan.config.num_classes == len(plan.class_names) == 2
    assert plan.config.in_channels == 1  # from the manifest
    assert plan.score_metric == "val_pxap"  # the phantom has fullsup rows
    sent = plan.loop_config(has_val=True)
    assert TrainConfig.from_dict(sent["train"]) == plan.config
    assert sent["val_rows"] == plan.val_rows > 0 and sent["class_balance"] == plan.balance.to_dict()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "../out"}, "run name must be a plain folder name"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"placement_strategy": "ANYWHERE"}, "placement_strategy must be PACK"),
    ],
)
def test_bad_options_fail_before_any_worker(
    phantom: str, tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_run(CONFIG, RunOptions(data=phantom, storage=str(tmp_path), **changes))


def test_a_checkpoint_reads_back_as_state_history_and_export(tmp_path: Path) -> None:
    model = create_model("cam", num_classes=2, in_channels=1, backbone="tiny")
    state = {"model": model.state_dict(), "epoch": 3, "config": CONFIG.to_dict()}
    folder = tmp_path / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    history = [{"epoch": 0.0, "val_pxap": 0.5}]
    write_checkpoint(folder, state, CONFIG.replace(in_channels=1), ["a", "b"], history, {"applied": False})
    restored, read_back = read_checkpoint(folder, str(folder))
    assert restored["epoch"] == 3 and read_back == history
    exported, info = load_exported(str(folder / MODEL_FILE))
    assert info.class_names == ["a", "b"] and info.extra["epoch"] == 3
    weights = exported.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert read_checkpoint_epochs(str(tmp_path / "run")) == {folder.name: 3}


def test_the_result_keeps_the_selected_checkpoint(tmp_path: Path) -> None:
    storage = str(tmp_path)
    history = [
        # enough val rows of each class for the rule to rank epochs (else it keeps the last)
        {"epoch": float(e), "val_balanced_accuracy": 0.9, "val_rows_0": 20, "val_rows_1": 20, "val_pxap": p}
        for e, p in enumerate([0.2, 0.7, 0.4])
    ]
    kept = [(str(tmp_path / "r" / f"checkpoint_{e}"), history[e]) for e in (1, 2)]
    options = RunOptions(data="unused", storage=storage, name="r")
    result = summarize_run(
        options, "val_pxap", history, kept, kept[-1][0], resolve_class_balance("none", [5, 5])
    )
    assert result.checkpoint_uri == join(storage, "r", "checkpoint_1")
    assert result.model_uri == join(result.checkpoint_uri, MODEL_FILE)
    assert result.latest_checkpoint_uri == join(storage, "r", "checkpoint_2")
    assert result.metrics["val_pxap"] == 0.7 and result.selection["epoch"] == 1
    nothing = summarize_run(options, "val_pxap", [], [], None, resolve_class_balance("none", [5, 5]))
    assert (
        nothing.checkpoint_uri is None and nothing.model_uri is None and nothing.latest_checkpoint_uri is None
    )


def test_worker_schedule() -> None:
    seeds = {shuffle_seed(CONFIG, epoch, rank) for epoch in range(4) for rank in range(4)}
    assert len(seeds) == 16  # no two (epoch, rank) pairs share a shuffle order
    assert [checkpoint_due(CONFIG, e) for e in range(4)] == [False, True, False, True]
    assert [checkpoint_due(CONFIG.replace(epochs=3), e) for e in range(3)] == [False, True, True]
    assert val_fits_in_memory(CONFIG, 120) and not val_fits_in_memory(CONFIG.replace(image_size=512), 10**5)


def test_repeat_rows_copies_whole_rows_by_class() -> None:
    batch = {"label": np.array([0, 1, 0]), "image": np.array([b"a", b"b", b"c"], dtype=object)}
    out = repeat_rows(batch, [1.0, 3.0])
    assert out["label"].tolist() == [0, 1, 1, 1, 0]
    assert out["image"].tolist() == [b"a", b"b", b"b", b"b", b"c"]
