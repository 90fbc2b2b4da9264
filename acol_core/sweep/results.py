"""A sweep's results without Ray: one table row per trial, each trial's best epoch, the best trial, and
what lands under ``<sweep>/results/``: ``sweep.parquet`` + ``sweep.csv`` (one row per trial),
``best_config.yaml``, ``best_model.safetensors``, ``summary.json`` (best trial, its test-split metrics)
and PNG plots.

The epoch and trial choices follow training's rule (``acol_core.selection``). ``sweep_table`` reads
anything shaped like Tune's ``ResultGrid`` (results with ``metrics``, ``metrics_dataframe``, ``path``,
``error``, ``config``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acol_core.config import TrainConfig
from acol_core.errors import one_line
from acol_core.selection import BALANCED_ACCURACY, MIN_CLASS_ROWS, best_within_margin, val_class_rows
from acol_core.sweep.space import SweepSpace

__all__ = [
    "COMPLETED_DIR",
    "RESULTS_DIR",
    "TABLE_METRICS",
    "TRIALS_DIR",
    "SweepResult",
    "best_epoch",
    "best_row",
    "completion_uri",
    "evaluate_model_on_split",
    "experiment_trial_status",
    "read_completions",
    "sweep_table",
    "write_sweep_outputs",
]

# Metrics kept in the sweep table and published as gauges (when a trial reports them).
TABLE_METRICS = (
    "val_pxap",
    "val_max_box_acc_v2",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_off_target",
    "train_loss",
)
RESULTS_DIR = "results"
COMPLETED_DIR = "completed"
TRIALS_DIR = "trials"


def completion_uri(sweep_uri: str, trial_id: str) -> str:
    from acol_core.storage import join

    return join(sweep_uri, COMPLETED_DIR, trial_id)


def read_completions(sweep_uri: str, trial_id: str) -> list[dict[str, Any]]:
    from acol_core.storage import join, list_dir, read_bytes

    folder = completion_uri(sweep_uri, trial_id)
    return [json.loads(read_bytes(join(folder, n))) for n in list_dir(folder) if n.endswith(".json")]


def experiment_trial_status(sweep_uri: str) -> dict[str, str]:
    """``{trial id: Tune status}`` from the newest experiment state a sweep saved ({} before the first)."""
    from acol_core.storage import join, list_dir, read_bytes

    states = sorted(
        n for n in list_dir(sweep_uri) if n.startswith("experiment_state-") and n.endswith(".json")
    )
    if not states:
        return {}
    document = json.loads(read_bytes(join(sweep_uri, states[-1])))
    out = {}
    for entry in document.get("trial_data", []):
        trial = json.loads(entry[0])
        out[trial["trial_id"]] = trial["status"]
    return out


def _trial_id_of(result: Any) -> str:
    trial_id = (result.metrics or {}).get("trial_id")
    # Errored trials may have reported nothing; their folder name ends with the id (see _trial_name).
    return str(trial_id) if trial_id else os.path.basename(str(result.path).rstrip("/")).rsplit("-", 1)[-1]


def sweep_table(grid: Any, space: SweepSpace, sweep_uri: str, storage_uri: str) -> list[dict[str, Any]]:
    """One row per trial, in the order Tune created them: parameters, status (completed, stopped by ASHA
    or error), the error's message, the last epoch's metrics, the best epoch and its model."""
    rows = []
    for number, result in enumerate(grid):
        trial_id = _trial_id_of(result)
        completions = read_completions(sweep_uri, trial_id)
        completion = completions[0] if completions else None
        history = _history(result)
        row: dict[str, Any] = {
            "trial": number,
            "trial_id": trial_id,
            "trial_name": os.path.basename(str(result.path)),
        }
        if result.error is not None:
            row["status"], row["error"] = "error", one_line(result.error)
        else:
            row["status"], row["error"] = ("completed" if completion else "stopped"), None
        params = result.config or _trial_params(storage_uri, str(result.path))
        for name in space.params:
            row[name] = params.get(name)
        row["epochs_run"] = len(history)
        last = history[-1] if history else {}
        for key in TABLE_METRICS:
            row[key] = _float_or_none(last.get(key))
        best, settled = best_epoch(history, space, _planned_epochs(space, params), storage_uri)
        row[f"best_{space.metric}"] = _float_or_none(best.get(space.metric)) if best else None
        row["best_val_balanced_accuracy"] = _float_or_none(best.get(BALANCED_ACCURACY)) if best else None
        row["val_min_class_rows"] = min(val_class_rows(best).values(), default=None) if best else None
        row["best_epoch"] = int(best["epoch"]) if best and "epoch" in best else None
        row["best_settled"] = settled
        row["model_uri"] = _model_uri(best, completion, storage_uri)
        row["time_total_s"] = _float_or_none(last.get("time_total_s"))
        row["completions"] = len(completions)
        rows.append(row)
    return rows


def _trial_params(storage_uri: str, trial_path: str) -> dict[str, Any]:
    """A trial's sampled parameters from its ``params.json`` (failed trials carry no config in the grid)."""
    from acol_core.storage import StorageError, join, read_bytes, uri_for_path

    try:
        return json.loads(read_bytes(join(uri_for_path(storage_uri, trial_path) or "", "params.json")))
    except (StorageError, ValueError):
        return {}


