"""The layout of a pipeline run folder: what `flows/pipeline.py` writes and `acol report` reads.

A run is one folder (local path or ``s3://``) holding every stage's output for one dataset::

    <run>/
      data/                       the Parquet dataset (absent when the run used a dataset elsewhere)
      train/<label>/              Ray Train storage of each trained model (checkpoints)
      models/<label>.safetensors  each model's export (``acol_core.export``)
      sweep/<name>/               the δ / architecture sweep (``acol tune`` outputs), when one ran
      predictions/<label>/        ``acol localize`` output (val and test rows)
      evaluation/<label>.json     ``acol evaluate`` output on test (thresholds chosen on fullsup val)
      report/index.html           ``acol report`` (with its PNGs beside it)
      run.json                    the run record below, written after every stage it lists finished

``<label>`` names one trained model of the run (``cam``, ``acol``, ``acol-d0.80``, ``cam+anatomy``):
letters, digits and ``.+_-`` only, so it is safe as a file name.

Examples:
    >>> record = RunRecord(name="demo", data_uri="runs/demo/data")
    >>> record.models["cam"] = ModelEntry(model="cam", options={})
    >>> RunRecord.from_dict(record.to_dict()).models["cam"].model
    'cam'
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from acol_core.storage import exists, join, read_bytes, write_bytes

__all__ = [
    "RUN_FILE",
    "ModelEntry",
    "RunRecord",
    "check_label",
    "evaluation_uri",
    "model_uri",
    "predictions_uri",
    "read_run",
    "report_uri",
    "sweep_uri",
    "train_uri",
    "write_run",
]

RUN_FILE = "run.json"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")


def check_label(label: str) -> str:
    """Return ``label`` if it is a safe model label (a file name: no ``/``, no ``..``), else raise."""
    if not _LABEL.match(label) or ".." in label:
        raise ValueError(
            f"model label {label!r}: use 1-64 letters, digits and . + _ - (starting alphanumeric)"
        )
    return label


def train_uri(run: str, label: str) -> str:
    return join(run, "train", check_label(label))


def model_uri(run: str, label: str) -> str:
    return join(run, "models", f"{check_label(label)}.safetensors")


def predictions_uri(run: str, label: str) -> str:
    return join(run, "predictions", check_label(label))


def evaluation_uri(run: str, label: str) -> str:
    return join(run, "evaluation", f"{check_label(label)}.json")


def sweep_uri(run: str, name: str = "delta") -> str:
    return join(run, "sweep", check_label(name))


def report_uri(run: str) -> str:
    """The report's folder (``index.html`` and its PNGs)."""
    return join(run, "report")


@dataclass
class ModelEntry:
    """One trained model of a run: how it was built and where its outputs are (URIs, None if not yet)."""

    model: str
    options: dict[str, Any]
    backbone: str = "tiny"
    epochs: int | None = None
    model_uri: str | None = None
    predictions_uri: str | None = None
    evaluation_uri: str | None = None
    source: str = "train"  # "train", "sweep" for the sweep's best model, "reuse:<label>" for a shared model
    seconds: float | None = None
    localize: dict[str, Any] = field(default_factory=dict)  # localize options (e.g. {"gate": "anatomy"})


@dataclass
class RunRecord:
    """``run.json``: the run's dataset, its models in order, the sweep if any, and stage timings."""

    name: str
    data_uri: str
    models: dict[str, ModelEntry] = field(default_factory=dict)
    sweep_uri: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {"name", "data_uri", "models", "sweep_uri", "stages", "created"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{RUN_FILE}: unknown keys {sorted(unknown)}")
        models = {check_label(k): ModelEntry(**v) for k, v in (data.get("models") or {}).items()}
        return cls(**{**data, "models": models})


def write_run(run: str, record: RunRecord) -> str:
    """Write ``run.json`` (a single small object: the store replaces it whole); returns its URI."""
    uri = join(run, RUN_FILE)
    write_bytes(uri, (json.dumps(record.to_dict(), indent=2) + "\n").encode())
    return uri


def read_run(run: str) -> RunRecord:
    """Read ``<run>/run.json``; a folder without one is not a run (FileNotFoundError, one line)."""
    uri = join(run, RUN_FILE)
    if not exists(uri):
        raise FileNotFoundError(
            f"{run}: not a pipeline run (no {RUN_FILE}); run the pipeline or `make demo` first"
        )
    try:
        return RunRecord.from_dict(json.loads(read_bytes(uri)))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{uri}: not a valid run record: {exc}") from None
