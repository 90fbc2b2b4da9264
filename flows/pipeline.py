"""Prefect flow: the whole pipeline, preprocess → train (and a δ sweep) → localize → evaluate → report.

Locally, no server (Prefect starts a temporary API in-process, Ray starts in this process), from the
repository root::

    .venv/bin/python -m flows.pipeline --preset demo --run runs/demo     # what `make demo` runs
    .venv/bin/python -m flows.pipeline --preset smoke --run /tmp/smoke   # a minute: 2 models, 32 px

With a Prefect server, a worker and a Ray cluster (the worker's environment has ``RAY_ADDRESS``; the
deployment ``pipeline/pipeline-phantom`` is in ``flows/prefect.yaml``)::

    prefect deployment run 'pipeline/pipeline-phantom' --param run_uri=s3://bucket/runs/mri-1 --watch
    prefect deployment run 'pipeline/pipeline-phantom' --params '{"run_uri": "runs/p1",
        "models": [{"label": "acol-d0.8", "model": "acol", "options": {"delta": 0.8}}],
        "train": {"epochs": 4, "image_size": 64}, "sweep": {"space": "tune/spaces/smoke.yaml", "trials": 2}}'

Each stage is a task that runs (or, with ``RAY_ADDRESS``, submits to the cluster) the Ray work and passes
URIs on; the run folder's layout is ``acol_core.runs``'s, and ``run.json`` is rewritten after every stage
so that a run that stopped half-way shows what it finished. Stages:

1. preprocess: the ``preprocess`` flow (a subflow: one task per shard, retried) into ``<run>/data``,
   unless ``data_uri`` names an existing dataset;
2. train: one Ray Train run per entry of ``models`` (``<run>/train/<label>``), its best checkpoint's
   export copied to ``<run>/models/<label>.safetensors``;
3. sweep (optional): ``acol tune`` with a search space (a YAML file, or the space inline as a dict,
   saved as ``<run>/sweep/<name>.space.yaml``) into ``<run>/sweep/<name>``; its best model joins the
   run as ``sweep-best`` (copied to ``<run>/models/sweep-best.safetensors``);
4. localize: Ray Data batch inference of every model over the val and test splits;
5. evaluate: every metric on test, thresholds chosen on the fullsup val rows;
6. report: ``<run>/report/index.html``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from acol_core.storage import join

__all__ = ["PRESETS", "SWEEP_LABEL", "check_models", "check_sweep", "main", "pipeline", "summary_table"]

# Tasks write files: a cached result would skip the write, so nothing is cached.
_TASK = {"cache_policy": NO_CACHE, "persist_result": False}
_MODELS = ("cam", "acol", "coatt", "acol_coatt")
_SWEEP_KEYS = {"space", "trials", "name", "max_concurrent_trials"}
_PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement-group strategies
SWEEP_LABEL = "sweep-best"  # the run's label of the sweep's best model

# δ = 0.9 for ACoL on the phantom: its lesions are compact, and with the paper's δ = 0.6 branch A erases
# the whole lesion, so branch B learns the rest of the brain and the fused map loses to A alone
# (scripts/acol_fusion_study.py); the fusion is chosen on val rows (fusion: auto).
DEMO_MODELS: list[dict[str, Any]] = [
    {"label": "cam", "model": "cam", "options": {}},
    {"label": "acol", "model": "acol", "options": {"delta": 0.9, "fusion": "auto"}},
    {"label": "coatt", "model": "coatt", "options": {"pair_policy": "different"}},
    {
        "label": "acol_coatt",
        "model": "acol_coatt",
        "options": {"delta": 0.9, "pair_policy": "different", "fusion": "auto"},
    },
]

# The demo's recipe (tiny backbone, 96 px): lr 0.02 with heads at 1x from scratch (at 0.01 the CAM reached
# test PxAP 0.80-0.82 but accuracy only 0.88-0.93; at 0.03 it collapsed in 2 of 3 seeds). Every core for
# torch in the one train worker (Ray would give its 0.5 CPU share 1 thread): the models train one after
# another and Ray Data's decoding of 96 px slices is light. 20 fullsup rows per class: 5 made the "best"
# checkpoint a noisy pick of early, barely trained epochs.
_DEMO_TRAIN = {
    "epochs": 12,
    "image_size": 96,
    "batch_size": 16,
    "lr": 0.02,
    "num_threads": os.cpu_count() or 1,
}
_DEMO_DATA = {"num_subjects": 100, "slices_per_subject": 8, "size": 96}

PRESETS: dict[str, dict[str, Any]] = {
    # The standard phantom: every model the project is named for, and a short δ / fusion sweep.
    "demo-standard": {
        "source_options": _DEMO_DATA,
        "models": DEMO_MODELS,
        "train": _DEMO_TRAIN,
        "sweep": {"space": "tune/spaces/demo_delta.yaml", "trials": 3, "name": "delta"},
        "fullsup_per_class": 20,
    },
    # The skull failure (phantom preset skull-shortcut) and its remedies side by side: CAM, CAM localized
    # with the anatomy gate (the same model), and CAM trained and localized on harmonised inputs
    # (skull-stripped, bias-corrected), gated too: the best remedy of studies/skull.yaml.
    "demo-skull": {
        "source_options": {**_DEMO_DATA, "preset": "skull-shortcut"},
        "models": [
            {"label": "cam", "model": "cam", "options": {}},
            {
                "label": "cam+gate",
                "model": "cam",
                "options": {},
                "reuse": "cam",
                "localize": {"gate": "anatomy"},
            },
            {
                "label": "cam+harmonize+gate",
                "model": "cam",
                "options": {},
                "train": {"harmonize": "brain"},
                "localize": {"gate": "anatomy"},
            },
        ],
        "train": _DEMO_TRAIN,
        "sweep": None,
        "fullsup_per_class": 20,
    },
    # What `make demo` runs: both of the above, each in its own run folder under --run.
    "demo": {"parts": {"standard": "demo-standard", "skull-shortcut": "demo-skull"}},
    "smoke": {
        "source_options": {"num_subjects": 12, "slices_per_subject": 4, "size": 32},
        "models": [
            {"label": "cam", "model": "cam", "options": {}},
            {"label": "acol", "model": "acol", "options": {"delta": 0.9}},
            {
                "label": "cam+gate",
                "model": "cam",
                "options": {},
                "reuse": "cam",
                "localize": {"gate": "anatomy"},
            },
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
        unknown = set(spec) - {"label", "model", "options", "epochs", "train", "reuse", "localize"}
        if unknown:
            raise ValueError(f"models[{index}]: unknown key(s) {', '.join(sorted(unknown))}")
        reuse = spec.get("reuse")
        if reuse is not None and reuse not in seen:
            raise ValueError(f"models[{index}]: reuse names no earlier label: {reuse!r}")
        localize = dict(spec.get("localize") or {})
        if set(localize) - {"gate"}:
            raise ValueError(
                f"models[{index}]: unknown localize key(s) {', '.join(sorted(set(localize) - {'gate'}))}"
            )
        if "gate" in localize:
            from acol_core.gating import check_gate

            check_gate(localize["gate"])
        name = spec.get("model")
        if name not in list_models():
            raise ValueError(f"models[{index}]: unknown model {name!r} (known: {', '.join(list_models())})")
        if spec.get("train"):
            from acol_core.config import ConfigError, TrainConfig

            try:
                TrainConfig.from_dict(
                    {**spec["train"], "model": name, "model_options": spec.get("options") or {}}
                )
            except (ConfigError, TypeError) as exc:
                raise ValueError(f"models[{index}]: train: {exc}") from exc
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
                **({"train": dict(spec["train"])} if spec.get("train") else {}),
                **({"reuse": reuse} if reuse else {}),
                **({"localize": localize} if localize else {}),
            }
        )
    return checked


def check_sweep(sweep: dict[str, Any] | None, labels: list[str]) -> dict[str, Any] | None:
    """Validate the ``sweep`` parameter before any work: known keys, a space that parses, a safe name.

    ``space`` is a search-space YAML file (path or URI) or the space itself as a dict.
    """
    if sweep is None:
        return None
    unknown = set(sweep) - _SWEEP_KEYS
    if unknown:
        raise ValueError(f"sweep: unknown key(s) {', '.join(sorted(unknown))}")
    from acol_core.sweep.space import load_space, parse_space

    space = sweep.get("space")
    if isinstance(space, dict):
        parse_space(space, source="sweep.space")
    elif isinstance(space, str) and space:
        load_space(space)
    else:
        raise ValueError("sweep: give 'space', a search-space YAML file or the space as a dict")
    trials = int(sweep.get("trials", 4))
    if trials < 1:
        raise ValueError(f"sweep: trials must be >= 1, got {trials}")
    if SWEEP_LABEL in labels:
        raise ValueError(f"models: the label {SWEEP_LABEL!r} is kept for the sweep's best model")
    return {
        "space": space,
        "trials": trials,
        "name": check_label(str(sweep.get("name", "delta"))),
        "max_concurrent_trials": sweep.get("max_concurrent_trials"),
    }


def _train_config(spec: dict[str, Any], train: dict[str, Any]) -> Any:
    from acol_core.config import TrainConfig

    settings = {**train, **spec.get("train", {}), **({"epochs": spec["epochs"]} if "epochs" in spec else {})}
    return TrainConfig.from_dict({**settings, "model": spec["model"], "model_options": spec["options"]})


def _stage(record: RunRecord, run_uri: str, name: str, started: float) -> None:
    from acol_core.console import print_err

    record.stages[name] = round(time.perf_counter() - started, 1)
    write_run(run_uri, record)
    get_run_logger().info("stage %s done in %.1f s", name, record.stages[name])
    print_err(f"stage {name} done in {record.stages[name]:.0f} s")


def _copy(source: str, target: str) -> str:
    from acol_core.storage import read_bytes, write_bytes

    write_bytes(target, read_bytes(source))
    return target


@task(name="train", task_run_name="train-{spec[label]}", **_TASK)
def train_task(
    run_uri: str,
    data_uri: str,
    spec: dict[str, Any],
    train: dict[str, Any],
    workers: int,
    gpus_per_worker: float = 0.0,
    placement_strategy: str = "PACK",
) -> dict[str, Any]:
    """One Ray Train run; its best checkpoint's export copied to ``<run>/models/<label>.safetensors``."""
    from acol_core.console import EpochProgress
    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    config = _train_config(spec, train)
    started = time.perf_counter()
    options = RunOptions(
        data=data_uri,
        storage=join(run_uri, "train"),
        name=spec["label"],
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        placement_strategy=placement_strategy,
    )
    with EpochProgress(f"train {spec['label']}", config.epochs) as progress:
        options.progress = progress
        result = run_training(config, options)
    if result.model_uri is None:
        raise RuntimeError(f"training {spec['label']!r} finished without a checkpoint")
    seconds = round(time.perf_counter() - started, 1)
    get_run_logger().info("trained %s in %.0f s: %s", spec["label"], seconds, result.metrics)
    return {
        "model_uri": _copy(result.model_uri, model_uri(run_uri, spec["label"])),
        "epochs": config.epochs,
        "backbone": config.backbone,
        "seconds": seconds,
    }


