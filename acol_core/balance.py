"""Class balance of training: on by default when the train split is imbalanced.

On a cohort with 7 % tumour slices an unbalanced loss is minimised by "always healthy" (val accuracy
0.93, tumour recall 0), and the tumour CAM of such a model is noise. With ``class_balance``:

- ``auto`` (default): balance when the smallest class holds under ``AUTO_THRESHOLD`` (0.7) of an even
  share of the train rows, i.e. under 35 % of them with two classes: with the sampler when the run
  augments (the default), with loss weights when it does not (``auto_method``);
- ``sampler``: always draw by class; ``weights``: always weigh the loss; ``none``: never balance.

**Sampler** (the default's method): every epoch draws each train row ``max(n) / n_k`` times (its class's
sampling factor; a fraction is rounded up or down at random), so each class fills about as much of the
epoch as the largest one, and every copy is augmented afresh. It is done on the data, identically in one
process (``train.iterate_minibatches(..., sampling_factors=config.sampling_factors)``) and under Ray Train
(``repeat_rows``, mapped over the train stream by ``jobs.train_run.build_datasets`` before decoding; the
workers' shuffle buffer spreads the copies). An epoch grows to about ``C * max(n)`` rows (x1.9 on the
``imbalanced`` phantom), which the default pays for the stability it buys.

**Weights**: inverse class frequencies, normalised so that the average train row weighs 1
(``n / (C * n_k)``, scikit-learn's "balanced"); a class without train rows weighs 0. Every
classification loss term of every model takes them per row (its class's weight; a weighted mean over
the batch, as ``cross_entropy(weight=...)``): ACoL's two branches, co-attention's single and pair terms
(weighted by the anchor row's class) and the shared-anatomy soft margin alike.

Why the sampler by default: on the phantom's ``imbalanced`` preset (about 7 % tumour slices from 8
tumour subjects, a quarter near-empty slices; 64 px, 12 epochs, augmented), the loss weights (x7 on each
tumour row) make every step that meets a tumour slice a large one: val tumour recall and PxAP jumped
from epoch to epoch, and the last epoch missed the recipe's target (tumour recall >= 0.8 and balanced
accuracy >= 0.85) for each of seeds 0-2, mostly on balanced accuracy. The sampler kept balanced accuracy
above 0.85 for each of seeds 0-4 and met the whole target for two of them (the others missed tumour
recall by one or two of the 26 val tumour slices), with steadier PxAP over the last epochs: its steps
are ordinary-sized, and its tumour rows come back augmented differently each time instead of weighing
more. Without augmentation the sampler repeats
identical tumour slices and overfits them (val tumour recall fell far below the weights' on the phantom
and on the tests' synthetic set), so ``auto`` weighs the loss then. ``scripts/imbalanced_recipe.py``
reruns the comparison (``--mode sampler|weights --seed N``).

Near-empty slices (the top and bottom of a head, nearly all background) get nothing special: they are
healthy rows and are drawn (or weigh) what healthy rows do. Balancing keeps them from dominating the
loss; dropping them is a data decision (the NIfTI source's minimum-head rule), not the trainer's.

Examples:
    >>> resolve_class_balance("auto", [930, 70]).sampling_factors
    [1.0, 13.2857]
    >>> resolve_class_balance("weights", [930, 70]).weights
    [0.5376, 7.1429]
    >>> resolve_class_balance("auto", [500, 500]).applied
    False
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from acol_core.config import CLASS_BALANCE_MODES, ConfigError, TrainConfig

__all__ = [
    "AUTO_THRESHOLD",
    "ClassBalance",
    "apply_class_balance",
    "auto_method",
    "class_weights",
    "repeat_counts",
    "repeat_rows",
    "resolve_class_balance",
    "sampled_rows",
    "sampling_factors",
    "train_class_counts",
]

AUTO_THRESHOLD = 0.7


@dataclass(frozen=True)
class ClassBalance:
    """What was decided for one run: recorded in its outputs and its exported model."""

    mode: str
    applied: bool
    weights: list[float] | None
    train_counts: list[int]
    minority_share: float | None
    reason: str
    sampling_factors: list[float] | None = None
    method: str | None = None  # "weights" or "sampler" when applied

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_weights(counts: Sequence[int]) -> list[float]:
    """``n / (C * n_k)`` per class over the classes present (rounded to 4 places); 0 for absent ones."""
    present = [c for c in counts if c > 0]
    total = sum(present)
    return [round(total / (len(present) * c), 4) if c > 0 else 0.0 for c in counts]


def sampling_factors(counts: Sequence[int]) -> list[float]:
    """How often each class's rows are drawn per epoch so that every class is seen as often as the
    largest: ``max(n) / n_k`` (rounded to 4 places; 0 for absent classes, 1 for the largest)."""
    present = [c for c in counts if c > 0]
    largest = max(present) if present else 0
    return [round(largest / c, 4) if c > 0 else 0.0 for c in counts]


def repeat_counts(labels: np.ndarray, factors: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Copies of each row in one epoch: its class's factor, rounded up or down at random so that the
    expected count is the factor (14.27 -> 14 or 15 copies, 15 with probability 0.27).

    Examples:
        >>> repeat_counts(np.array([0, 1, 1]), [1.0, 3.0], np.random.default_rng(0)).tolist()
        [1, 3, 3]
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    table = np.asarray(list(factors), dtype=np.float64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
        raise ValueError(f"labels outside the {len(table)} classes of the sampling factors")
    wanted = table[labels]
    whole = np.floor(wanted)
    return (whole + (rng.random(len(wanted)) < wanted - whole)).astype(np.int64)


def sampled_rows(labels: np.ndarray, factors: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Row indices of one class-balanced epoch (each row ``repeat_counts`` times, in row order; shuffle
    them after)."""
    counts = repeat_counts(labels, factors, rng)
    return np.repeat(np.arange(len(counts)), counts)


