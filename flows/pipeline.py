"""Prefect flow: the whole pipeline, preprocess → train (and a δ sweep) → localize → evaluate → report.

Locally, no server (Prefect starts a temporary API in-process, Ray starts in this process), from the
repository root::

    .venv/bin/python -m flows.pipeline --preset demo --run runs/demo     # what `make demo` runs
    .venv/bin/python -m flows.pipeline --preset smoke --run /tmp/smoke   # a minute: 2 models, 32 px

With a Prefect server, a worker and a Ray cluster (the worker's environment has ``RAY_ADDRESS``; the
deployment ``pipeline/phantom`` is in ``flows/prefect.yaml``)::

    prefect deployment run 'pipeline/phantom' --param run_uri=s3://bucket/runs/mri-1 --watch

Each stage is a task that runs (or, with ``RAY_ADDRESS``, submits to the cluster) the Ray work and passes
URIs on; the run folder's layout is ``acol_core.runs``'s, and ``run.json`` is rewritten after every stage
so that a run that stopped half-way shows what it finished. Stages:

1. preprocess: the ``preprocess`` flow (a subflow: one task per shard, retried) into ``<run>/data``,
   unless ``data_uri`` names an existing dataset;
2. train: one Ray Train run per entry of ``models`` (``<run>/train/<label>``), its best checkpoint's
   export copied to ``<run>/models/<label>.safetensors``;
3. sweep (optional): ``acol tune`` with a search-space file into ``<run>/sweep/<name>``; its best model
   joins the run as ``sweep-best``;
4. localize: Ray Data batch inference of every model over the val and test splits;
5. evaluate: every metric on test, thresholds chosen on the fullsup val rows;
6. report: ``<run>/report/index.html``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from acol_core.runs import (
    ModelEntry,
    RunRecord,
    check_label,
    evaluation_uri,
    model_uri,
    predictions_uri,
    read_run,
    write_run,
)

__all__ = ["PRESETS", "check_models", "pipeline", "summary_table"]

_TASK = {"cache_policy": NO_CACHE, "persist_result": False}
_MODELS = ("cam", "acol", "coatt", "acol_coatt")

# δ = 0.9 for ACoL on the phantom: its lesions are compact, and with the paper's δ = 0.6 branch A erases
# the whole lesion, so branch B learns the rest of the brain and the fused map loses to A alone
# (scripts/acol_fusion_study.py; figures in the README).
DEMO_MODELS: list[dict[str, Any]] = [
    {"label": "cam", "model": "cam", "options": {}},
    {"label": "acol", "model": "acol", "options": {"delta": 0.9}},
    {"label": "coatt", "model": "coatt", "options": {"pair_policy": "different"}},
    {"label": "acol_coatt", "model": "acol_coatt", "options": {"delta": 0.9, "pair_policy": "different"}},
    {"label": "cam+anatomy", "model": "cam", "options": {"shared_anatomy": True}},
]

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "source_options": {"num_subjects": 100, "slices_per_subject": 8, "size": 96},
        "models": DEMO_MODELS,
        "train": {"epochs": 12, "image_size": 96, "batch_size": 16},
        "sweep": {"space": "tune/spaces/demo_delta.yaml", "trials": 4, "name": "delta"},
    },
    "smoke": {
        "source_options": {"num_subjects": 12, "slices_per_subject": 4, "size": 32},
        "models": [
            {"label": "cam", "model": "cam", "options": {}},
            {"label": "acol", "model": "acol", "options": {"delta": 0.9}},
        ],
        "train": {"epochs": 1, "image_size": 32, "batch_size": 16, "augment": False},
        "sweep": None,
    },
}


def check_models(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate the ``models`` parameter before any work: known model names, safe unique labels, options.

    Examples:
        >>> check_models([{"model": "acol", "options": {"delta": 0.8}}])[0]["label"]
        'acol'
    """
    from acol_core.models import list_models

    if not models:
        raise ValueError("models: give at least one model")
    checked, seen = [], set()
    for index, spec in enumerate(models):
        unknown = set(spec) - {"label", "model", "options", "epochs"}
        if unknown:
            raise ValueError(f"models[{index}]: unknown key(s) {', '.join(sorted(unknown))}")
        name = spec.get("model")
        if name not in list_models():
            raise ValueError(f"models[{index}]: unknown model {name!r} (known: {', '.join(list_models())})")
        label = check_label(str(spec.get("label") or name))
        if label in seen:
            raise ValueError(f"models[{index}]: label {label!r} used twice")
        seen.add(label)
        checked.append(
            {
                "label": label,
                "model": name,
                "options": dict(spec.get("options") or {}),
                **({"epochs": int(spec["epochs"])} if spec.get("epochs") else {}),
            }
        )
    return checked


