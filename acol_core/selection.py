"""Which epoch of a run to keep: one rule for training's checkpoints and for the sweep's trials.

The rule (``select_epoch``), over the per-epoch metrics a run reports:

1. **Too little val to judge**: if the val split has fewer than ``min_class_rows`` labelled rows of some
   class (the ``val_rows_<k>`` counts every epoch reports), or no epoch reports a balanced accuracy
   (no val split), keep the **last** epoch.
2. Otherwise the candidates are the epochs whose val **balanced accuracy** is within ``margin`` of the
   best balanced accuracy of the run; among them the best val **localisation** (``metric``: PxAP on the
   ``fullsup`` val rows by default). Ties go to the later epoch. Candidates without the localisation
   metric (no fullsup rows) are ranked by balanced accuracy.

Why: localisation is what the project selects for, but it is scored on a few dozen fullsup rows and is
noisy, and it can peak while the classifier is still half-trained (the demo kept ACoL's epoch 2 of 12,
val accuracy 0.83, test accuracy 0.69). A CAM is only useful when the classifier separates the classes,
so classification gates the choice first. Balanced accuracy, not accuracy, because on a cohort with 7 %
tumour slices "always healthy" scores 0.93 accuracy and 0.5 balanced accuracy. The margin (0.03) is
about one misclassified row in 30 per class: epochs that classify about as well as the best compete on
localisation. On a val split with under 10 rows of a class, balanced accuracy moves by 0.1 per row, so
neither number is worth selecting on and the fully trained last epoch is the honest choice.

The sweep applies the same rule twice: within each trial to pick its epoch, then across trials
(``best_within_margin`` over each trial's pick: the best localisation among trials that classify within
the margin of the best trial), the latter only when val has enough rows of every class.

Checkpoint retention (Ray keeps only a few checkpoints, ranked by one number reported with each) uses
``retention_score``: an epoch that is the rule's choice over the epochs so far ranks by its epoch, any
other epoch below all of those. ``select_epoch(..., available=...)`` then picks among the checkpoints
that were kept.

Examples:
    >>> history = [
    ...     {"epoch": 0, "val_balanced_accuracy": 0.60, "val_pxap": 0.9, "val_rows_0": 40, "val_rows_1": 20},
    ...     {"epoch": 1, "val_balanced_accuracy": 0.95, "val_pxap": 0.7, "val_rows_0": 40, "val_rows_1": 20},
    ...     {"epoch": 2, "val_balanced_accuracy": 0.93, "val_pxap": 0.8, "val_rows_0": 40, "val_rows_1": 20},
    ... ]
    >>> select_epoch(history).epoch
    2
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "BALANCED_ACCURACY",
    "DEFAULT_MARGIN",
    "MIN_CLASS_ROWS",
    "Selection",
    "best_within_margin",
    "retention_score",
    "select_epoch",
    "val_class_rows",
]

BALANCED_ACCURACY = "val_balanced_accuracy"
DEFAULT_MARGIN = 0.03
MIN_CLASS_ROWS = 10
_ROWS_PREFIX = "val_rows_"


@dataclass(frozen=True)
class Selection:
    """The kept epoch (None for an empty history), its position in the history, and why it was kept."""

    epoch: int | None
    index: int | None
    reason: str
    best_balanced_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _epoch(row: Mapping[str, Any], index: int) -> int:
    epoch = _number(row.get("epoch"))
    return int(epoch) if epoch is not None else index


def val_class_rows(row: Mapping[str, Any]) -> dict[int, int]:
    """``{class index: labelled val rows}`` from one epoch's ``val_rows_<k>`` metrics."""
    counts = {}
    for key, value in row.items():
        if key.startswith(_ROWS_PREFIX) and key[len(_ROWS_PREFIX) :].isdigit():
            counts[int(key[len(_ROWS_PREFIX) :])] = int(_number(value) or 0)
    return counts


