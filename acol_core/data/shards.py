"""Sharded Parquet datasets: the writer (shard by shard, manifest last) and the verifying reader.

A dataset is a folder (local or s3://) of ``part-NNNNN.parquet`` shards (zstd), ``_rejects.parquet``
(source, reason) and ``_manifest.json``, which is written last: a folder without it is not a dataset.
Every file is written under a temporary name and moved into place once complete.

Writing in steps (what the Prefect flow does, one task per shard)::

    begin_dataset(uri)                                 # manifest removed first, stale shards cleared
    infos = [write_shard(records_k, uri, k) for k ...] # any order, retries overwrite the same name
    rejects = write_rejects(all_rejects, uri)
    manifest = write_manifest(uri, infos, class_names=..., source_description=..., rejects=rejects,
                              inputs=n_inputs, accepted=n_accepted)

or in one call: ``write_dataset(items, uri, class_names, source_description)``.

Examples:
    >>> ds = open_dataset("/data/phantom")                  # doctest: +SKIP
    >>> ds.read_table(split="val", columns=["image_id", "label"]).num_rows  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import acol_core
from acol_core import storage
from acol_core.data.schema import SCHEMA, SCHEMA_VERSION, SPLITS, Record, Reject, record_to_row
from acol_core.errors import UserError

__all__ = [
    "MANIFEST_NAME",
    "REJECTS_NAME",
    "REJECTS_SCHEMA",
    "DatasetError",
    "Manifest",
    "RejectsInfo",
    "ShardInfo",
    "ShardedDataset",
    "begin_dataset",
    "open_dataset",
    "read_manifest",
    "records_to_table",
    "shard_name",
    "table_to_shard",
    "write_dataset",
    "write_manifest",
    "write_rejects",
    "write_shard",
]

MANIFEST_NAME = "_manifest.json"
REJECTS_NAME = "_rejects.parquet"
REJECTS_SCHEMA = pa.schema([pa.field("source", pa.string(), False), pa.field("reason", pa.string(), False)])
_SHARD_RE = re.compile(r"^part-\d+\.parquet$")
_TEMP_MARK = ".tmp-"
# Min/max statistics of PNG columns would copy image bytes into the footer: only small columns get them.
_STATS_COLUMNS = ["image_id", "height", "width", "label", "split", "fullsup", "subject_id", "slice_index"]
UNLABELLED = "(unlabelled)"


class DatasetError(UserError, RuntimeError):
    """A dataset folder that is incomplete, altered, or inconsistent."""


@dataclass
class ShardInfo:
    """One written shard: its name, rows, checksum and counts (for the manifest)."""

    name: str
    rows: int
    sha256: str
    bytes: int
    split_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)  # str(label index) -> rows
    split_label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    fullsup: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(**d)


@dataclass
class RejectsInfo:
    name: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """The contents of ``_manifest.json``."""

    schema_version: int
    code_version: str
    class_names: list[str]
    num_rows: int
    inputs: int
    accepted: int
    rejected: int
    counts: dict[str, Any]
    shards: list[ShardInfo]
    rejects: RejectsInfo
    source: dict[str, Any]
    preparation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = [
            {k: s[k] for k in ("name", "rows", "sha256", "bytes", "split_counts", "fullsup")}
            for s in out["shards"]
        ]
        return {"format": "acol-flow parquet dataset", **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = {k: v for k, v in d.items() if k != "format"}
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["rejects"] = RejectsInfo(**d["rejects"])
        return cls(**d)

    @property
    def split_counts(self) -> dict[str, int]:
        return dict(self.counts["split"])


# --------------------------------------------------------------------------- writing


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=_STATS_COLUMNS)
    return sink.getvalue().to_pybytes()


def records_to_table(records: Iterable[Record], class_names: Sequence[str] | None = None) -> pa.Table:
    """Validate and encode Records into a table of the dataset schema."""
    rows = []
    for record in records:
        row = record_to_row(record)
        if class_names is not None:
            bad = [v for v in [row["label"], *row["labels"]] if v >= len(class_names)]
            if bad:
                raise ValueError(f"{record.image_id}: label {bad[0]} outside the {len(class_names)} classes")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _table_counts(table: pa.Table) -> tuple[dict, dict, dict, int]:
    splits = table.column("split").to_pylist()
    labels = [str(v) for v in table.column("label").to_pylist()]
    split_label: dict[str, Counter] = {}
    for s, lab in zip(splits, labels, strict=True):
        split_label.setdefault(s, Counter())[lab] += 1
    fullsup = sum(bool(v) for v in table.column("fullsup").to_pylist())
    return (
        dict(sorted(Counter(splits).items())),
        dict(sorted(Counter(labels).items())),
        {s: dict(sorted(c.items())) for s, c in sorted(split_label.items())},
        fullsup,
    )


def table_to_shard(table: pa.Table, output_uri: str, name: str) -> ShardInfo:
    """Write a schema table as one shard (temporary name, then moved) and describe it."""
    data = _parquet_bytes(table.cast(SCHEMA))
    storage.write_bytes(storage.join(output_uri, name), data)
    split_counts, label_counts, split_label_counts, fullsup = _table_counts(table)
    return ShardInfo(
        name=name,
        rows=table.num_rows,
        sha256=_sha256(data),
        bytes=len(data),
        split_counts=split_counts,
        label_counts=label_counts,
        split_label_counts=split_label_counts,
        fullsup=fullsup,
    )


def write_shard(
    records: Sequence[Record],
    output_uri: str,
    shard_index: int,
    class_names: Sequence[str] | None = None,
) -> ShardInfo:
    """Encode Records and write them as shard ``part-<shard_index>.parquet``."""
    return table_to_shard(records_to_table(records, class_names), output_uri, shard_name(shard_index))


def write_rejects(rejects: Iterable[Reject], output_uri: str) -> RejectsInfo:
    """Write ``_rejects.parquet`` (always, empty too, so that its row count can be checked)."""
    rows = [{"source": r.source, "reason": r.reason} for r in rejects]
    data = _parquet_bytes(pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA))
    storage.write_bytes(storage.join(output_uri, REJECTS_NAME), data)
    return RejectsInfo(REJECTS_NAME, len(rows), _sha256(data))


def _is_ours(name: str) -> bool:
    return bool(_SHARD_RE.match(name)) or _TEMP_MARK in name or name == REJECTS_NAME


def begin_dataset(output_uri: str) -> None:
    """Prepare a folder for (re)writing: the manifest goes first, then old shards and temporary files.

    Only files this module writes are removed, so pointing it at a wrong folder loses nothing else.
    """
    storage.delete(storage.join(output_uri, MANIFEST_NAME))
    for name in storage.list_dir(output_uri):
        if _is_ours(name):
            storage.delete(storage.join(output_uri, name))


def _merge_counts(shards: Sequence[ShardInfo], class_names: Sequence[str]) -> dict[str, Any]:
    def named(label: str) -> str:
        index = int(label)
        return class_names[index] if 0 <= index < len(class_names) else UNLABELLED

    split: Counter = Counter()
    per_class: Counter = Counter()
    split_class: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for info in shards:
        split.update(info.split_counts)
        per_class.update({named(k): v for k, v in info.label_counts.items()})
        for s, counts in info.split_label_counts.items():
            split_class[s].update({named(k): v for k, v in counts.items()})
    return {
        "split": {s: split.get(s, 0) for s in SPLITS},
        "class": {name: per_class.get(name, 0) for name in class_names}
        | ({UNLABELLED: per_class[UNLABELLED]} if per_class.get(UNLABELLED) else {}),
        "split_class": {s: dict(sorted(c.items())) for s, c in split_class.items()},
        "fullsup": sum(info.fullsup for info in shards),
    }


def write_manifest(
    output_uri: str,
    shard_infos: Sequence[ShardInfo],
    *,
    class_names: Sequence[str],
    source_description: dict[str, Any],
    rejects: RejectsInfo,
    inputs: int,
    accepted: int | None = None,
    preparation: dict[str, Any] | None = None,
) -> Manifest:
    """Check the shards against the counts, drop leftovers, and write ``_manifest.json`` (last).

    Args:
        inputs: how many inputs the source offered.
        accepted: inputs that gave rows (default: the number of rows, for one row per input).
    """
    shards = sorted(shard_infos, key=lambda s: s.name)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise DatasetError(f"duplicate shard names: {names}")
    present = set(storage.list_dir(output_uri))
    missing = [n for n in names if n not in present]
    if missing or rejects.name not in present:
        raise DatasetError(f"files missing at {output_uri}: {missing or [rejects.name]}")
    num_rows = sum(s.rows for s in shards)
    accepted = num_rows if accepted is None else accepted
    if accepted + rejects.rows != inputs:
        raise DatasetError(f"accepted ({accepted}) + rejected ({rejects.rows}) != inputs ({inputs})")
    for name in present - set(names):
        if _is_ours(name) and name != REJECTS_NAME:
            storage.delete(storage.join(output_uri, name))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        code_version=acol_core.__version__,
        class_names=list(class_names),
        num_rows=num_rows,
        inputs=inputs,
        accepted=accepted,
        rejected=rejects.rows,
        counts=_merge_counts(shards, class_names),
        shards=shards,
        rejects=rejects,
        source=dict(source_description),
        preparation=dict(preparation or {}),
    )
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    storage.write_bytes(storage.join(output_uri, MANIFEST_NAME), text.encode())
    return manifest


def write_dataset(
    items: Iterable[Record | Reject],
    output_uri: str,
    class_names: Sequence[str],
    source_description: dict[str, Any],
    rows_per_shard: int = 256,
    preparation: dict[str, Any] | None = None,
) -> Manifest:
    """Write Records (with their split set) and Rejects as a complete dataset, in one call."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    begin_dataset(output_uri)
    infos: list[ShardInfo] = []
    rejects: list[Reject] = []
    buffer: list[Record] = []
    seen: set[str] = set()
    inputs = 0
    for item in items:
        inputs += 1
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        if item.image_id in seen:
            raise DatasetError(f"duplicate image_id {item.image_id!r}")
        seen.add(item.image_id)
        buffer.append(item)
        if len(buffer) == rows_per_shard:
            infos.append(write_shard(buffer, output_uri, len(infos), class_names))
            buffer = []
    if buffer:
        infos.append(write_shard(buffer, output_uri, len(infos), class_names))
    return write_manifest(
        output_uri,
        infos,
        class_names=class_names,
        source_description=source_description,
        rejects=write_rejects(rejects, output_uri),
        inputs=inputs,
        preparation=preparation,
    )


