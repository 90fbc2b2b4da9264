"""Hyper-parameter sweeps: Ray Tune + OptunaSearch + ASHA, each trial one Ray Train run.

One machine (a local Ray starts in this process)::

    acol tune --space tune/spaces/acol_mri.yaml --data runs/data --trials 20 --storage runs/sweeps

A cluster (``ray job submit`` sets RAY_ADDRESS for the entrypoint; storage on S3)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol tune --space tune/spaces/acol_mri.yaml \
        --data s3://bucket/mri --trials 64 --storage s3://bucket/sweeps --workers-per-trial 4 --gpus-per-worker 1

Run the same command again after the driver died: the sweep resumes (``Tuner.restore``); finished trials
are not run again and unfinished ones resume from their Ray Train checkpoints.

The search space is a YAML file (``load_space``)::

    metric: val_pxap            # or val_max_box_acc_v2: localisation on the fullsup val rows, never test
    mode: max
    asha: {grace_period: 1, reduction_factor: 3}
    fixed: {image_size: 128, batch_size: 32}          # TrainConfig fields every trial shares
    params:
      model: {type: categorical, choices: [cam, acol, coatt, acol_coatt]}
      delta: {type: float, low: 0.3, high: 0.95, when: {model: [acol, acol_coatt]}}
      lr:    {type: loguniform, low: 1.0e-3, high: 5.0e-2}

A parameter named like a ``TrainConfig`` field sets that field; any other name is a model option
(``model_options``: delta, head_width, head_depth, pair_policy, shared_anatomy, ...). ``when`` makes a
parameter exist only while earlier parameters (or fixed values) take the listed values; the space is
sampled define-by-run, so Optuna never sees an inactive parameter.

What a sweep writes under ``<storage>/<name>/``: the Tune experiment (trial folders with TensorBoard
event files: ``tensorboard --logdir <storage>/<name>``), ``trials/<name>-<trial id>/`` (each trial's
Ray Train run and checkpoints), ``completed/<trial id>/`` (a marker per finished trial), and
``results/``: ``sweep.parquet`` + ``sweep.csv`` (one row per trial), ``best_config.yaml``,
``best_model.safetensors``, ``summary.json`` (best trial, its test-split metrics) and PNG plots.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from acol_core.config import ConfigError, TrainConfig
from acol_core.console import print_err, quiet, reroute_logs
from acol_core.errors import one_line
from acol_core.selection import BALANCED_ACCURACY, MIN_CLASS_ROWS, best_within_margin, val_class_rows

if TYPE_CHECKING:
    import optuna

__all__ = [
    "OBJECTIVES",
    "PARAM_TYPES",
    "ParamSpec",
    "SpaceError",
    "SweepResult",
    "SweepSpace",
    "TrialReporter",
    "check_trial_config",
    "evaluate_model_on_split",
    "experiment_trial_status",
    "load_space",
    "parse_space",
    "run_sweep",
    "sweep_table",
    "write_sweep_outputs",
]

OBJECTIVES = ("val_pxap", "val_max_box_acc_v2")
PARAM_TYPES = ("float", "int", "loguniform", "categorical")
_TYPE_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "loguniform": {"low", "high"},
    "categorical": {"choices"},
}
_TOP_KEYS = {"metric", "mode", "params", "fixed", "asha", "description"}
_ASHA_KEYS = {"grace_period", "reduction_factor"}
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
# Metrics kept in the sweep table and published as gauges (when a trial reports them).
_TABLE_METRICS = (
    "val_pxap",
    "val_max_box_acc_v2",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_off_target",
    "train_loss",
)
_RESULTS_DIR = "results"
_COMPLETED_DIR = "completed"
_TRIALS_DIR = "trials"


class SpaceError(ConfigError):
    """A search-space file that cannot be used (unknown key, bad range, bad reference)."""


# --------------------------------------------------------------------------- the space (no Ray)


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter; ``when`` maps earlier parameter names to the values that enable it."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        log = self.log or self.kind == "loguniform"
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=log)

    def representative(self) -> Any:
        """A value in the domain (for checking option names)."""
        return (
            self.choices[0]
            if self.kind == "categorical"
            else (int(self.low) if self.kind == "int" else self.low)
        )

    def largest(self) -> Any:
        return max(self.choices) if self.kind == "categorical" else self.high


@dataclass(frozen=True)
class SweepSpace:
    """A validated search space: searched ``params``, ``fixed`` TrainConfig fields, objective, ASHA."""

    params: Mapping[str, ParamSpec]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    metric: str = "val_pxap"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 3
    description: str = ""

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest each active parameter, in file order."""
        values: dict[str, Any] = {}
        for spec in self.params.values():
            if spec.active({**self.fixed, **values}):
                values[spec.name] = spec.suggest(trial)
        return values

    def train_config(self, params: Mapping[str, Any]) -> TrainConfig:
        """The trial's TrainConfig: ``fixed``, then the sampled values (config fields or model options)."""
        values = {k: v for k, v in self.fixed.items() if k != "model_options"}
        options = dict(self.fixed.get("model_options") or {})
        for name, value in params.items():
            if name in _CONFIG_FIELDS:
                values[name] = value
            else:
                options[name] = value
        return TrainConfig.from_dict({**values, "model_options": options})

    def models(self) -> list[str]:
        spec = self.params.get("model")
        if spec is not None:
            return [str(c) for c in spec.choices]
        return [str(self.fixed.get("model", TrainConfig.model))]

    def max_epochs(self) -> int:
        spec = self.params.get("epochs")
        return int(spec.largest()) if spec is not None else int(self.fixed.get("epochs", TrainConfig.epochs))


