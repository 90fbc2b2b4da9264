"""Prediction folders: the schema of ``acol localize``'s output, its atomic commit, and its reader.

A predictions folder (local or s3://) holds ``pred-NNNNN.parquet`` files and ``_SUCCESS.json``, written
last: a folder without it is refused by the reader. Writers put their files in a staging folder
``<output>/_tmp-<uuid>/`` first; ``commit_predictions`` then removes the old ``_SUCCESS.json``, the old
prediction files and stale staging folders, moves the new files in, and writes ``_SUCCESS.json``. One
writer per output folder at a time (a second writer's staging folder would be removed as stale).

Columns (one row per image): ``image_id``; ``pred_label``; ``scores`` (softmax, list<float>); ``cam``
(uint8 PNG of the predicted class's fused, normalised map ×255 at the image's own height × width);
``mask`` (uint8 PNG, 1 where ``cam / 255 >= threshold``: the stored map reproduces the stored mask
exactly); ``boxes`` (wsolevaluation's ``[x0, y0, x1, y1]`` box of every OpenCV contour of the map at
the threshold, as MaxBoxAccV2 scores them: ``acol_core.localize.predicted_boxes``; empty when none);
``cam_gt`` (the ground-truth class's map where the dataset row has a label that differs from
``pred_label``, else null: where it is null the GT class's map is ``cam``); ``model`` (registry name)
and ``checkpoint`` (sha256 of the model export file); ``subject_id``, ``slice_index``, ``height``,
``width``.

Examples:
    >>> write_predictions([table], "runs/pred", model="acol", checkpoint=sha, data="runs/data",
    ...                   splits=["test"], threshold=0.5, class_names=["healthy", "tumour"])  # doctest: +SKIP
    >>> read_predictions("runs/pred").num_rows                                                # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import acol_core
from acol_core import storage
from acol_core.data.codec import decode_png, encode_png
from acol_core.errors import UserError

__all__ = [
    "watch_staged_rows",
    "PREDICTIONS_FORMAT",
    "PREDICTION_SCHEMA",
    "SUCCESS_NAME",
    "PredictionsError",
    "PredictionsInfo",
    "check_output",
    "commit_predictions",
    "decode_cam",
    "decode_mask",
    "empty_predictions",
    "encode_cam",
    "encode_mask",
    "predictions_to_nifti",
    "quantize_cam",
    "read_predictions",
    "read_success",
    "staging_uri",
    "volume_plan",
    "write_predictions",
]

PREDICTIONS_FORMAT = "acol-flow predictions/v1"
SUCCESS_NAME = "_SUCCESS.json"
_FILE_PREFIX, _STAGING_PREFIX = "pred-", "_tmp-"

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("pred_label", pa.int32(), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("cam", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("cam_gt", pa.binary()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)


class PredictionsError(UserError, ValueError):
    """A predictions folder that is incomplete, inconsistent, or may not be written."""


@dataclass(frozen=True)
class PredictionsInfo:
    """The contents of ``_SUCCESS.json``."""

    num_rows: int
    files: list[dict[str, Any]]
    model: str
    checkpoint: str
    data: str
    splits: list[str]
    threshold: float
    class_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PREDICTIONS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictionsInfo:
        if d.get("format") != PREDICTIONS_FORMAT:
            raise PredictionsError(f"unsupported predictions format {d.get('format')!r}")
        return cls(**{k: v for k, v in d.items() if k != "format"})


# --------------------------------------------------------------------------- maps as PNG


def quantize_cam(cam: np.ndarray) -> np.ndarray:
    """A [0, 1] map as uint8 0..255 (rounded): what the ``cam`` column stores."""
    return np.rint(np.clip(np.nan_to_num(np.asarray(cam, np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_cam(cam: np.ndarray) -> bytes:
    return encode_png(quantize_cam(cam))


def decode_cam(data: bytes) -> np.ndarray:
    """A ``cam`` PNG back to a float32 map in [0, 1] (steps of 1/255)."""
    return decode_png(bytes(data)).astype(np.float32) / 255.0


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_png(np.asarray(mask, np.uint8))


def decode_mask(data: bytes) -> np.ndarray:
    out = decode_png(bytes(data))
    return out[..., 0] if out.ndim == 3 else out


def empty_predictions() -> pa.Table:
    return PREDICTION_SCHEMA.empty_table()


# --------------------------------------------------------------------------- writing


def check_output(output_uri: str, data_uri: str | None = None) -> None:
    """Refuse outputs that would overwrite a dataset (the commit deletes old prediction files)."""
    if data_uri is not None and storage.resolve(output_uri)[1] == storage.resolve(data_uri)[1]:
        raise PredictionsError(f"output {output_uri} is the dataset folder; choose another output")
    if storage.exists(storage.join(output_uri, "_manifest.json")):
        raise PredictionsError(f"output {output_uri} holds a dataset (_manifest.json); choose another output")
    storage.check_reachable(output_uri)


def staging_uri(output_uri: str) -> str:
    """A fresh staging folder inside the output: where writers put files before the commit."""
    return storage.join(output_uri, f"{_STAGING_PREFIX}{uuid.uuid4().hex}")


def _parquet_files(folder_uri: str) -> list[str]:
    return [n for n in storage.list_dir(folder_uri) if n.endswith(".parquet")]


def _read_ids_and_rows(uri: str) -> tuple[list[str], int]:
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_id"])
    return table.column("image_id").to_pylist(), table.num_rows


def commit_predictions(
    staging: str,
    output_uri: str,
    *,
    model: str,
    checkpoint: str,
    data: str,
    splits: Sequence[str],
    threshold: float,
    class_names: Sequence[str],
    expected_rows: int | None = None,
    extra: dict[str, Any] | None = None,
) -> PredictionsInfo:
    """Move the staged Parquet files into ``output_uri`` and write ``_SUCCESS.json`` last.

    The staged files are checked first (no duplicate ``image_id``, ``expected_rows`` rows): on a
    mismatch the staging folder is removed and the old output is left as it was.
    """
    names = _parquet_files(staging)
    staged: list[tuple[str, int]] = []
    seen: set[str] = set()
    for name in names:
        ids, rows = _read_ids_and_rows(storage.join(staging, name))
        dup = seen.intersection(ids) or (len(set(ids)) != len(ids))
        if dup:
            storage.delete(staging)
            raise PredictionsError(
                f"duplicate image_id in the predictions of {data}: the run is inconsistent"
            )
        seen.update(ids)
        staged.append((name, rows))
    total = sum(rows for _, rows in staged)
    if expected_rows is not None and total != expected_rows:
        storage.delete(staging)
        raise PredictionsError(f"{total} predictions for {expected_rows} rows of {list(splits)} in {data}")
    # The old _SUCCESS.json goes first: from here on a reader refuses the folder until the new one lands.
    storage.delete(storage.join(output_uri, SUCCESS_NAME))
    staging_name = staging.rstrip("/").rsplit("/", 1)[-1]
    for name in storage.list_dir(output_uri):
        old_file = name.startswith(_FILE_PREFIX) and name.endswith(".parquet")
        stale_staging = name.startswith(_STAGING_PREFIX) and name != staging_name
        if old_file or stale_staging:
            storage.delete(storage.join(output_uri, name))
    fs, _ = storage.resolve(output_uri)
    files = []
    for index, (name, rows) in enumerate((n, r) for n, r in staged if r > 0):
        final = f"{_FILE_PREFIX}{index:05d}.parquet"
        src, dst = (
            storage.resolve(storage.join(staging, name))[1],
            storage.resolve(storage.join(output_uri, final))[1],
        )
        fs.move(src, dst)
        files.append({"name": final, "rows": rows, "bytes": fs.get_file_info(dst).size})
    storage.delete(staging)
    info = PredictionsInfo(
        num_rows=total,
        files=files,
        model=model,
        checkpoint=checkpoint,
        data=data,
        splits=list(splits),
        threshold=float(threshold),
        class_names=list(class_names),
        extra={
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": acol_core.__version__,
            **(extra or {}),
        },
    )
    text = json.dumps(info.to_dict(), indent=2) + "\n"
    storage.write_bytes(storage.join(output_uri, SUCCESS_NAME), text.encode())
    return info


def write_predictions(tables: Iterable[pa.Table], output_uri: str, **meta: Any) -> PredictionsInfo:
    """Write prediction tables (any number, PREDICTION_SCHEMA) as a committed folder.

    ``meta`` are ``commit_predictions``'s keyword arguments (model, checkpoint, data, splits, ...).
    """
    check_output(output_uri, meta.get("data"))
    staging = staging_uri(output_uri)
    try:
        for index, table in enumerate(tables):
            sink = pa.BufferOutputStream()
            pq.write_table(
                table.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA), sink, compression="zstd"
            )
            storage.write_bytes(
                storage.join(staging, f"part-{index:05d}.parquet"), sink.getvalue().to_pybytes()
            )
        return commit_predictions(staging, output_uri, **meta)
    finally:
        storage.delete(staging)


# --------------------------------------------------------------------------- reading


def read_success(uri: str) -> PredictionsInfo:
    """Parse ``_SUCCESS.json``; PredictionsError when the folder has none (not committed)."""
    path = storage.join(uri, SUCCESS_NAME)
    if not storage.exists(path):
        raise PredictionsError(f"no {SUCCESS_NAME} at {uri}: not a complete predictions folder")
    try:
        return PredictionsInfo.from_dict(json.loads(storage.read_bytes(path)))
    except (ValueError, TypeError) as exc:
        raise PredictionsError(f"unreadable {SUCCESS_NAME} at {uri}: {exc}") from None


def read_predictions(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The committed predictions (the files ``_SUCCESS.json`` lists), checked against its row count."""
    info = read_success(uri)
    cols = list(columns) if columns is not None else None
    if not info.files:
        empty = empty_predictions()
        return empty.select(cols) if cols else empty
    fs, _ = storage.resolve(uri)
    tables = []
    for entry in info.files:
        file_uri = storage.join(uri, entry["name"])
        if not storage.exists(file_uri):
            raise PredictionsError(f"{entry['name']} is listed in {SUCCESS_NAME} but missing at {uri}")
        table = pq.read_table(storage.resolve(file_uri)[1], filesystem=fs, columns=cols)
        schema = pa.schema([PREDICTION_SCHEMA.field(c) for c in cols]) if cols else PREDICTION_SCHEMA
        tables.append(table.cast(schema))
    table = pa.concat_tables(tables)
    if table.num_rows != info.num_rows:
        raise PredictionsError(f"{uri} has {table.num_rows} rows, {SUCCESS_NAME} says {info.num_rows}")
    return table