def _history(result: Any) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    return frame.to_dict("records")


def _planned_epochs(space: SweepSpace, params: Mapping[str, Any]) -> int | None:
    """The trial's configured epochs; None when its parameters make no config (it errored)."""
    try:
        return space.train_config(params).epochs
    except (ValueError, TypeError, KeyError):
        return None


def best_epoch(
    history: Sequence[Mapping[str, Any]],
    space: SweepSpace,
    planned_epochs: int | None,
    storage_uri: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """The trial's best epoch by training's rule (``acol_core.selection.select_epoch``: the best
    ``space.metric`` among epochs within a margin of the best val balanced accuracy, or the last epoch
    when val is too small) and whether the trial is "settled": it reached the second half of its plan
    (ASHA stops most trials earlier; their pick stays in the table, but settled trials win the sweep).

    With ``storage_uri``, only epochs whose checkpoint still exists are picked (the run keeps a few).
    """
    from acol_core.selection import select_epoch

    epochs = [_float_or_none(h.get("epoch")) for h in history]
    available = None
    if storage_uri is not None and any(h.get("checkpoint_path") for h in history):
        available = {
            int(e)
            for h, e in zip(history, epochs, strict=True)
            if e is not None and _has_model(h, storage_uri)
        }
    chosen = select_epoch(history, metric=space.metric, mode=space.mode, available=available)
    best = dict(history[chosen.index]) if chosen.index is not None else {}
    settled = bool(planned_epochs) and any(e is not None and e >= planned_epochs // 2 for e in epochs)
    return best, settled


def _has_model(row: Mapping[str, Any], storage_uri: str) -> bool:
    from acol_core.export import MODEL_FILE
    from acol_core.storage import exists, join, uri_for_path

    checkpoint = uri_for_path(storage_uri, row.get("checkpoint_path"))
    return bool(checkpoint) and exists(join(checkpoint, MODEL_FILE))


def _model_uri(best: Mapping[str, Any], completion: Mapping[str, Any] | None, storage_uri: str) -> str | None:
    from acol_core.export import MODEL_FILE
    from acol_core.storage import exists, join, uri_for_path

    checkpoint = uri_for_path(storage_uri, best.get("checkpoint_path") if best else None)
    if checkpoint and exists(join(checkpoint, MODEL_FILE)):
        return join(checkpoint, MODEL_FILE)
    return completion.get("model_uri") if completion else None


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class SweepResult:
    """Where a sweep's outputs are, and its best trial."""

    sweep_uri: str
    table_uri: str
    csv_uri: str
    best_config_uri: str | None
    best_model_uri: str | None
    summary_uri: str
    plots: list[str]
    best: dict[str, Any] | None
    test_metrics: dict[str, float]
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_sweep_outputs(
    rows: list[dict[str, Any]], space: SweepSpace, sweep_uri: str, data_uri: str, evaluate_test: bool = True
) -> SweepResult:
    """Sweep table (Parquet + CSV), best config YAML, best model, test metrics, plots."""
    import yaml

    from acol_core.storage import join, read_bytes, write_bytes

    results = join(sweep_uri, RESULTS_DIR)
    table_uri, csv_uri = join(results, "sweep.parquet"), join(results, "sweep.csv")
    _write_table(rows, table_uri, csv_uri)
    chosen = best_row(rows, space)
    best_config_uri = best_model_uri = None
    best: dict[str, Any] | None = None
    test_metrics: dict[str, float] = {}
    if chosen is not None:
        params = {name: chosen[name] for name in space.params if chosen.get(name) is not None}
        config = space.train_config(params).to_dict()
        best = {
            "trial_id": chosen["trial_id"],
            "metric": space.metric,
            "value": chosen[f"best_{space.metric}"],
            "epoch": chosen["best_epoch"],
            "params": params,
            "config": config,
        }
        best_config_uri = join(results, "best_config.yaml")
        write_bytes(best_config_uri, yaml.safe_dump({**best, "config": config}, sort_keys=False).encode())
        if chosen.get("model_uri"):
            best_model_uri = join(results, "best_model.safetensors")
            write_bytes(best_model_uri, read_bytes(chosen["model_uri"]))
            if evaluate_test:
                test_metrics = evaluate_model_on_split(best_model_uri, data_uri, "test")
    plots = _write_plots(rows, space, results)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")}
    summary_uri = join(results, "summary.json")
    result = SweepResult(
        sweep_uri=sweep_uri,
        table_uri=table_uri,
        csv_uri=csv_uri,
        best_config_uri=best_config_uri,
        best_model_uri=best_model_uri,
        summary_uri=summary_uri,
        plots=plots,
        best=best,
        test_metrics=test_metrics,
        counts=counts,
    )
    write_bytes(summary_uri, json.dumps(result.to_dict(), indent=1, default=str).encode())
    return result


def best_row(rows: Sequence[Mapping[str, Any]], space: SweepSpace) -> Mapping[str, Any] | None:
    """The trial with the best score, among those whose best epoch is settled when there are any, and
    (when val has enough rows of every class) whose val balanced accuracy is within the selection
    margin of the best trial's (``acol_core.selection``)."""
    key = f"best_{space.metric}"
    scored = [r for r in rows if r.get(key) is not None and r["status"] != "error"]
    scored = [r for r in scored if r.get("best_settled")] or scored
    if not scored:
        return None
    enough = all((r.get("val_min_class_rows") or 0) >= MIN_CLASS_ROWS for r in scored)
    balanced_key = "best_val_balanced_accuracy" if enough else "-"
    index = best_within_margin(scored, key, space.mode, balanced_key=balanced_key)
    return scored[index] if index is not None else None


def _write_table(rows: Sequence[Mapping[str, Any]], parquet_uri: str, csv_uri: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from acol_core.storage import write_bytes

    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    # Mixed-type choices (e.g. [64, "auto"]) become strings rather than failing the whole table.
    arrays = {}
    for key in columns:
        values = [row.get(key) for row in rows]
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[key] = pa.array([None if v is None else str(v) for v in values])
    table = pa.table(arrays) if arrays else pa.table({"trial_id": pa.array([], pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(parquet_uri, buffer.getvalue())
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    write_bytes(csv_uri, buffer.getvalue())


def _write_plots(rows: Sequence[Mapping[str, Any]], space: SweepSpace, results_uri: str) -> list[str]:
    from acol_core.storage import join, write_bytes
    from acol_core.viz import figure_png, sweep_delta_figure, sweep_history_figure

    default_model = str(space.fixed.get("model", TrainConfig.model))
    out = []
    for name, figure in (
        ("metric_vs_delta.png", sweep_delta_figure(rows, space.metric, space.mode, default_model)),
        ("history.png", sweep_history_figure(rows, space.metric, space.mode)),
    ):
        uri = join(results_uri, name)
        write_bytes(uri, figure_png(figure))
        out.append(uri)
    return out


def evaluate_model_on_split(
    model_uri: str, data_uri: str, split: str = "test", batch_size: int = 64
) -> dict[str, float]:
    """Localisation metrics of an exported model on one split, in this process ({} when the split is empty)."""
    from acol_core.data.shards import open_dataset
    from acol_core.data.transforms import decode_rows
    from acol_core.export import load_exported
    from acol_core.train import localization_metrics, predict, select_device

    device = select_device()
    model, info = load_exported(model_uri, device=device)
    config = info.config
    columns = ["image", "label", "mask", "anatomy_mask", "fullsup"]
    table = open_dataset(data_uri, verify=False).read_table(split, columns=columns)
    if table.num_rows == 0:
        return {}

    def batches() -> Any:
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size).to_pydict()
            yield decode_rows(
                rows,
                config.channels,
                config.image_size,
                with_masks=True,
                norm=config.effective_input_norm,
                harmonize=config.harmonize,
            )

    pred = predict(model, batches(), device, config.amp)
    metrics = localization_metrics(pred, step=config.val_step)
    return {f"{split}_{k}": float(v) for k, v in metrics.items()}
