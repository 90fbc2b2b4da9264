"""Source -> Parquet dataset: what ``acol prepare`` and the Prefect preprocess flow run.

The preparation is planned first, then run shard by shard, then finished; ``prepare_dataset`` does the
three in one process, the flow runs ``run_shard`` as one task per shard. Both give the same files.

1. ``plan_dataset``: lists the source's inputs, assigns each subject a split (seeded, by subject, with
   ``split_fractions``; or every subject to the one ``split``, e.g. ``"test"`` for an external cohort),
   and cuts the input list into shards. Nothing is read or written yet; the plan is a plain dict.
2. ``run_shard(plan, k)``: reads shard k's inputs, writes ``part-k.parquet``, returns its rejects and
   the val rows that could serve as full supervision.
3. ``finish_dataset(plan, results)``: picks ``fullsup`` rows per class among val rows with ground truth
   (a given N, or by default ``max(10, ceil(0.1 * n))``: ``acol_core.data.splits.fullsup_count``),
   rewrites the few shards that hold them, writes ``_rejects.parquet`` and the manifest last. The
   manifest's ``preparation`` records the split policy and the fullsup rule.

Examples:
    >>> manifest = prepare_dataset("phantom", "/tmp/phantom", num_subjects=4, size=64)  # doctest: +SKIP
    >>> manifest.counts["split"]                                                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from acol_core import storage
from acol_core.data.schema import SPLITS, Record, Reject
from acol_core.data.shards import (
    DatasetError,
    Manifest,
    ShardInfo,
    begin_dataset,
    table_to_shard,
    write_manifest,
    write_rejects,
    write_shard,
)
from acol_core.data.sources import DataSourceError, Source, get_source, source_option_names
from acol_core.data.splits import (
    FULLSUP_FLOOR,
    FULLSUP_FRACTION,
    assign_subject_splits,
    check_fractions,
    check_single_split,
    select_fullsup,
)

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "PreparePlan",
    "ShardResult",
    "finish_dataset",
    "plan_dataset",
    "prepare_dataset",
    "run_shard",
    "start_dataset",
]

DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass
class PreparePlan:
    """Everything a shard task needs; ``to_dict``/``from_dict`` carry it between processes."""

    source: str
    source_options: dict[str, Any]
    output_uri: str
    seed: int
    split_fractions: tuple[float, float, float]
    fullsup_per_class: int | None  # None: scales with the val rows (splits.fullsup_count)
    rows_per_shard: int
    class_names: list[str]
    source_description: dict[str, Any]
    shards: list[list[tuple[str, str, str]]]  # per shard: (input key, subject id, split)
    split: str | None = None  # every subject in this split (an external cohort), fractions unused

    def split_policy(self) -> dict[str, Any]:
        """How subjects were split, for the manifest."""
        if self.split is not None:
            return {"mode": "single", "split": self.split}
        return {"mode": "fractions", "fractions": list(self.split_fractions), "seed": self.seed}

    def fullsup_policy(self) -> dict[str, Any]:
        """How many val rows per class were marked ``fullsup``, for the manifest."""
        if self.fullsup_per_class is not None:
            return {"mode": "fixed", "per_class": self.fullsup_per_class}
        return {"mode": "scaled", "floor": FULLSUP_FLOOR, "fraction": FULLSUP_FRACTION}

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_inputs(self) -> int:
        return sum(len(s) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreparePlan:
        d = dict(d)
        d["split_fractions"] = tuple(d["split_fractions"])
        d["shards"] = [[tuple(item) for item in shard] for shard in d["shards"]]
        return cls(**d)


@dataclass
class ShardResult:
    """What one shard task hands to ``finish_dataset``."""

    index: int
    shard: ShardInfo | None
    inputs: int
    accepted: int
    rejects: list[Reject] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    fullsup_candidates: list[tuple[str, int]] = field(default_factory=list)
    channels: int = 0  # the most image channels of any accepted row


def _source_options(source: str, input_uri: str | None, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if v is not None}
    accepted = source_option_names(source)
    if input_uri is not None:
        if accepted is not None and "root" not in accepted:
            raise DataSourceError(f"source {source!r} takes no input URI")
        options["root"] = input_uri
    elif accepted is not None and "root" in accepted and "root" not in options:
        raise DataSourceError(f"source {source!r} needs an input URI (--input)")
    # The seed also drives a generating source (the phantom), unless given explicitly.
    if "seed" not in options and (accepted is None or "seed" in accepted):
        options["seed"] = seed
    return options


def _split_choice(
    split: str | None, split_fractions: Sequence[float] | None
) -> tuple[str | None, tuple[float, float, float]]:
    """(single split or None, fractions); the two ways to split are mutually exclusive."""
    if split is not None and split_fractions is not None:
        raise ValueError("give either a single split or split fractions, not both")
    if split is not None:
        single = check_single_split(split)
        return single, tuple(1.0 if s == single else 0.0 for s in SPLITS)  # type: ignore[return-value]
    return None, check_fractions(DEFAULT_SPLIT_FRACTIONS if split_fractions is None else split_fractions)


def plan_dataset(
    source: str,
    output_uri: str,
    input_uri: str | None = None,
    seed: int = 0,
    split_fractions: Sequence[float] | None = None,
    fullsup_per_class: int | None = None,
    rows_per_shard: int = 256,
    split: str | None = None,
    **source_options: Any,
) -> PreparePlan:
    """List the inputs, split them by subject and cut them into shards (reads no pixels)."""
    single, fractions = _split_choice(split, split_fractions)
    if fullsup_per_class is not None and fullsup_per_class < 0:
        raise ValueError(f"fullsup per class must be >= 0, got {fullsup_per_class}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    storage.resolve(output_uri)  # refuses bad URIs (credentials in them) before any work
    if input_uri is not None and not storage.is_local(input_uri):
        storage.check_reachable(input_uri)
    options = _source_options(source, input_uri, seed, source_options)
    src = get_source(source, **options)
    refs = src.list_inputs()
    if not refs:
        raise DataSourceError(f"source {source!r} found no inputs")
    if single is not None:
        # An external cohort: every subject, even one the source would place, goes to the one split.
        items = [(r.key, r.subject_id, single) for r in refs]
    else:
        free = assign_subject_splits([r.subject_id for r in refs if r.split is None], fractions, seed)
        items = [(r.key, r.subject_id, r.split or free[r.subject_id]) for r in refs]
    per_shard = max(1, rows_per_shard // max(1, src.rows_per_input))
    return PreparePlan(
        source=source,
        source_options=options,
        output_uri=output_uri,
        seed=seed,
        split_fractions=fractions,
        fullsup_per_class=fullsup_per_class,
        rows_per_shard=rows_per_shard,
        class_names=list(src.class_names),
        source_description=src.describe(),
        shards=[items[i : i + per_shard] for i in range(0, len(items), per_shard)],
        split=single,
    )


def start_dataset(plan: PreparePlan) -> None:
    """Check the output is reachable, then clear it for writing (manifest first)."""
    storage.check_reachable(plan.output_uri)
    begin_dataset(plan.output_uri)


def _has_ground_truth(record: Record) -> bool:
    return record.mask is not None or record.boxes is not None


def run_shard(plan: PreparePlan, index: int, source: Source | None = None) -> ShardResult:
    """Read shard ``index``'s inputs and write its Parquet file; safe to retry (same name, same bytes)."""
    src = source if source is not None else get_source(plan.source, **plan.source_options)
    result = ShardResult(index=index, shard=None, inputs=len(plan.shards[index]), accepted=0)
    records: list[Record] = []
    for key, subject, split in plan.shards[index]:
        out = src.read_input(key)
        if isinstance(out, Reject):
            result.rejects.append(out)
            continue
        if not out:
            result.rejects.append(Reject(key, "input gave no rows"))
            continue
        result.accepted += 1
        for record in out:
            # The plan owns subject and split, so a subject can never straddle two splits.
            record.subject_id, record.split, record.fullsup = subject, split, False
            records.append(record)
            result.channels = max(
                result.channels, 1 if record.image.ndim == 2 else int(record.image.shape[-1])
            )
            if split == "val" and record.label >= 0 and _has_ground_truth(record):
                result.fullsup_candidates.append((record.image_id, record.label))
    result.image_ids = [r.image_id for r in records]
    if len(set(result.image_ids)) != len(result.image_ids):
        raise DatasetError(f"shard {index}: duplicate image ids from source {plan.source!r}")
    if records:
        result.shard = write_shard(records, plan.output_uri, index, plan.class_names)
    return result


