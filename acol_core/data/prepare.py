"""Source -> Parquet dataset: what ``acol prepare`` and the Prefect preprocess flow run.

The preparation is planned first, then run shard by shard, then finished; ``prepare_dataset`` does the
three in one process, the flow runs ``run_shard`` as one task per shard. Both give the same files.

1. ``plan_dataset``: lists the source's inputs, assigns each subject a split (seeded, by subject), and
   cuts the input list into shards. Nothing is read or written yet; the plan is a plain dict.
2. ``run_shard(plan, k)``: reads shard k's inputs, writes ``part-k.parquet``, returns its rejects and
   the val rows that could serve as full supervision.
3. ``finish_dataset(plan, results)``: picks ``fullsup`` rows (N per class among val rows with ground
   truth), rewrites the few shards that hold them, writes ``_rejects.parquet`` and the manifest last.

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
from acol_core.data.splits import assign_subject_splits, check_fractions, select_fullsup

__all__ = [
    "PreparePlan",
    "ShardResult",
    "finish_dataset",
    "plan_dataset",
    "prepare_dataset",
    "run_shard",
    "start_dataset",
]


@dataclass
class PreparePlan:
    """Everything a shard task needs; ``to_dict``/``from_dict`` carry it between processes."""

    source: str
    source_options: dict[str, Any]
    output_uri: str
    seed: int
    split_fractions: tuple[float, float, float]
    fullsup_per_class: int
    rows_per_shard: int
    class_names: list[str]
    source_description: dict[str, Any]
    shards: list[list[tuple[str, str, str]]]  # per shard: (input key, subject id, split)

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


def plan_dataset(
    source: str,
    output_uri: str,
    input_uri: str | None = None,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    fullsup_per_class: int = 5,
    rows_per_shard: int = 256,
    **source_options: Any,
) -> PreparePlan:
    """List the inputs, split them by subject and cut them into shards (reads no pixels)."""
    fractions = check_fractions(split_fractions)
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
            "fullsup_per_class": plan.fullsup_per_class,
            "rows_per_shard": plan.rows_per_shard,
            "splits": list(SPLITS),
        },
    )


def prepare_dataset(
    source: str,
    output_uri: str,
    input_uri: str | None = None,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    fullsup_per_class: int = 5,
    rows_per_shard: int = 256,
    progress: Callable[[int, int], None] | None = None,
    **source_options: Any,
) -> Manifest:
    """Prepare a dataset from a named source in this process.

    Args:
        source: a registered source name (phantom, imagefolder, wsol-metadata, nifti).
        output_uri: dataset folder (path, file:// or s3://); rewritten if it exists.
        input_uri: the source's input folder (not for the phantom).
        seed: drives the split, the fullsup pick, and a generating source's randomness.
        split_fractions: train/val/test shares of the subjects (sources with their own split keep it).
        fullsup_per_class: val rows per class marked ``fullsup``.
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