def load_space(uri: str) -> SweepSpace:
    """Read and validate a search-space YAML file (local path or s3://)."""
    import yaml

    from acol_core.storage import read_bytes

    try:
        data = yaml.safe_load(read_bytes(uri).decode())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{uri}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_space(data, source=uri)


def parse_space(data: Any, source: str = "<space>") -> SweepSpace:
    """Validate a parsed space document; errors name the file and the offending key."""
    if not isinstance(data, Mapping):
        raise SpaceError(f"{source}: expected a mapping at the top level")
    _no_unknown(data, _TOP_KEYS, source)
    metric = data.get("metric", "val_pxap")
    if metric not in OBJECTIVES:
        raise SpaceError(f"{source}: metric must be one of {', '.join(OBJECTIVES)}, got {metric!r}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{source}: mode must be max or min, got {mode!r}")
    fixed = _parse_fixed(data.get("fixed") or {}, source)
    raw_params = data.get("params")
    if not isinstance(raw_params, Mapping) or not raw_params:
        raise SpaceError(f"{source}: params must be a non-empty mapping of parameter name -> spec")
    params: dict[str, ParamSpec] = {}
    for name, raw in raw_params.items():
        spec = _parse_param(str(name), raw, f"{source}: params.{name}")
        _check_param_name(spec, fixed, f"{source}: params.{name}")
        _check_when(spec, params, fixed, f"{source}: params.{name}.when")
        params[spec.name] = spec
    grace, factor = _parse_asha(data.get("asha") or {}, f"{source}: asha")
    space = SweepSpace(
        params=params,
        fixed=fixed,
        metric=metric,
        mode=mode,
        grace_period=grace,
        reduction_factor=factor,
        description=str(data.get("description", "")),
    )
    _check_registry_names(space, source)
    _check_model_options(space, source)
    return space


def _no_unknown(data: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - allowed)
    if unknown:
        raise SpaceError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _number(value: Any, where: str) -> float:
    # YAML 1.1 reads 1e-3 (no dot) as a string; accept it rather than make users learn that.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpaceError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise SpaceError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SpaceError(f"{where} must be finite, got {value!r}")
    return int(number) if isinstance(value, int) else number


