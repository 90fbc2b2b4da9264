"""A sweep's search space: the YAML file, its checks, and each trial's TrainConfig (no Ray needed).

The file (``load_space``)::

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from acol_core.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    import optuna

__all__ = [
    "CONFIG_FIELDS",
    "OBJECTIVES",
    "PARAM_TYPES",
    "ParamSpec",
    "SpaceError",
    "SweepSpace",
    "check_trial_config",
    "load_space",
    "parse_space",
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
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


class SpaceError(ConfigError):
    """A search-space file that cannot be used (unknown key, bad range, bad reference)."""


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
            if name in CONFIG_FIELDS:
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
    from acol_core.config import read_yaml

    return parse_space(read_yaml(uri, SpaceError), source=uri)


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
    unknown = sorted(set(raw) - CONFIG_FIELDS)
    if unknown:
        raise SpaceError(
            f"{source}: fixed: unknown TrainConfig field(s) {', '.join(unknown)} "
            f"(model options go under fixed.model_options; fields: {', '.join(sorted(CONFIG_FIELDS))})"
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

    option_specs = [s for s in space.params.values() if s.name not in CONFIG_FIELDS]
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
