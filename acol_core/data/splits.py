"""Deterministic train/val/test split by subject, and the few-shot ``fullsup`` selection.

Both rank items by a seeded hash of their id, so the result depends on the set of ids and the seed,
not on the order the ids arrive in (shards processed in any order give the same dataset).

Split policy: fractions of the subjects per split (default 0.7/0.15/0.15), or one split for every
subject (``single_split``: a held-out external cohort is all ``test``).

``fullsup`` count per class: an explicit number, or by default
``max(FULLSUP_FLOOR, ceil(FULLSUP_FRACTION * n))`` where ``n`` is that class's val rows with ground truth
(floor 10, fraction 0.1). Thresholds and checkpoints are chosen on these rows, so a bigger val split
gets a proportionally steadier choice; the floor keeps small datasets from choosing on a handful of rows.

Examples:
    >>> splits = assign_subject_splits(["a", "b", "c", "d"], (0.5, 0.25, 0.25), seed=0)
    >>> sorted(splits.values())
    ['test', 'train', 'train', 'val']
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from acol_core.data.schema import SPLITS

__all__ = [
    "FULLSUP_FLOOR",
    "FULLSUP_FRACTION",
    "assign_subject_splits",
    "check_fractions",
    "check_single_split",
    "fullsup_count",
    "parse_fractions",
    "select_fullsup",
    "split_counts",
]

FULLSUP_FLOOR = 10
FULLSUP_FRACTION = 0.1


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers summing to 1."""
    bad = len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions)
    if bad or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> validated (train, val, test) fractions."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split fractions must be three comma-separated numbers, got {text!r}") from None
    return check_fractions(values)


def check_single_split(split: str) -> str:
    """A split name every subject goes to (``test`` for an external cohort)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Subjects per split: largest remainder, then at least one per non-empty fraction when n allows."""
    fracs = check_fractions(fractions)
    ideal = [f * n for f in fracs]
    counts = [int(v) for v in ideal]
    order = sorted(range(3), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if fracs[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts[0], counts[1], counts[2]


def assign_subject_splits(
    subject_ids: Iterable[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, str]:
    """Map each distinct subject to one split; a subject never lands in two splits."""
    subjects = sorted(set(subject_ids), key=lambda s: (_rank(seed, s), s))
    n_train, n_val, _ = split_counts(len(subjects), fractions)
    out = {}
    for i, subject in enumerate(subjects):
        out[subject] = SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_val else SPLITS[2]
    return out


def fullsup_count(candidates: int, per_class: int | None = None) -> int:
    """Rows to mark ``fullsup`` in a class with ``candidates`` val rows with ground truth.

    ``per_class`` wins when given; otherwise ``max(FULLSUP_FLOOR, ceil(FULLSUP_FRACTION * candidates))``.
    Never more than the candidates.
    """
    if per_class is not None:
        if per_class < 0:
            raise ValueError(f"fullsup per class must be >= 0, got {per_class}")
        wanted = per_class
    else:
        wanted = max(FULLSUP_FLOOR, math.ceil(FULLSUP_FRACTION * candidates - 1e-9))
    return min(wanted, candidates)


def select_fullsup(
    candidates: Iterable[tuple[str, int]], per_class: int | None = None, seed: int = 0
) -> set[str]:
    """Pick image ids per class (wsolevaluation's few-shot full supervision).

    Args:
        candidates: (image_id, label) of the val rows that carry ground truth (mask or boxes).
        per_class: rows to pick per class; None scales with the class's candidates (``fullsup_count``).
            Classes with fewer candidates give all they have.
    """
    by_class: dict[int, list[str]] = {}
    for image_id, label in candidates:
        if label >= 0:
            by_class.setdefault(int(label), []).append(image_id)
    chosen: set[str] = set()
    for ids in by_class.values():
        ids.sort(key=lambda i: (_rank(seed, i), i))
        chosen.update(ids[: fullsup_count(len(ids), per_class)])
    return chosen