# --------------------------------------------------------------------------- volumes


def _subject_file(subject: str, kind: str) -> str:
    return f"{subject.replace('/', '_')}_{kind}.nii.gz"


def _original_header(data_uri: str, source_root: str | None, rel: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(affine, shape) of the source volume the rows were cut from, read from its header."""
    from acol_core.data.sources.nifti import load_nifti_bytes

    if not source_root or not rel:
        raise PredictionsError(
            f"dataset {data_uri} does not name its source files; use orientation='canonical'"
        )
    uri = storage.join(source_root, rel)
    if not storage.exists(uri):
        raise PredictionsError(
            f"source volume {uri} is not reachable (needed for its orientation); use orientation='canonical'"
        )
    image = load_nifti_bytes(storage.read_bytes(uri))
    return np.asarray(image.affine, np.float64), tuple(int(v) for v in image.shape[:3])


def volume_plan(
    data_uri: str, splits: Sequence[str], orientation: str = "original"
) -> dict[str, dict[str, Any]]:
    """Per subject: the canonical grid (shape, affine) and, for ``original``, the source file's header.

    Called before inference so that a missing source file fails the run early.
    """
    from acol_core.data.shards import open_dataset

    if orientation not in ("original", "canonical"):
        raise ValueError(f"orientation must be 'original' or 'canonical', got {orientation!r}")
    dataset = open_dataset(data_uri, verify=False)
    table = pa.concat_tables(
        dataset.read_table(split=s, columns=["subject_id", "volume_shape", "affine", "source"])
        for s in splits
    )
    root = dataset.manifest.source.get("root")
    plan: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row["volume_shape"] is None or row["subject_id"] in plan:
            continue
        entry = {
            "shape": tuple(row["volume_shape"]),
            "affine": np.asarray(row["affine"], np.float64).reshape(4, 4),
        }
        if orientation == "original":
            entry["original"] = _original_header(data_uri, root, row["source"])
        plan[row["subject_id"]] = entry
    if not plan:
        raise PredictionsError(f"dataset {data_uri} has no volume rows (volume_shape/affine) to re-stack")
    return plan


def _to_original(volume: np.ndarray, canonical_affine: np.ndarray, original_affine: np.ndarray) -> tuple:
    """A canonical-grid volume back on the source file's axes: (data, affine)."""
    import nibabel as nib

    ornt = nib.orientations
    back = ornt.ornt_transform(ornt.io_orientation(canonical_affine), ornt.io_orientation(original_affine))
    data = ornt.apply_orientation(volume, back)
    return data, canonical_affine @ ornt.inv_ornt_aff(back, volume.shape)


def predictions_to_nifti(
    pred_uri: str, data_uri: str, out_uri: str, orientation: str = "original", plan: dict | None = None
) -> list[str]:
    """Re-stack each subject's slice masks and CAMs into ``<subject>_mask.nii.gz`` / ``_cam.nii.gz``.

    ``canonical``: on the RAS-canonical grid the dataset's rows describe (``volume_shape``, ``affine``).
    ``original`` (default): on the source file's own voxel axes and affine (its header is read from the
    dataset's source root), so the volumes overlay the input file voxel for voxel. Slices without a
    prediction (skipped at preparation, or another split) are 0. Masks are uint8 0/1, CAMs float32.
    """
    import nibabel as nib

    from acol_core.data.sources.nifti import restack

    info = read_success(pred_uri)
    plan = plan if plan is not None else volume_plan(data_uri, info.splits, orientation)
    table = read_predictions(pred_uri, columns=["subject_id", "slice_index", "mask", "cam"])
    # PNG bytes grouped per subject; decoded one subject at a time (a split of volumes is large).
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        if row["subject_id"] in plan:
            by_subject.setdefault(row["subject_id"], []).append(row)
    written = []
    for subject, rows in sorted(by_subject.items()):
        grid = plan[subject]
        for kind, decode, dtype in (("mask", decode_mask, np.uint8), ("cam", decode_cam, np.float32)):
            slices = {r["slice_index"]: decode(r[kind]) for r in rows}
            volume, affine = restack(slices, grid["shape"], dtype), grid["affine"]
            if "original" in grid:
                volume, affine = _to_original(volume, affine, grid["original"][0])
            image = nib.Nifti1Image(np.ascontiguousarray(volume), affine)
            image.header.set_xyzt_units("mm")
            uri = storage.join(out_uri, _subject_file(subject, kind))
            storage.write_bytes(uri, gzip.compress(image.to_bytes(), compresslevel=6))
            written.append(uri)
    return written


def watch_staged_rows(
    staging: str, total: int, progress: Callable[[int, int], None], stop: threading.Event
) -> None:
    """Report ``progress(rows, total)`` from the files writers finished in ``staging`` (their Parquet
    footers), every half second until ``stop`` is set: a progress line for a Ray Data write."""
    fs, path = storage.resolve(staging)
    counted: dict[str, int] = {}
    reported = -1
    while not stop.wait(0.5):
        try:
            names = storage.list_dir(staging)
        except (OSError, storage.StorageError):
            continue
        for name in names:
            if name.endswith(".parquet") and name not in counted:
                try:
                    counted[name] = pq.read_metadata(f"{path}/{name}", filesystem=fs).num_rows
                except (OSError, pa.ArrowInvalid):
                    pass  # still being written
        done = min(sum(counted.values()), total)
        if done != reported:
            progress(done, total)
            reported = done
