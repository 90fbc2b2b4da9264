"""A training checkpoint folder: what a training run writes each time it checkpoints, and resumes from.

Each ``checkpoint_<timestamp>/`` (Ray Train's name) under ``<storage>/<run name>/`` holds:

- ``state.pt``: model, optimiser, scheduler and epoch, what resuming needs (tensors and plain values only);
- ``model.safetensors``: the self-describing export ``acol localize`` loads (``acol_core.export``);
- ``history.json``: the metrics of every epoch so far.

Plain files and storage URIs only: ``acol_core.jobs.train_run`` hands the folder to Ray Train.

Examples:
    >>> write_checkpoint(folder, state, config, ["healthy", "tumour"], history)  # doctest: +SKIP
    >>> read_checkpoint_epochs("s3://bucket/runs/acol-train")  # doctest: +SKIP
    {'checkpoint_2025-01-01_00-00-00.000000': 1}
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

from acol_core.config import TrainConfig
from acol_core.errors import UserError
from acol_core.export import MODEL_FILE

__all__ = [
    "HISTORY_FILE",
    "STATE_FILE",
    "CheckpointError",
    "load_checkpoint_state",
    "read_checkpoint",
    "read_checkpoint_epochs",
    "read_history",
    "write_checkpoint",
]

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint_\d")  # Ray Train's names: checkpoint_<timestamp>


class CheckpointError(UserError, ValueError):
    """A ``state.pt`` this code did not write (a pickle with objects in it) or a damaged one."""


class _StateModule:
    """Just enough of an nn.Module for ``export_bytes``: a state dict."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def load_checkpoint_state(data: bytes, where: str) -> dict:
    """A ``state.pt``'s contents: tensors and plain values only, never unpickled objects.

    Raises:
        CheckpointError: one line naming ``where``, for a foreign pickle or a damaged file.
    """
    from acol_core.train import load_checkpoint_bytes

    try:
        return load_checkpoint_bytes(data)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{where}: not a checkpoint this code wrote, or damaged ({type(exc).__name__}: {reason})"
        ) from exc


def write_checkpoint(
    folder: Path,
    state: dict,
    config: TrainConfig,
    class_names: list[str],
    history: list[dict[str, float]],
    class_balance: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint's three files into ``folder`` (``state`` as ``train.fit`` hands it to hooks)."""
    from acol_core.export import export_bytes
    from acol_core.train import checkpoint_bytes

    (folder / STATE_FILE).write_bytes(checkpoint_bytes(state))
    model_bytes = export_bytes(
        _StateModule(state["model"]),
        config,
        class_names,
        epoch=int(state["epoch"]),
        class_balance=class_balance or {},
    )
    (folder / MODEL_FILE).write_bytes(model_bytes)
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))


def read_history(folder: Path) -> list[dict[str, float]]:
    """The epoch metrics a checkpoint folder recorded; [] when it has none."""
    path = folder / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []


def read_checkpoint(folder: Path, where: str) -> tuple[dict, list[dict[str, float]]]:
    """A checkpoint folder's state (checked like ``load_checkpoint_state``, naming ``where``) and history."""
    state = load_checkpoint_state((folder / STATE_FILE).read_bytes(), f"{where}/{STATE_FILE}")
    return state, read_history(folder)


def read_checkpoint_epochs(run_uri: str) -> dict[str, int]:
    """``{checkpoint folder name: epoch}`` for the complete checkpoints under a run (from ``state.pt``).

    A folder without all of a checkpoint's files (an upload cut short by a storage outage or a killed
    driver; Ray never registered it) is skipped: it is not a checkpoint to resume from. Ray resumes from
    what its ``checkpoint_manager_snapshot.json`` registered, which a folder's presence does not prove:
    the workers of a killed driver may finish an upload nobody registers.
    """
    from acol_core.storage import join, list_dir, read_bytes

    epochs = {}
    for name in list_dir(run_uri):
        folder = join(run_uri, name)
        if _CHECKPOINT_DIR.match(name) and {STATE_FILE, MODEL_FILE, HISTORY_FILE} <= set(list_dir(folder)):
            state_uri = join(folder, STATE_FILE)
            epochs[name] = int(load_checkpoint_state(read_bytes(state_uri), state_uri)["epoch"])
    return epochs