def _mark_fullsup(plan: PreparePlan, info: ShardInfo, chosen: set[str]) -> ShardInfo:
    fs, path = storage.resolve(storage.join(plan.output_uri, info.name))
    table = pq.read_table(path, filesystem=fs)
    flags = pc.is_in(table.column("image_id"), value_set=pa.array(sorted(chosen), pa.string()))
    table = table.set_column(table.schema.get_field_index("fullsup"), "fullsup", flags)
    return table_to_shard(table, plan.output_uri, info.name)


def finish_dataset(plan: PreparePlan, results: Sequence[ShardResult]) -> Manifest:
    """Select ``fullsup`` rows, write the rejects, then the manifest (last)."""
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != list(range(plan.num_shards)):
        raise DatasetError(
            f"expected results for shards 0..{plan.num_shards - 1}, got {[r.index for r in results]}"
        )
    all_ids = [i for r in results for i in r.image_ids]
    if len(set(all_ids)) != len(all_ids):
        raise DatasetError("duplicate image ids across shards")
    rejects = [rej for r in results for rej in r.rejects]
    rejects_info = write_rejects(rejects, plan.output_uri)
    accepted = sum(r.accepted for r in results)
    if accepted == 0:
        reasons = "; ".join(f"{r.source}: {r.reason}" for r in rejects[:3])
        raise DataSourceError(f"no usable input: all {len(rejects)} inputs were rejected ({reasons})")
    chosen = select_fullsup(
        [c for r in results for c in r.fullsup_candidates], plan.fullsup_per_class, plan.seed
    )
    infos = []
    for r in results:
        if r.shard is None:
            continue
        hit = chosen.intersection(i for i, _ in r.fullsup_candidates)
        infos.append(_mark_fullsup(plan, r.shard, hit) if hit else r.shard)
    return write_manifest(
        plan.output_uri,
        infos,
        class_names=plan.class_names,
        source_description=plan.source_description,
        rejects=rejects_info,
        inputs=plan.num_inputs,
        accepted=accepted,
        preparation={
            "seed": plan.seed,
            "split_fractions": list(plan.split_fractions),
            "split_policy": plan.split_policy(),
            "fullsup_per_class": plan.fullsup_per_class,
            "fullsup_policy": plan.fullsup_policy(),
            "rows_per_shard": plan.rows_per_shard,
            "splits": list(SPLITS),
            # What models trained on this dataset take as input unless a config says otherwise.
            "channels": max((r.channels for r in results), default=1) or 1,
        },
    )


