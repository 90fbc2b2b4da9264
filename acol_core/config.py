"""Typed training configuration; serialises to the plain dict Ray's ``train_loop_config`` takes.

Examples:
    >>> cfg = TrainConfig.from_dict({"model": "acol", "model_options": {"delta": 0.7}})
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acol_core.errors import UserError

__all__ = [
    "CLASS_BALANCE_MODES",
    "ConfigError",
    "TrainConfig",
    "load_config_file",
    "read_yaml",
    "parse_key_values",
]

CLASS_BALANCE_MODES = ("auto", "weights", "sampler", "none")


class ConfigError(UserError, ValueError):
    """A configuration that cannot run (unknown key, value out of range)."""


@dataclass
class TrainConfig:
    """Everything one training run needs besides the data.

    ``model_options`` go to ``create_model`` (``delta``, ``head_width``, ...).
    """

    model: str = "acol"
    backbone: str = "tiny"
    model_options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # backbone weights: a local path or a storage URI (s3://)
    # Input normalisation: auto = imagenet with pretrained weights (what torchvision/timm trained with),
    # else phantom; recorded in the export so localize applies the same.
    input_norm: str = "auto"
    num_classes: int = 2
    # None: the dataset's channel count (its manifest's ``preparation.channels``; 1 without a dataset).
    in_channels: int | None = None
    image_size: int = 128
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.01
    # Heads' rate = head_lr_mult x lr. None: 10 when fine-tuning a pretrained backbone (ACoL's recipe),
    # 1 from scratch, where 10x heads made the phantom's CAM miss the lesions for some row orders.
    head_lr_mult: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    augment: bool = True
    # --- skull remedies (issue 18): intensity / bias-field / site augmentation, strength in [0, 1]
    # (0: off). Acts only with ``augment``; see ``acol_core.data.transforms.intensity_augment``.
    intensity_augment: float = 0.0
    # Brain harmonisation of the inputs (`acol_core.data.harmonize`): none, or brain (skull-stripped on
    # the rows' anatomy masks, bias-corrected); applied again by `acol localize`.
    harmonize: str = "none"
    # --- end skull remedies
    seed: int = 0
    amp: str = "auto"
    num_threads: int = 0
    checkpoint_every: int = 1
    val_step: float = 0.01
    # Class balance (see acol_core.balance): auto = on when the train split is imbalanced; weights
    # (loss weights), sampler (minority rows drawn more often) or none.
    class_balance: str = "auto"
    # The weights the loss uses (one per class); set from the train split's counts by
    # balance.apply_class_balance, or given. None: unweighted.
    class_weights: list[float] | None = None
    # How often each class's train rows are drawn per epoch (one factor per class; balance.sampling_factors),
    # set by balance.apply_class_balance under the sampler, or given. None: every row once.
    sampling_factors: list[float] | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.in_channels is not None and not 1 <= int(self.in_channels) <= 4:
            raise ConfigError(f"in_channels must be 1..4 (or unset: the dataset's), got {self.in_channels}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.head_lr_mult is not None and not self.head_lr_mult > 0:
            raise ConfigError(f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"lr_schedule must be cosine, step or constant, got {self.lr_schedule!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.class_balance not in CLASS_BALANCE_MODES:
            raise ConfigError(
                f"class_balance must be one of {', '.join(CLASS_BALANCE_MODES)}, got {self.class_balance!r}"
            )
        if self.class_weights is not None:
            weights = [float(w) for w in self.class_weights]
            if len(weights) != self.num_classes or not all(0 <= w < float("inf") for w in weights):
                raise ConfigError(
                    f"class_weights must be {self.num_classes} finite values >= 0, got {self.class_weights}"
                )
            if not any(weights):
                raise ConfigError("class_weights must not all be 0")
            self.class_weights = weights
        if self.input_norm not in ("auto", "phantom", "imagenet", "none"):
            raise ConfigError(f"input_norm must be auto, phantom, imagenet or none, got {self.input_norm!r}")
        if self.sampling_factors is not None:
            factors = [float(f) for f in self.sampling_factors]
            if len(factors) != self.num_classes or not all(0 <= f < float("inf") for f in factors):
                raise ConfigError(
                    f"sampling_factors must be {self.num_classes} finite values >= 0, got {self.sampling_factors}"
                )
            if not any(factors):
                raise ConfigError("sampling_factors must not all be 0")
            self.sampling_factors = factors
        delta = self.model_options.get("delta")
        if delta is not None and not 0.0 < float(delta) < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        # --- skull remedies (issue 18)
        if not 0.0 <= float(self.intensity_augment) <= 1.0:
            raise ConfigError(f"intensity_augment must be in [0, 1], got {self.intensity_augment}")
        if self.intensity_augment and not self.augment:
            raise ConfigError("intensity_augment needs augment: true (it is part of the augmentation)")
        anatomy = self.model_options.get("shared_anatomy", False)
        if not (isinstance(anatomy, bool) or anatomy == "compete"):
            raise ConfigError(f"shared_anatomy must be false, true or 'compete', got {anatomy!r}")
        from acol_core.data.harmonize import HARMONIZE_MODES

        if self.harmonize not in HARMONIZE_MODES:
            raise ConfigError(f"harmonize must be {' or '.join(HARMONIZE_MODES)}, got {self.harmonize!r}")
        fusion = self.model_options.get("fusion", "max")
        if fusion not in ("max", "mean", "joint", "a", "auto"):
            raise ConfigError(f"fusion must be one of max, mean, joint, a, auto, got {fusion!r}")
        # --- end skull remedies

    @property
    def channels(self) -> int:
        """The input channel count models are built with: ``in_channels``, or 1 while it is unset."""
        return int(self.in_channels or 1)

    @property
    def effective_head_lr_mult(self) -> float:
        """The heads' learning-rate multiplier this run uses (``head_lr_mult`` or its default)."""
        if self.head_lr_mult is not None:
            return float(self.head_lr_mult)
        return 10.0 if self.pretrained else 1.0

    @property
    def effective_input_norm(self) -> str:
        """The input normalisation this run uses (``input_norm``, ``auto`` resolved)."""
        if self.input_norm != "auto":
            return self.input_norm
        return "imagenet" if self.pretrained else "phantom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def read_yaml(uri: str | Path, error: type[ConfigError] = ConfigError) -> Any:
    """A YAML (or JSON) file from a path or any URI, parsed; broken YAML is one ``error`` line naming it.

    The one reader of config-like files: training configs, sweep spaces, study configs.
    """
    import yaml

    from acol_core.storage import read_bytes

    try:
        return yaml.safe_load(read_bytes(str(uri)).decode())
    except yaml.YAMLError as exc:
        raise error(f"{uri}: not valid YAML: {' '.join(str(exc).split())}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON config file (a path or any URI, e.g. s3://) into a dict (validated later by
    ``TrainConfig.from_dict``)."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse_key_values(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` options (the CLI's ``--option``, the flows' ``-o``) as a dict: values are YAML
    scalars or flow collections, keys have ``-`` as ``_``.

    Examples:
        >>> parse_key_values(["num-subjects=8", "size=64", "modalities=[t1c, flair]", "name=x"])
        {'num_subjects': 8, 'size': 64, 'modalities': ['t1c', 'flair'], 'name': 'x'}
    """
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot read {value!r}: {str(exc).splitlines()[0]}") from None
    return out