def _parse_param(name: str, raw: Any, where: str) -> ParamSpec:
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise SpaceError(f"{where}: expected a mapping with a 'type' ({', '.join(PARAM_TYPES)})")
    kind = raw["type"]
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{where}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    _no_unknown(raw, _TYPE_KEYS[kind] | {"type", "when"}, where)
    when = _parse_when(raw.get("when") or {}, f"{where}.when")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}.choices must be a non-empty list")
        if any(not isinstance(c, (str, int, float, bool)) for c in choices):
            raise SpaceError(f"{where}.choices must be plain values (strings, numbers, booleans)")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise SpaceError(f"{where}.choices has duplicates: {choices}")
        return ParamSpec(name, kind, choices=tuple(choices), when=when)
    for key in ("low", "high"):
        if key not in raw:
            raise SpaceError(f"{where}: a {kind} parameter needs low and high")
    low, high = _number(raw["low"], f"{where}.low"), _number(raw["high"], f"{where}.high")
    if not low < high:
        raise SpaceError(f"{where}: low ({low}) must be < high ({high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log must be true or false, got {log!r}")
    step = None if raw.get("step") is None else _number(raw["step"], f"{where}.step")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"{where}: an int parameter needs integer low/high, got {low}, {high}")
    if (log or kind == "loguniform") and low <= 0:
        raise SpaceError(f"{where}: a log-scale parameter needs low > 0, got {low}")
    if step is not None and (step <= 0 or step > high - low):
        raise SpaceError(f"{where}.step must be in (0, high - low], got {step}")
    if step is not None and log:
        raise SpaceError(f"{where}: step and log cannot be combined")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=when)