def _train_config(spec: dict[str, Any], train: dict[str, Any]) -> Any:
    from acol_core.config import TrainConfig

    settings = {**train, **({"epochs": spec["epochs"]} if "epochs" in spec else {})}
    return TrainConfig.from_dict({**settings, "model": spec["model"], "model_options": spec["options"]})


def _stage(record: RunRecord, run_uri: str, name: str, started: float) -> None:
    record.stages[name] = round(time.perf_counter() - started, 1)
    write_run(run_uri, record)


@task(name="train", task_run_name="train-{spec[label]}", **_TASK)
def train_task(
    run_uri: str, data_uri: str, spec: dict[str, Any], train: dict[str, Any], workers: int
) -> dict:
    """One Ray Train run; its best checkpoint's export copied to ``<run>/models/<label>.safetensors``."""
    from acol_core.jobs.train_run import RunOptions, run_training
    from acol_core.storage import join, read_bytes, write_bytes

    config = _train_config(spec, train)
    started = time.perf_counter()
    result = run_training(
        config, RunOptions(data=data_uri, storage=join(run_uri, "train"), name=spec["label"], workers=workers)
    )
    if result.model_uri is None:
        raise RuntimeError(f"training {spec['label']!r} finished without a checkpoint")
    target = model_uri(run_uri, spec["label"])
    write_bytes(target, read_bytes(result.model_uri))
    get_run_logger().info(
        "trained %s in %.0f s: %s", spec["label"], time.perf_counter() - started, result.metrics
    )
    return {"model_uri": target, "epochs": config.epochs, "backbone": config.backbone,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


@task(name="sweep", **_TASK)
def sweep_task(run_uri: str, data_uri: str, sweep: dict[str, Any]) -> dict:
    """``acol tune`` into ``<run>/sweep/<name>``; returns its summary (best trial, best model URI)."""
    from acol_core.jobs.sweep import run_sweep
    from acol_core.storage import join

    result = run_sweep(
        sweep["space"],
        data_uri,
        int(sweep.get("trials", 4)),
        join(run_uri, "sweep"),
        name=check_label(str(sweep.get("name", "delta"))),
        max_concurrent_trials=sweep.get("max_concurrent_trials"),
    )
    return result.to_dict()


@task(name="localize", task_run_name="localize-{label}", **_TASK)
def localize_task(run_uri: str, data_uri: str, label: str, model: str) -> str:
    from acol_core.jobs.localize_job import run_localize

    output = predictions_uri(run_uri, label)
    result = run_localize(model, data_uri, output, split="val,test")
    get_run_logger().info("localized %s: %d rows in %.0f s", label, result.info.num_rows, result.seconds)
    return output


@task(name="evaluate", task_run_name="evaluate-{label}", **_TASK)
def evaluate_task(run_uri: str, data_uri: str, label: str, predictions: str) -> str:
    from acol_core.evaluate import evaluate_predictions
    from acol_core.storage import write_bytes

    report = evaluate_predictions(predictions, data_uri, split="test")
    target = evaluation_uri(run_uri, label)
    write_bytes(target, (json.dumps(report, indent=2) + "\n").encode())
    return target


@task(name="report", **_TASK)
def report_task(run_uri: str) -> str:
    from acol_core.report import write_report

    return write_report(run_uri)


@flow(name="pipeline", log_prints=False)
def pipeline(
    run_uri: str = "runs/pipeline",
    source: str = "phantom",
    input_uri: str | None = None,
    source_options: dict[str, Any] | None = None,
    data_uri: str | None = None,
    models: list[dict[str, Any]] | None = None,
    train: dict[str, Any] | None = None,
    sweep: dict[str, Any] | None = None,
    workers: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every stage for one dataset into the run folder ``run_uri``; returns the run record.

    Args:
        run_uri: the run folder (path or s3://); rewritten stage by stage.
        source, input_uri, source_options: what ``acol prepare`` takes (ignored with ``data_uri``).
        data_uri: an existing dataset to use instead of preparing one into ``<run>/data``.
        models: ``[{"label", "model", "options", "epochs"?}]``; default: cam, acol, coatt, acol_coatt.
        train: ``TrainConfig`` fields shared by every model (backbone, epochs, image_size, ...).
        sweep: ``{"space": YAML path, "trials": N, "name": "delta"}`` for an ``acol tune`` stage.
        workers: Ray Train workers per model.
    """
    from acol_core.jobs import ray_init
    from acol_core.storage import join

    log = get_run_logger()
    specs = check_models(models or [{"model": m} for m in _MODELS])
    train = {"seed": seed, **(train or {})}
    for spec in specs:
        _train_config(spec, train)  # bad settings fail here, before any work
    if sweep is not None and not sweep.get("space"):
        raise ValueError("sweep: give a search-space file as 'space'")
    from acol_core.storage import check_reachable

    check_reachable(run_uri)
    record = RunRecord(
        name=run_uri.rstrip("/").rsplit("/", 1)[-1], data_uri=data_uri or join(run_uri, "data")
    )
    write_run(run_uri, record)

    started = time.perf_counter()
    if data_uri is None:
        from flows.preprocess import preprocess

        summary = preprocess(
            source=source, output_uri=record.data_uri, input_uri=input_uri, seed=seed,
            source_options=dict(source_options or {}),
        )  # fmt: skip
        log.info(
            "preprocess: %s rows (%s) in %.0f s",
            summary["rows"],
            summary["split_counts"],
            time.perf_counter() - started,
        )
    _stage(record, run_uri, "preprocess", started)

    ray_init(dashboard=sweep is not None)
    started = time.perf_counter()
    for spec in specs:
        trained = train_task(run_uri, record.data_uri, spec, train, workers)
        record.models[spec["label"]] = ModelEntry(model=spec["model"], options=spec["options"], **trained)
        write_run(run_uri, record)
    _stage(record, run_uri, "train", started)

    if sweep is not None:
        started = time.perf_counter()
        result = sweep_task(run_uri, record.data_uri, sweep)
        record.sweep_uri = result["sweep_uri"]
        best = result.get("best")
        if best and result.get("best_model_uri"):
            options = {k: v for k, v in best["config"].get("model_options", {}).items()}
            record.models["sweep-best"] = ModelEntry(
                model=best["config"]["model"], options=options, backbone=best["config"]["backbone"],
                epochs=best["config"]["epochs"], model_uri=result["best_model_uri"], source="sweep",
            )  # fmt: skip
        log.info("sweep: %s, best %s", result["counts"], best and best["params"])
        _stage(record, run_uri, "sweep", started)

    started = time.perf_counter()
    for label, entry in record.models.items():
        entry.predictions_uri = localize_task(run_uri, record.data_uri, label, entry.model_uri)
        write_run(run_uri, record)
    _stage(record, run_uri, "localize", started)

    started = time.perf_counter()
    for label, entry in record.models.items():
        entry.evaluation_uri = evaluate_task(run_uri, record.data_uri, label, entry.predictions_uri)
    _stage(record, run_uri, "evaluate", started)

    started = time.perf_counter()
    report = report_task(run_uri)
    _stage(record, run_uri, "report", started)
    log.info("report: %s", report)
    return {"run": record.to_dict(), "report": report}


def summary_table(run_uri: str) -> str:
    """PxAP / MaxBoxAccV2 / Dice / off-target per model (and the baseline) from the report's summary."""
    from acol_core.report import read_summary

    rows = read_summary(run_uri)
    columns = ("accuracy", "PxAP", "MaxBoxAccV2", "Dice (val τ)", "off-target")
    lines = [f"{'model':<16}" + "".join(f"{c:>14}" for c in columns)]
    for label, metrics in rows.items():
        cells = "".join(
            f"{metrics[c]:>14.3f}" if isinstance(metrics.get(c), (int, float)) else f"{'-':>14}"
            for c in columns
        )
        lines.append(f"{label:<16}{cells}")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--run", default=None, help="run folder [default: runs/<preset>]")
    parser.add_argument("--data", default=None, help="use this dataset instead of preparing the phantom")
    parser.add_argument("--no-sweep", action="store_true", help="skip the preset's δ sweep")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    args = _parse_args(argv)
    preset = PRESETS[args.preset]
    run_uri = args.run or f"runs/{args.preset}"
    train = dict(preset["train"]) | ({"epochs": args.epochs} if args.epochs else {})
    started = time.perf_counter()
    try:
        result = pipeline(
            run_uri=run_uri,
            source_options=preset["source_options"],
            data_uri=args.data,
            models=preset["models"],
            train=train,
            sweep=None if args.no_sweep else preset["sweep"],
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"pipeline: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    record = read_run(run_uri)
    echo("")
    echo(summary_table(run_uri))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in record.stages.items())
    echo(f"\nstages: {stages}; total {time.perf_counter() - started:.0f} s")
    echo(f"report: {result['report']}")
    return result


if __name__ == "__main__":
    main()