def prepare_dataset(
    source: str,
    output_uri: str,
    input_uri: str | None = None,
    seed: int = 0,
    split_fractions: Sequence[float] | None = None,
    fullsup_per_class: int | None = None,
    rows_per_shard: int = 256,
    progress: Callable[[int, int], None] | None = None,
    split: str | None = None,
    **source_options: Any,
) -> Manifest:
    """Prepare a dataset from a named source in this process.

    Args:
        source: a registered source name (phantom, imagefolder, wsol-metadata, nifti).
        output_uri: dataset folder (path, file:// or s3://); rewritten if it exists.
        input_uri: the source's input folder (not for the phantom).
        seed: drives the split, the fullsup pick, and a generating source's randomness.
        split_fractions: train/val/test shares of the subjects (default 0.7/0.15/0.15; sources with
            their own split keep it).
        fullsup_per_class: val rows per class marked ``fullsup``; None scales with the val split,
            ``max(10, ceil(0.1 * n))`` of a class's n val rows with ground truth.
        split: put every subject in this one split (``"test"``: a held-out external cohort), overriding
            any split the source gives; excludes ``split_fractions``.
        rows_per_shard: rows per Parquet shard (a target for sources with many rows per input).
        progress: called as ``progress(shards_done, shards_total)``.
        **source_options: the source's own options (e.g. ``num_subjects`` or ``modalities``).
    """
    plan = plan_dataset(
        source,
        output_uri,
        input_uri,
        seed,
        split_fractions,
        fullsup_per_class,
        rows_per_shard,
        split=split,
        **source_options,
    )
    start_dataset(plan)
    src = get_source(plan.source, **plan.source_options)
    results = []
    for index in range(plan.num_shards):
        results.append(run_shard(plan, index, src))
        if progress is not None:
            progress(index + 1, plan.num_shards)
    return finish_dataset(plan, results)