@task(name="sweep", task_run_name="sweep-{sweep[name]}", **_TASK)
def sweep_task(
    run_uri: str, data_uri: str, sweep: dict[str, Any], seed: int, gpus_per_worker: float = 0.0
) -> dict[str, Any]:
    """``acol tune`` into ``<run>/sweep/<name>``; returns its summary, with the best model's copy as
    ``model_uri`` (None when no trial produced a model)."""
    from acol_core.jobs.sweep import SweepOptions, run_sweep
    from acol_core.storage import write_bytes

    space = sweep["space"]
    if isinstance(space, dict):
        import yaml

        space_file = join(run_uri, "sweep", f"{sweep['name']}.space.yaml")
        write_bytes(space_file, yaml.safe_dump(space, sort_keys=False).encode())
        space = space_file
    started = time.perf_counter()
    options = SweepOptions(
        data=data_uri,
        storage=join(run_uri, "sweep"),
        trials=sweep["trials"],
        name=sweep["name"],
        max_concurrent_trials=sweep["max_concurrent_trials"],
        seed=seed,
        gpus_per_worker=gpus_per_worker,
    )
    result = run_sweep(space, options)
    summary = result.to_dict()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    best_model = result.best_model_uri
    summary["model_uri"] = _copy(best_model, model_uri(run_uri, SWEEP_LABEL)) if best_model else None
    best = result.best
    get_run_logger().info(
        "sweep %s: %s in %.0f s; best %s",
        sweep["name"],
        result.counts,
        summary["seconds"],
        best and best["params"],
    )
    return summary


