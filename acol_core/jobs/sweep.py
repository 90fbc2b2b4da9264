"""Hyper-parameter sweeps: Ray Tune + OptunaSearch + ASHA, each trial one Ray Train run.

One machine (a local Ray starts in this process)::

    acol tune --space tune/spaces/acol_mri.yaml --data runs/data --trials 20 --storage runs/sweeps

A cluster (``ray job submit`` sets RAY_ADDRESS for the entrypoint; storage on S3)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol tune --space tune/spaces/acol_mri.yaml \
        --data s3://bucket/mri --trials 64 --storage s3://bucket/sweeps --workers-per-trial 4 --gpus-per-worker 1

Run the same command again after the driver died: the sweep resumes (``Tuner.restore``); finished trials
are not run again and unfinished ones resume from their Ray Train checkpoints.

The search space (``acol_core.sweep.space``) and the results (``acol_core.sweep.results``) need no Ray;
this module is the Tune driver: the trial function, its reporter and the terminal's trial lines.

What a sweep writes under ``<storage>/<name>/``: the Tune experiment (trial folders with TensorBoard
event files: ``tensorboard --logdir <storage>/<name>``), ``trials/<name>-<trial id>/`` (each trial's
Ray Train run and checkpoints), ``completed/<trial id>/`` (a marker per finished trial), and
``results/`` (``acol_core.sweep.results``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from acol_core.config import ConfigError
from acol_core.console import print_err, quiet, reroute_logs
from acol_core.sweep.results import (
    TABLE_METRICS,
    TRIALS_DIR,
    SweepResult,
    completion_uri,
    read_completions,
    sweep_table,
    write_sweep_outputs,
)
from acol_core.sweep.space import SweepSpace, check_trial_config, load_space

__all__ = ["SweepOptions", "TrialReporter", "run_sweep"]


@dataclass
class SweepOptions:
    """Where and how a sweep runs (the search space is its own file).

    Args:
        data: dataset URI (train and val rows, fullsup val rows for the objective).
        storage: where sweeps go; the sweep is ``<storage>/<name>`` (the same storage + name resumes).
        trials: number of trials (a resumed sweep keeps the number it started with).
        max_concurrent_trials: None: as many as the cluster holds, one CPU left for Ray Data.
        max_failures: restarts of a trial's Ray Train worker group after a worker dies.
        seed: the Optuna sampler's seed.
        time_budget_s: stop starting trials after this long (None: no limit).
        evaluate_test: score the best trial's model once on the test split.
    """

    data: str
    storage: str
    trials: int
    name: str = "acol-sweep"
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    seed: int = 0
    time_budget_s: float | None = None
    evaluate_test: bool = True


@dataclass(frozen=True)
class _TrialSettings:
    """What every trial needs besides its sampled parameters (passed with ``tune.with_parameters``)."""

    sweep: str
    sweep_uri: str
    storage_uri: str
    data: str
    space: SweepSpace
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int


class TrialReporter(TuneReportCallback):
    """Runs in a trial's Train controller, after every report of its workers.

    Forwards rank 0's metrics to Tune (what ASHA and Optuna see), sets the ``acol_sweep_trial_metric``
    gauges, and after the last epoch writes the trial's completion marker. Writing it here, not when the
    trial function returns, keeps it when Tune stops the trial right at its last epoch (ASHA's max_t).

    Args:
        tags: ``sweep``, ``trial`` and ``model`` labels of the gauges.
        completion_uri: the trial's folder of completion markers.
        epochs: the trial's epoch count.
        storage_uri: the sweep's storage URI (to turn checkpoint paths into URIs).
    """

    def __init__(self, tags: Mapping[str, str], completion_uri: str, epochs: int, storage_uri: str) -> None:
        super().__init__()
        self.tags = dict(tags)
        self.completion_uri = completion_uri
        self.epochs = int(epochs)
        self.storage_uri = storage_uri
        self._gauge: Any = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        values = metrics[0] if metrics else {}
        self._publish(values)
        if int(values.get("epoch", -1)) + 1 >= self.epochs:
            self._mark_completed(values, checkpoint)
        super().after_report(run_context, metrics, checkpoint)

    def _publish(self, values: Mapping[str, Any]) -> None:
        from ray.util.metrics import Gauge

        if self._gauge is None:  # created in the controller process, never pickled
            self._gauge = Gauge(
                "acol_sweep_trial_metric",
                description="Per-epoch metrics of acol sweep trials (validation on fullsup rows).",
                tag_keys=("sweep", "trial", "model", "metric"),
            )
        for key in TABLE_METRICS:
            value = values.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._gauge.set(float(value), tags={**self.tags, "metric": key})

    def _mark_completed(self, values: Mapping[str, Any], checkpoint: Any) -> None:
        from acol_core.export import MODEL_FILE
        from acol_core.storage import join, uri_for_path, write_bytes

        checkpoint_uri = uri_for_path(self.storage_uri, checkpoint.path) if checkpoint else None
        record = {
            "trial_id": self.tags["trial"],
            "final_metrics": _plain(values),
            "model_uri": join(checkpoint_uri, MODEL_FILE) if checkpoint_uri else None,
            "finished_at": time.time(),
        }
        # One file per completion (never overwritten): a trial trained to the end twice would show.
        write_bytes(join(self.completion_uri, f"{uuid.uuid4().hex}.json"), json.dumps(record).encode())


def _sweep_trial(params: dict[str, Any], settings: _TrialSettings) -> None:
    """The Tune function trainable: one Ray Train run named after the trial (a retry resumes it)."""
    import ray.tune

    from acol_core.jobs.train_run import run_training
    from acol_core.storage import join
    from acol_core.train_session import RunOptions

    trial_id = ray.tune.get_context().get_trial_id()
    done = read_completions(settings.sweep_uri, trial_id)
    if done:
        # Finished before the sweep driver died, but the experiment state did not record it: report the
        # stored result instead of training again.
        ray.tune.report(done[0]["final_metrics"])
        return
    config = settings.space.train_config(params)
    check_trial_config(config)
    options = RunOptions(
        data=settings.data,
        storage=join(settings.sweep_uri, TRIALS_DIR),
        name=f"{settings.sweep}-{trial_id}",
        workers=settings.workers,
        cpus_per_worker=settings.cpus_per_worker,
        gpus_per_worker=settings.gpus_per_worker,
        max_failures=settings.max_failures,
        score_metric=settings.space.metric,
        callbacks=[
            TrialReporter(
                tags={"sweep": settings.sweep, "trial": trial_id, "model": config.model},
                completion_uri=completion_uri(settings.sweep_uri, trial_id),
                epochs=config.epochs,
                storage_uri=settings.storage_uri,
            )
        ],
    )
    run_training(config, options)


def _plain(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _trial_name(trial: Any) -> str:
    """``acol-d0.62-1a2b3_00004``: model and δ in the name shown in progress tables and trial folders."""
    config = trial.config
    parts = [str(config.get("model", "trial"))]
    if isinstance(config.get("delta"), (int, float)):
        parts.append(f"d{float(config['delta']):.2f}")
    return "-".join([*parts, trial.trial_id])


def _default_concurrency(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many trials as the cluster holds at once, with one CPU always left for Ray Data.

    Ray Data's read/decode tasks each want a whole CPU; if the trials' workers leave less than one free,
    every trial waits for data forever, without an error.
    """
    import ray

    resources = ray.cluster_resources()
    trials = (float(resources.get("CPU", 1.0)) - 1.0) // (workers * cpus_per_worker)
    if gpus_per_worker > 0:
        trials = min(trials, float(resources.get("GPU", 0.0)) // (workers * gpus_per_worker))
    return max(1, int(trials))


def _check_data(data_uri: str) -> None:
    from acol_core.data.shards import read_manifest

    manifest = read_manifest(data_uri)
    counts = manifest.split_counts
    if not counts.get("train") or not counts.get("val"):
        raise ConfigError(f"{data_uri}: a sweep needs train and val rows, found {counts}")
    if not manifest.counts.get("fullsup"):
        raise ConfigError(
            f"{data_uri}: no fullsup val rows: sweeps select on their localisation "
            "(prepare with --fullsup-per-class > 0)"
        )


def run_sweep(space_file: str, options: SweepOptions) -> SweepResult:
    """Run (or resume: same storage + name) a sweep of ``space_file`` (a search-space YAML, see
    ``acol_core.sweep.space``); writes the outputs and returns where they are."""
    import ray.tune
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from acol_core.jobs import ray_init
    from acol_core.storage import absolute, check_reachable, join, resolve
    from acol_core.train_session import check_run_name

    check_run_name(options.name, "sweep")
    space = load_space(space_file)
    if options.trials < 1:
        raise ConfigError(f"trials must be >= 1, got {options.trials}")
    if options.workers_per_trial < 1 or options.cpus_per_worker <= 0 or options.gpus_per_worker < 0:
        raise ConfigError("workers_per_trial must be >= 1, cpus_per_worker > 0 and gpus_per_worker >= 0")
    data_uri, storage_uri = absolute(options.data), absolute(options.storage)
    _check_data(data_uri)
    check_reachable(storage_uri)
    ray_init(dashboard=True)
    reroute_logs()  # Optuna and Tune add their terminal handlers on import
    sweep_uri = join(storage_uri, options.name)
    settings = _TrialSettings(
        sweep=options.name,
        sweep_uri=sweep_uri,
        storage_uri=storage_uri,
        data=data_uri,
        space=space,
        workers=options.workers_per_trial,
        cpus_per_worker=options.cpus_per_worker,
        gpus_per_worker=options.gpus_per_worker,
        max_failures=options.max_failures,
    )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_sweep_trial, settings=settings),
        # The trial function only drives its Train run (whose workers hold the CPUs): a token reservation
        # keeps the cluster's free CPUs whole for Ray Data's tasks.
        {"memory": 64 * 1024**2},
    )
    fs, parent_path = resolve(storage_uri)
    experiment_path = resolve(sweep_uri)[1]
    if ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, storage_filesystem=fs)
    else:
        concurrency = options.max_concurrent_trials or _default_concurrency(
            options.workers_per_trial, options.cpus_per_worker, options.gpus_per_worker
        )
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=OptunaSearch(
                    space=space.sample,
                    metric=space.metric,
                    mode=space.mode,
                    sampler=TPESampler(seed=options.seed),
                ),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=space.max_epochs(),
                    grace_period=min(space.grace_period, space.max_epochs()),
                    reduction_factor=space.reduction_factor,
                ),
                num_samples=options.trials,
                max_concurrent_trials=concurrency,
                time_budget_s=options.time_budget_s,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=options.name,
                storage_path=parent_path,
                storage_filesystem=fs,
                # Quiet: one line per trial event (below) instead of Tune's status tables.
                verbose=0 if quiet() else None,
                callbacks=[_TrialLines(space.metric)] if quiet() else None,
            ),
        )
    grid = tuner.fit()
    rows = sweep_table(grid, space, sweep_uri, storage_uri)
    return write_sweep_outputs(rows, space, sweep_uri, data_uri, evaluate_test=options.evaluate_test)


class _TrialLines(ray.tune.Callback):
    """One line per trial event on the driver's terminal: started (its parameters), finished or stopped
    (its last objective), failed (the first line of its error)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted((trial.config or {}).items()))
        print_err(f"sweep: trial {trial.trial_id} started ({params})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.3f}" if isinstance(value, (int, float)) else "-"
        epochs = int(result.get("epoch", -1)) + 1
        print_err(f"sweep: trial {trial.trial_id} ended after {epochs} epoch(s): {self.metric} {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print_err(f"sweep: trial {trial.trial_id} failed (see the sweep table's error column)")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