def _parse_when(raw: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{where} must map parameter names to lists of values")
    when = {}
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpaceError(f"{where}.{key} must list at least one value")
        when[str(key)] = tuple(values)
    return when


def _parse_fixed(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{source}: fixed must be a mapping of TrainConfig fields")
    unknown = sorted(set(raw) - _CONFIG_FIELDS)
    if unknown:
        raise SpaceError(
            f"{source}: fixed: unknown TrainConfig field(s) {', '.join(unknown)} "
            f"(model options go under fixed.model_options; fields: {', '.join(sorted(_CONFIG_FIELDS))})"
        )
    try:
        TrainConfig.from_dict(dict(raw))
    except (ConfigError, TypeError) as exc:
        raise SpaceError(f"{source}: fixed: {exc}") from None
    return dict(raw)


def _check_param_name(spec: ParamSpec, fixed: Mapping[str, Any], where: str) -> None:
    if spec.name == "model_options":
        raise SpaceError(f"{where}: search model options by their own names (delta, head_width, ...)")
    if spec.name in fixed or spec.name in (fixed.get("model_options") or {}):
        raise SpaceError(f"{where}: {spec.name!r} is both fixed and searched")
    if spec.name == "epochs" and spec.kind not in ("int", "categorical"):
        raise SpaceError(f"{where}: epochs must be an int or categorical parameter")


def _check_when(
    spec: ParamSpec, earlier: Mapping[str, ParamSpec], fixed: Mapping[str, Any], where: str
) -> None:
    for key, values in spec.when.items():
        if key in fixed:
            continue
        if key not in earlier:
            raise SpaceError(
                f"{where}: {key!r} must be a parameter listed before {spec.name!r} or a fixed field"
            )
        ref = earlier[key]
        if ref.kind == "categorical":
            bad = [v for v in values if v not in ref.choices]
            if bad:
                raise SpaceError(f"{where}.{key}: {bad} not among {key}'s choices {list(ref.choices)}")


def _parse_asha(raw: Any, where: str) -> tuple[int, int]:
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{where} must be a mapping")
    _no_unknown(raw, _ASHA_KEYS, where)
    grace, factor = raw.get("grace_period", 1), raw.get("reduction_factor", 3)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise SpaceError(f"{where}.grace_period must be an integer >= 1, got {grace!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise SpaceError(f"{where}.reduction_factor must be an integer >= 2, got {factor!r}")
    return grace, factor


def _check_registry_names(space: SweepSpace, source: str) -> None:
    from acol_core.models import list_backbones, list_models

    for key, known in (("model", list_models()), ("backbone", list_backbones())):
        spec = space.params.get(key)
        values = list(spec.choices) if spec is not None else [space.fixed.get(key, getattr(TrainConfig, key))]
        bad = [v for v in values if v not in known]
        if bad or (spec is not None and spec.kind != "categorical"):
            raise SpaceError(
                f"{source}: {key} must be categorical over {', '.join(known)}; got {bad or spec.kind}"
            )


def _check_model_options(space: SweepSpace, source: str) -> None:
    """Every model option a trial can receive must be a keyword of that model (names, not values)."""
    import torch

    from acol_core.models import create_model

    option_specs = [s for s in space.params.values() if s.name not in _CONFIG_FIELDS]
    for model in space.models():
        options = dict(space.fixed.get("model_options") or {})
        names = []
        for spec in option_specs:
            if model in spec.when.get("model", (model,)):
                options[spec.name] = spec.representative()
                names.append(spec.name)
        try:
            with torch.device("meta"):  # no memory, no compute: only the signature is checked
                create_model(model, num_classes=2, backbone="tiny", **options)
        except TypeError as exc:
            hint = (
                "restrict model options with when: {model: [...]}" if names else "check fixed.model_options"
            )
            raise SpaceError(f"{source}: {exc} ({hint})") from None
        except (ValueError, RuntimeError):
            pass  # values are checked when each trial starts; a bad one fails that trial only


def check_trial_config(config: TrainConfig) -> None:
    """Fail fast (before any Ray worker starts) on a config whose model cannot be built."""
    import torch

    from acol_core.models import create_model

    if config.pretrained:
        from acol_core.models.pretrained import check_pretrained

        check_pretrained(config.pretrained)
    with torch.device("meta"):
        create_model(
            config.model,
            num_classes=config.num_classes,
            in_channels=config.channels,
            backbone=config.backbone,
            **config.model_options,
        )


# --------------------------------------------------------------------------- the Ray side


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
        for key in _TABLE_METRICS:
            value = values.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._gauge.set(float(value), tags={**self.tags, "metric": key})

    def _mark_completed(self, values: Mapping[str, Any], checkpoint: Any) -> None:
        from acol_core.jobs.train_run import MODEL_FILE
        from acol_core.storage import join, write_bytes

        checkpoint_uri = _checkpoint_uri(self.storage_uri, checkpoint.path) if checkpoint else None
        record = {
            "trial_id": self.tags["trial"],
            "final_metrics": _plain(values),
            "model_uri": join(checkpoint_uri, MODEL_FILE) if checkpoint_uri else None,
            "finished_at": time.time(),
        }
        # One file per completion (never overwritten): a trial trained to the end twice would show.
        write_bytes(join(self.completion_uri, f"{uuid.uuid4().hex}.json"), json.dumps(record).encode())


def _completion_uri(sweep_uri: str, trial_id: str) -> str:
    from acol_core.storage import join

    return join(sweep_uri, _COMPLETED_DIR, trial_id)


def _read_completions(sweep_uri: str, trial_id: str) -> list[dict[str, Any]]:
    from acol_core.storage import join, list_dir, read_bytes

    folder = _completion_uri(sweep_uri, trial_id)
    return [json.loads(read_bytes(join(folder, n))) for n in list_dir(folder) if n.endswith(".json")]


def _sweep_trial(params: dict[str, Any], settings: _TrialSettings) -> None:
    """The Tune function trainable: one Ray Train run named after the trial (a retry resumes it)."""
    import ray.tune

    from acol_core.jobs.train_run import RunOptions, run_training
    from acol_core.storage import join

    trial_id = ray.tune.get_context().get_trial_id()
    done = _read_completions(settings.sweep_uri, trial_id)
    if done:
        # Finished before the sweep driver died, but the experiment state did not record it: report the
        # stored result instead of training again.
        ray.tune.report(done[0]["final_metrics"])
        return
    config = settings.space.train_config(params)
    check_trial_config(config)
    options = RunOptions(
        data=settings.data,
        storage=join(settings.sweep_uri, _TRIALS_DIR),
        name=f"{settings.sweep}-{trial_id}",
        workers=settings.workers,
        cpus_per_worker=settings.cpus_per_worker,
        gpus_per_worker=settings.gpus_per_worker,
        max_failures=settings.max_failures,
        score_metric=settings.space.metric,
        callbacks=[
            TrialReporter(
                tags={"sweep": settings.sweep, "trial": trial_id, "model": config.model},
                completion_uri=_completion_uri(settings.sweep_uri, trial_id),
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


def _absolute(uri: str) -> str:
    """Local paths made absolute: Tune runs trainables in their trial folders."""
    from acol_core.storage import is_local, resolve

    return resolve(uri)[1] if is_local(uri) else uri


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


def run_sweep(
    space_file: str,
    data_uri: str,
    trials: int,
    storage_uri: str,
    name: str = "acol-sweep",
    workers_per_trial: int = 1,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float = 0.0,
    max_concurrent_trials: int | None = None,
    max_failures: int = 1,
    seed: int = 0,
    time_budget_s: float | None = None,
    evaluate_test: bool = True,
) -> SweepResult:
    """Run (or resume: same storage + name) a sweep; writes the outputs and returns where they are.

    Args:
        space_file: search-space YAML (see the module docstring).
        trials: number of trials (a resumed sweep keeps the number it started with).
        max_concurrent_trials: None: as many as the cluster holds, one CPU left for Ray Data.
        max_failures: restarts of a trial's Ray Train worker group after a worker dies.
        evaluate_test: score the best trial's model once on the test split.
    """
    import ray.tune
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from acol_core.jobs import ray_init
    from acol_core.jobs.train_run import check_run_name
    from acol_core.storage import check_reachable, join, resolve

    check_run_name(name, "sweep")
    space = load_space(space_file)
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    if workers_per_trial < 1 or cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ConfigError("workers_per_trial must be >= 1, cpus_per_worker > 0 and gpus_per_worker >= 0")
    data_uri, storage_uri = _absolute(data_uri), _absolute(storage_uri)
    _check_data(data_uri)
    check_reachable(storage_uri)
    ray_init(dashboard=True)
    reroute_logs()  # Optuna and Tune add their terminal handlers on import
    sweep_uri = join(storage_uri, name)
    settings = _TrialSettings(
        sweep=name,
        sweep_uri=sweep_uri,
        storage_uri=storage_uri,
        data=data_uri,
        space=space,
        workers=workers_per_trial,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_failures=max_failures,
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
        concurrency = max_concurrent_trials or _default_concurrency(
            workers_per_trial, cpus_per_worker, gpus_per_worker
        )
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=OptunaSearch(
                    space=space.sample, metric=space.metric, mode=space.mode, sampler=TPESampler(seed=seed)
                ),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=space.max_epochs(),
                    grace_period=min(space.grace_period, space.max_epochs()),
                    reduction_factor=space.reduction_factor,
                ),
                num_samples=trials,
                max_concurrent_trials=concurrency,
                time_budget_s=time_budget_s,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=parent_path,
                storage_filesystem=fs,
                # Quiet: one line per trial event (below) instead of Tune's status tables.
                verbose=0 if quiet() else None,
                callbacks=[_TrialLines(space.metric)] if quiet() else None,
            ),
        )
    grid = tuner.fit()
    rows = sweep_table(grid, space, sweep_uri, storage_uri)
    return write_sweep_outputs(rows, space, sweep_uri, data_uri, evaluate_test=evaluate_test)


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


# --------------------------------------------------------------------------- results


def _checkpoint_uri(storage_uri: str, path: str | None) -> str | None:
    """A path in the storage filesystem (Ray's checkpoint and trial paths) back as a URI."""
    from acol_core.storage import is_local

    if not path:
        return None
    if is_local(storage_uri):
        return path
    return f"{storage_uri.split('://', 1)[0]}://{path.lstrip('/')}"


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
        completions = _read_completions(sweep_uri, trial_id)
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
        for key in _TABLE_METRICS:
            row[key] = _float_or_none(last.get(key))
        best, settled = _best_epoch(history, space, _planned_epochs(space, params), storage_uri)
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
    from acol_core.storage import StorageError, join, read_bytes

    try:
        return json.loads(read_bytes(join(_checkpoint_uri(storage_uri, trial_path) or "", "params.json")))
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


def _best_epoch(
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
    from acol_core.jobs.train_run import MODEL_FILE
    from acol_core.storage import exists, join

    checkpoint = _checkpoint_uri(storage_uri, row.get("checkpoint_path"))
    return bool(checkpoint) and exists(join(checkpoint, MODEL_FILE))


def _model_uri(best: Mapping[str, Any], completion: Mapping[str, Any] | None, storage_uri: str) -> str | None:
    from acol_core.jobs.train_run import MODEL_FILE
    from acol_core.storage import exists, join

    checkpoint = _checkpoint_uri(storage_uri, best.get("checkpoint_path") if best else None)
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

    results = join(sweep_uri, _RESULTS_DIR)
    table_uri, csv_uri = join(results, "sweep.parquet"), join(results, "sweep.csv")
    _write_table(rows, table_uri, csv_uri)
    best_row = _best_row(rows, space)
    best_config_uri = best_model_uri = None
    best: dict[str, Any] | None = None
    test_metrics: dict[str, float] = {}
    if best_row is not None:
        params = {name: best_row[name] for name in space.params if best_row.get(name) is not None}
        config = space.train_config(params).to_dict()
        best = {
            "trial_id": best_row["trial_id"],
            "metric": space.metric,
            "value": best_row[f"best_{space.metric}"],
            "epoch": best_row["best_epoch"],
            "params": params,
            "config": config,
        }
        best_config_uri = join(results, "best_config.yaml")
        write_bytes(best_config_uri, yaml.safe_dump({**best, "config": config}, sort_keys=False).encode())
        if best_row.get("model_uri"):
            best_model_uri = join(results, "best_model.safetensors")
            write_bytes(best_model_uri, read_bytes(best_row["model_uri"]))
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


def _best_row(rows: Sequence[Mapping[str, Any]], space: SweepSpace) -> Mapping[str, Any] | None:
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

    out = []
    for name, figure in (
        ("metric_vs_delta.png", _delta_figure(rows, space)),
        ("history.png", _history_figure(rows, space)),
    ):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        uri = join(results_uri, name)
        write_bytes(uri, buffer.getvalue())
        out.append(uri)
    return out


def _delta_figure(rows: Sequence[Mapping[str, Any]], space: SweepSpace) -> Any:
    """Best objective per trial against δ, one series per model; models without δ as horizontal lines."""
    from matplotlib.figure import Figure

    key = f"best_{space.metric}"
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    models = sorted({str(r.get("model") or space.fixed.get("model", TrainConfig.model)) for r in rows})
    for model in models:
        mine = [
            r for r in rows if str(r.get("model") or space.fixed.get("model", TrainConfig.model)) == model
        ]
        points = [(r["delta"], r[key]) for r in mine if r.get("delta") is not None and r.get(key) is not None]
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            axes.plot(xs, ys, "o-", label=model)
        else:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                axes.axhline(
                    max(values) if space.mode == "max" else min(values), ls="--", label=f"{model} (no δ)"
                )
    axes.set_xlabel("δ (ACoL erase threshold)")
    axes.set_ylabel(f"{space.metric} (fullsup val, best epoch)")
    axes.set_xlim(0.25, 1.0)
    axes.set_title("Objective vs δ per model")
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    return figure


def _history_figure(rows: Sequence[Mapping[str, Any]], space: SweepSpace) -> Any:
    """Each trial's objective (best epoch) in the order the trials started, with the best so far."""
    from matplotlib.figure import Figure

    key = f"best_{space.metric}"
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
    index = np.arange(len(values))
    axes.plot(index, values, "o", label="trial")
    if np.isfinite(values).any():
        fill = -np.inf if space.mode == "max" else np.inf
        running = (np.fmax if space.mode == "max" else np.fmin).accumulate(
            np.where(np.isfinite(values), values, fill)
        )
        axes.step(index, np.where(np.isfinite(running), running, np.nan), where="post", label="best so far")
    errors = [i for i, r in enumerate(rows) if r["status"] == "error"]
    if errors:
        axes.plot(errors, [0.0] * len(errors), "x", color="red", label="error")
    axes.set_xlabel("trial")
    axes.set_ylabel(space.metric)
    axes.set_title("Optimisation history")
    axes.legend()
    return figure


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
                rows, config.channels, config.image_size, with_masks=True, norm=config.effective_input_norm
            )

    pred = predict(model, batches(), device, config.amp)
    metrics = localization_metrics(pred, step=config.val_step)
    return {f"{split}_{k}": float(v) for k, v in metrics.items()}