@task(name="localize", task_run_name="localize-{label}", **_TASK)
def localize_task(
    run_uri: str,
    data_uri: str,
    label: str,
    model: str,
    options: dict[str, Any] | None = None,
    actors: int = 1,
) -> str:
    """Ray Data batch inference of one model over the val and test rows into ``<run>/predictions/<label>``
    (``options``: the model entry's localize options, e.g. ``{"gate": "anatomy"}``)."""
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize

    output = predictions_uri(run_uri, label)
    settings = LocalizeOptions(model, data_uri, output, split="val,test", actors=actors, **(options or {}))
    result = run_localize(settings)
    get_run_logger().info("localized %s: %d rows in %.0f s", label, result.info.num_rows, result.seconds)
    return output


@task(name="evaluate", task_run_name="evaluate-{label}", **_TASK)
def evaluate_task(run_uri: str, data_uri: str, label: str, predictions: str) -> str:
    """Every metric on test (thresholds chosen on fullsup val rows) into ``<run>/evaluation/<label>.json``."""
    from acol_core.evaluate import evaluate_predictions, subjects_csv_uri, write_subjects_csv
    from acol_core.storage import write_bytes

    report = evaluate_predictions(predictions, data_uri, split="test")
    target = evaluation_uri(run_uri, label)
    write_subjects_csv(report, subjects_csv_uri(target), required=False)  # volumes only
    write_bytes(target, (json.dumps(report, indent=2) + "\n").encode())
    pxap = report.get("localization", {}).get("overall", {}).get("pxap")  # absent without mask rows
    shown = "-" if pxap is None else f"{pxap:.3f}"
    get_run_logger().info("evaluated %s on %s test rows: PxAP %s", label, report.get("rows"), shown)
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
    fullsup_per_class: int = 5,
    gpus_per_worker: float = 0.0,
    placement_strategy: str = "PACK",
    actors: int = 1,
) -> dict[str, Any]:
    """Run every stage for one dataset into the run folder ``run_uri``; returns the run record and the
    report's URI.

    Args:
        run_uri: the run folder (path or s3://); ``run.json`` is rewritten stage by stage.
        source, input_uri, source_options: what ``acol prepare`` takes (ignored with ``data_uri``).
        data_uri: an existing dataset to use instead of preparing one into ``<run>/data``.
        models: ``[{"label", "model", "options", "epochs"?, "train"?}]`` (``train``: TrainConfig fields
            of this model only); default: cam, acol, coatt, acol_coatt.
        train: ``TrainConfig`` fields shared by every model (backbone, epochs, image_size, batch_size, ...).
        sweep: ``{"space": YAML file or dict, "trials": N, "name": "delta", "max_concurrent_trials"?}``.
        workers: Ray Train workers per model.
        gpus_per_worker: GPUs for each Ray Train worker, in training and in the sweep's trials (0: CPU;
            DDP then uses NCCL and bf16 autocast). Localization takes the cluster's GPUs when it has some.
        seed: the dataset's split and phantom, the training runs' (unless ``train`` sets one), the sweep's.
        fullsup_per_class: val rows per class whose masks choose checkpoints, δ and thresholds.
        placement_strategy: how Ray places each training run's workers: PACK, SPREAD (over the nodes,
            best effort), STRICT_PACK or STRICT_SPREAD (one worker per node).
        actors: Ray Data actors per localization (each holds a copy of the model; spread over nodes).
    """
    log = get_run_logger()
    # Every parameter is checked before any work: a bad one fails the run with one clear line.
    specs = check_models(models or [{"model": m} for m in _MODELS])
    train = {"seed": seed, **(train or {})}
    for spec in specs:
        if "reuse" not in spec:
            _train_config(spec, train)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not gpus_per_worker >= 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if placement_strategy not in _PLACEMENTS:
        raise ValueError(
            f"placement_strategy must be one of {', '.join(_PLACEMENTS)}, got {placement_strategy!r}"
        )
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    sweep = check_sweep(sweep, [spec["label"] for spec in specs])
    from acol_core.jobs import ray_init
    from acol_core.storage import check_reachable

    check_reachable(run_uri)
    record = RunRecord(
        name=run_uri.rstrip("/").rsplit("/", 1)[-1], data_uri=data_uri or join(run_uri, "data")
    )
    write_run(run_uri, record)

    started = time.perf_counter()
    if data_uri is None:
        from flows.preprocess import preprocess

        log.info("stage preprocess: %s -> %s", source, record.data_uri)
        summary = preprocess(
            source=source, output_uri=record.data_uri, input_uri=input_uri, seed=seed,
            fullsup_per_class=fullsup_per_class, source_options=dict(source_options or {}),
        )  # fmt: skip
        log.info("preprocess: %s rows (%s)", summary["rows"], summary["split_counts"])
    _stage(record, run_uri, "preprocess", started)

    ray_init(dashboard=sweep is not None)
    started = time.perf_counter()
    log.info("stage train: %s", ", ".join(spec["label"] for spec in specs))
    for spec in specs:
        if "reuse" in spec:  # the same model, localized another way: no training of its own
            twin = record.models[spec["reuse"]]
            record.models[spec["label"]] = ModelEntry(
                model=twin.model, options=twin.options, backbone=twin.backbone, epochs=twin.epochs,
                model_uri=twin.model_uri, source=f"reuse:{spec['reuse']}", localize=spec.get("localize", {}),
            )  # fmt: skip
            continue
        trained = train_task(
            run_uri, record.data_uri, spec, train, workers, gpus_per_worker, placement_strategy
        )
        record.models[spec["label"]] = ModelEntry(
            model=spec["model"], options=spec["options"], localize=spec.get("localize", {}), **trained
        )
        write_run(run_uri, record)
    _stage(record, run_uri, "train", started)

    if sweep is not None:
        started = time.perf_counter()
        log.info("stage sweep: %d trials of %s", sweep["trials"], sweep["space"])
        result = sweep_task(run_uri, record.data_uri, sweep, seed, gpus_per_worker)
        record.sweep_uri = result["sweep_uri"]
        best = result.get("best")
        if best and result["model_uri"]:
            config = best["config"]
            record.models[SWEEP_LABEL] = ModelEntry(
                model=config["model"], options=dict(config.get("model_options") or {}),
                backbone=config["backbone"], epochs=config["epochs"], model_uri=result["model_uri"],
                source="sweep", seconds=result["seconds"],
            )  # fmt: skip
        _stage(record, run_uri, "sweep", started)

    started = time.perf_counter()
    log.info("stage localize: %d models", len(record.models))
    for label, entry in record.models.items():
        entry.predictions_uri = localize_task(
            run_uri, record.data_uri, label, entry.model_uri, entry.localize, actors
        )
        write_run(run_uri, record)
    _stage(record, run_uri, "localize", started)

    started = time.perf_counter()
    for label, entry in record.models.items():
        entry.evaluation_uri = evaluate_task(run_uri, record.data_uri, label, entry.predictions_uri)
        write_run(run_uri, record)
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
    width = max([16, *(len(label) + 2 for label in rows)])
    lines = [f"{'model':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    for label, metrics in rows.items():
        cells = "".join(
            f"{metrics[c]:>14.3f}" if isinstance(metrics.get(c), (int, float)) else f"{'-':>14}"
            for c in columns
        )
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--run", default=None, help="run folder [default: runs/<preset>]")
    parser.add_argument("--data", default=None, help="use this dataset instead of preparing the phantom")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--sweep", default=None, metavar="SPACE", help="sweep this search-space YAML")
    parser.add_argument("--trials", type=int, default=None, help="sweep trials [default: the preset's, or 4]")
    parser.add_argument("--no-sweep", action="store_true", help="skip the preset's sweep")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="Ray's and Prefect's logs here, not in a file"
    )
    parser.add_argument(
        "--gpus-per-worker", type=float, default=None, help="GPUs per train worker [default: the preset's, 0]"
    )
    return parser.parse_args(argv)