def repeat_rows(batch: dict[str, np.ndarray], factors: list[float]) -> dict[str, np.ndarray]:
    """Each row of a batch as many times as its class's sampling factor (``repeat_counts``): the train
    stream's map before decoding under Ray Data, so that every copy is decoded and augmented on its own."""
    # Unseeded on purpose, like the augmentation: each epoch re-runs this map and draws anew.
    index = sampled_rows(batch["label"], factors, np.random.default_rng())
    return {k: np.asarray(v)[index] for k, v in batch.items()}


def auto_method(augment: bool) -> str:
    """What ``auto`` does on an imbalanced train split: the sampler when the copies it draws are augmented
    afresh, loss weights when they would be identical (see the module docstring for the measurements)."""
    return "sampler" if augment else "weights"


def resolve_class_balance(
    mode: str,
    counts: Sequence[int],
    given: Sequence[float] | None = None,
    given_factors: Sequence[float] | None = None,
    augment: bool = True,
) -> ClassBalance:
    """The balance decision for train ``counts`` (rows per class index) under ``mode``.

    ``given`` weights (a config's ``class_weights``) and ``given_factors`` (its ``sampling_factors``) are
    used as they are unless ``mode`` is ``none``. ``augment`` (the run's) decides ``auto``'s method.
    """
    if mode not in CLASS_BALANCE_MODES:
        raise ConfigError(f"class_balance must be one of {', '.join(CLASS_BALANCE_MODES)}, got {mode!r}")
    counts = [int(c) for c in counts]
    present = [c for c in counts if c > 0]
    share = min(present) / sum(present) if len(present) > 1 else None
    if mode == "none":
        return ClassBalance(mode, False, None, counts, share, "class_balance is none")
    if given_factors is not None:
        if len(given_factors) != len(counts):
            raise ConfigError(f"sampling_factors has {len(given_factors)} values for {len(counts)} classes")
        factors = [float(f) for f in given_factors]
        weights = None if given is None else [float(w) for w in given]
        method = "sampler" if given is None else "sampler+weights"
        return ClassBalance(mode, True, weights, counts, share, "sampling_factors given", factors, method)
    if given is not None:
        if len(given) != len(counts):
            raise ConfigError(f"class_weights has {len(given)} values for {len(counts)} classes")
        weights = [float(w) for w in given]
        return ClassBalance(mode, True, weights, counts, share, "class_weights given", None, "weights")
    if share is None:
        return ClassBalance(mode, False, None, counts, share, "fewer than two classes in the train split")
    if mode == "auto" and share * len(present) >= AUTO_THRESHOLD:
        reason = f"balanced enough: smallest class {share:.3f} of train rows"
        return ClassBalance(mode, False, None, counts, share, reason)
    method = auto_method(augment) if mode == "auto" else mode
    reason = f"smallest class {share:.3f} of train rows" if mode == "auto" else f"class_balance is {mode}"
    if mode == "auto":
        reason += ": sampler (augmented copies)" if method == "sampler" else ": weights (no augmentation)"
    if method == "sampler":
        factors = sampling_factors(counts)
        return ClassBalance(mode, True, None, counts, share, reason, factors, method)
    return ClassBalance(mode, True, class_weights(counts), counts, share, reason, None, method)


def train_class_counts(split_class: Mapping[str, Mapping[str, int]], class_names: Sequence[str]) -> list[int]:
    """Train rows per class index from a manifest's ``counts["split_class"]``."""
    train = split_class.get("train", {})
    return [int(train.get(name, 0)) for name in class_names]


def apply_class_balance(config: TrainConfig, counts: Sequence[int]) -> tuple[TrainConfig, ClassBalance]:
    """``config`` with the resolved ``class_weights`` and ``sampling_factors`` (None when not applied),
    and the decision."""
    if len(counts) != config.num_classes:
        raise ConfigError(f"{len(counts)} class counts for a model with {config.num_classes} classes")
    decision = resolve_class_balance(
        config.class_balance, counts, config.class_weights, config.sampling_factors, config.augment
    )
    return config.replace(
        class_weights=decision.weights, sampling_factors=decision.sampling_factors
    ), decision