# --------------------------------------------------------------------------- reading


def read_manifest(uri: str) -> Manifest:
    """Parse ``_manifest.json``; DatasetError when there is none."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise DatasetError(f"no {MANIFEST_NAME} at {uri}: not a complete dataset")
    try:
        manifest = Manifest.from_dict(json.loads(storage.read_bytes(manifest_uri)))
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"unreadable {MANIFEST_NAME} at {uri}: {exc}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise DatasetError(
            f"dataset at {uri} has schema version {manifest.schema_version}; this code reads {SCHEMA_VERSION}"
        )
    return manifest


def _file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardedDataset:
    """A complete dataset folder: its manifest, shard locations and tables."""

    def __init__(self, uri: str, manifest: Manifest) -> None:
        self.uri = uri
        self.manifest = manifest
        self.filesystem, self._path = storage.resolve(uri)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s.name) for s in self.manifest.shards]

    def shard_paths(self) -> list[str]:
        """Shard paths inside ``self.filesystem`` (what pyarrow and Ray Data take with it)."""
        return [f"{self._path.rstrip('/')}/{s.name}" for s in self.manifest.shards]

    def verify(self) -> None:
        """Check every shard and the rejects file against the manifest's sha256."""
        files = [(s.name, s.sha256) for s in self.manifest.shards]
        files.append((self.manifest.rejects.name, self.manifest.rejects.sha256))
        for name, expected in files:
            path = f"{self._path.rstrip('/')}/{name}"
            if self.filesystem.get_file_info(path).type != pafs.FileType.File:
                raise DatasetError(f"{name} is listed in the manifest but missing at {self.uri}")
            actual = _file_sha256(self.filesystem, path)
            if actual != expected:
                raise DatasetError(
                    f"{name} at {self.uri} does not match the manifest (sha256 {actual[:12]}… != "
                    f"{expected[:12]}…): the dataset was altered or partly rewritten; prepare it again"
                )

    def read_table(self, split: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """All rows (or one split's), optionally only some columns."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cols = list(columns) if columns is not None else None
        if not self.manifest.shards:
            empty = SCHEMA.empty_table()
            return empty.select(cols) if cols else empty
        dataset = pads.dataset(
            self.shard_paths(), schema=SCHEMA, format="parquet", filesystem=self.filesystem
        )
        flt = pads.field("split") == split if split is not None else None
        return dataset.to_table(columns=cols, filter=flt)

    def read_rejects(self) -> pa.Table:
        return pq.read_table(
            f"{self._path.rstrip('/')}/{self.manifest.rejects.name}", filesystem=self.filesystem
        )


def open_dataset(uri: str, verify: bool = True) -> ShardedDataset:
    """Open a complete dataset; with ``verify`` every file's sha256 is checked against the manifest."""
    dataset = ShardedDataset(uri, read_manifest(uri))
    if verify:
        dataset.verify()
    return dataset