def _sweep_of(args: argparse.Namespace, preset: dict[str, Any]) -> dict[str, Any] | None:
    if args.no_sweep:
        return None
    sweep = dict(preset["sweep"] or {}) | ({"space": args.sweep} if args.sweep else {})
    if args.trials is not None:
        sweep["trials"] = args.trials
    return sweep or None


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a preset locally (ephemeral Prefect API, in-process Ray); print the metrics table and the
    report's path. A preset with ``parts`` (``demo``) runs each part into ``<run>/<part>``. Known failures
    are one line on stderr: exit 2 for bad input, 1 for a failed stage."""
    from acol_core.console import print_err, quiet_logs
    from acol_core.errors import exit_code
    from acol_core.storage import is_local

    args = _parse_args(argv)
    run_uri = args.run or f"runs/{args.preset}"
    parts = PRESETS[args.preset].get("parts") or {"": args.preset}
    # Ray's and Prefect's own logs to a file in the run folder (before Ray starts: its processes inherit
    # the environment); the stages print their own progress.
    log_dir = run_uri if is_local(run_uri) else f"runs/{args.preset}"
    log = quiet_logs(f"{log_dir}/logs/pipeline-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose=args.verbose)
    if log is not None:
        print_err(f"pipeline {args.preset}: Ray's and Prefect's logs go to {log}; --verbose shows them here")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        for part, name in parts.items():
            part_uri = f"{run_uri.rstrip('/')}/{part}" if part else run_uri
            if part:
                print_err(f"\n== {part} ({name}) -> {part_uri}")
            results[part] = _run_preset(name, part_uri, args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"\npipeline: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(code) from None
    for part, result in results.items():
        part_uri = f"{run_uri.rstrip('/')}/{part}" if part else run_uri
        record = read_run(part_uri)
        echo(f"\n{part or args.preset}: test split (thresholds from fullsup val rows)" if part else "")
        echo(summary_table(part_uri))
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in record.stages.items())
        echo(f"stages: {stages}")
        echo(f"report: {result['report']}")
    echo(f"\ntotal {time.perf_counter() - started:.0f} s")
    return results[""] if list(results) == [""] else results


def _run_preset(name: str, run_uri: str, args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[name]
    train = dict(preset["train"]) | ({"epochs": args.epochs} if args.epochs else {})
    return pipeline(
        run_uri=run_uri,
        source_options=preset["source_options"],
        data_uri=args.data,
        models=preset["models"],
        train=train,
        sweep=_sweep_of(args, preset),
        fullsup_per_class=preset.get("fullsup_per_class", 5),
        gpus_per_worker=(
            args.gpus_per_worker
            if args.gpus_per_worker is not None
            else float(preset.get("gpus_per_worker", 0.0))
        ),
    )


if __name__ == "__main__":
    main()