def select_epoch(
    history: Sequence[Mapping[str, Any]],
    metric: str = "val_pxap",
    mode: str = "max",
    margin: float = DEFAULT_MARGIN,
    min_class_rows: int = MIN_CLASS_ROWS,
    available: Collection[int] | None = None,
) -> Selection:
    """The epoch to keep by the module's rule.

    Args:
        history: one metrics mapping per epoch (``epoch``, ``val_balanced_accuracy``, ``val_rows_<k>``,
            ``metric``), in the order they ran.
        metric: the localisation metric ranking the candidates; ``mode`` max or min.
        available: epochs that can still be kept (their checkpoint exists); the rule's choice is taken
            when available, else the best available candidate, else the last available epoch.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")
    rows = list(enumerate(history))
    if available is not None:
        keep = {int(e) for e in available}
        allowed = [(i, r) for i, r in rows if _epoch(r, i) in keep]
    else:
        allowed = rows
    if not allowed:
        return Selection(None, None, "no epochs" if not rows else "no epoch has a checkpoint")

    def last(reason: str, best: float | None = None) -> Selection:
        index, row = allowed[-1]
        return Selection(_epoch(row, index), index, reason, best)

    scored = [(i, r, _number(r.get(BALANCED_ACCURACY))) for i, r in rows]
    scored = [(i, r, ba) for i, r, ba in scored if ba is not None]
    if not scored:
        return last("last epoch: no val balanced accuracy")
    counts = val_class_rows(scored[-1][1])
    if not counts or min(counts.values()) < min_class_rows:
        return last(f"last epoch: val has fewer than {min_class_rows} rows of some class")
    best = max(ba for _, _, ba in scored)
    allowed_index = {i for i, _ in allowed}
    candidates = [(i, r, ba) for i, r, ba in scored if ba >= best - margin and i in allowed_index]
    if not candidates:
        return last("last available epoch: no kept epoch is within the balanced-accuracy margin", best)
    sign = 1.0 if mode == "max" else -1.0
    located = [(i, r, _number(r.get(metric))) for i, r, _ in candidates]
    located = [(i, r, v) for i, r, v in located if v is not None]
    if located:
        index, row, _ = max(located, key=lambda c: (sign * c[2], c[0]))
        reason = f"best {metric} within {margin:g} of the best val balanced accuracy"
    else:
        index, row, _ = max(candidates, key=lambda c: (c[2], c[0]))
        reason = f"best val balanced accuracy (no {metric})"
    return Selection(_epoch(row, index), index, reason, best)


def best_within_margin(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "max",
    margin: float = DEFAULT_MARGIN,
    balanced_key: str = BALANCED_ACCURACY,
) -> int | None:
    """Index of the row with the best ``metric`` among those whose ``balanced_key`` is within ``margin``
    of the best; rows without the balanced accuracy compete only when no row has one. Ties go to the
    later row; None when no row has ``metric``.

    Examples:
        >>> best_within_margin([{"ba": 0.6, "m": 0.9}, {"ba": 0.95, "m": 0.5}], "m", balanced_key="ba")
        1
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")
    scored = [(i, _number(r.get(metric)), _number(r.get(balanced_key))) for i, r in enumerate(rows)]
    scored = [(i, v, ba) for i, v, ba in scored if v is not None]
    gated = [(i, v, ba) for i, v, ba in scored if ba is not None]
    if gated:
        best = max(ba for _, _, ba in gated)
        scored = [(i, v, ba) for i, v, ba in gated if ba >= best - margin]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda c: (sign * c[1], c[0]))[0]


def retention_score(
    history: Sequence[Mapping[str, Any]],
    metric: str = "val_pxap",
    mode: str = "max",
    margin: float = DEFAULT_MARGIN,
    min_class_rows: int = MIN_CLASS_ROWS,
) -> float:
    """Rank of the newest epoch's checkpoint for a keep-the-top-k store: its epoch if it is the rule's
    choice over ``history`` so far, else -1 (below every such choice)."""
    if not history:
        return -1.0
    chosen = select_epoch(history, metric, mode, margin, min_class_rows)
    return float(chosen.epoch) if chosen.index == len(history) - 1 else -1.0
