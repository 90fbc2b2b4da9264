"""What every source shares: the Source protocol, input-root access with escape checks, mask helpers.

A source lists its *inputs* (one file, one image id, one subject folder: the unit that is accepted or
rejected as a whole) up front, then reads any input on its own. That is what lets the Prefect flow give
each shard task a fixed slice of the inputs, and what keeps ``accepted + rejected == inputs``.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow.fs as pafs

from acol_core import storage
from acol_core.data.schema import MASK_IGNORE, MASK_OBJECT, Record, Reject
from acol_core.errors import UserError

__all__ = [
    "DataSourceError",
    "InputError",
    "InputRef",
    "InputRoot",
    "Source",
    "SourceBase",
    "binarize_mask",
]


class DataSourceError(UserError, RuntimeError):
    """The whole input is unusable (missing root, nothing to read, bad options)."""


class InputError(UserError, ValueError):
    """One input is unusable; its message becomes the Reject reason."""


@dataclass(frozen=True)
class InputRef:
    """One input: ``key`` to read it back, its subject, and the split the source fixes (or None)."""

    key: str
    subject_id: str
    split: str | None = None


@runtime_checkable
class Source(Protocol):
    name: str
    class_names: tuple[str, ...]
    rows_per_input: int

    def describe(self) -> dict[str, Any]: ...

    def list_inputs(self) -> list[InputRef]: ...

    def read_input(self, key: str) -> list[Record] | Reject: ...

    def iter_items(self) -> Iterator[Record | Reject]: ...


class SourceBase:
    """``iter_items`` over ``list_inputs``/``read_input``; subclasses implement those two."""

    name = "source"
    class_names: tuple[str, ...] = ()
    rows_per_input = 1  # a hint for planning shards (slices per volume for volume sources)

    def list_inputs(self) -> list[InputRef]:
        raise NotImplementedError

    def read_input(self, key: str) -> list[Record] | Reject:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "class_names": list(self.class_names)}

    def iter_items(self) -> Iterator[Record | Reject]:
        for ref in self.list_inputs():
            out = self.read_input(ref.key)
            if isinstance(out, Reject):
                yield out
            elif not out:
                yield Reject(ref.key, "input gave no rows")
            else:
                for record in out:
                    if record.split is None:
                        record.split = ref.split
                    yield record


_DRIVE = re.compile(r"^[A-Za-z]:")


class InputRoot:
    """A folder of inputs (local path, file:// or s3://) that refuses paths escaping it.

    Local roots are checked on resolved paths, so both ``..`` and symlinks pointing outside are caught.
    """

    def __init__(self, uri: str, what: str = "input root") -> None:
        self.uri = uri
        self.fs, self.path = storage.resolve(uri)
        self.local = storage.is_local(uri)
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.Directory:
            state = "does not exist" if info.type == pafs.FileType.NotFound else "is not a folder"
            raise DataSourceError(f"{what} {uri} {state}")
        self.real = os.path.realpath(self.path) if self.local else self.path

    def _normalise(self, rel: str) -> str:
        rel = rel.replace("\\", "/")
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or _DRIVE.match(rel) or norm == ".." or norm.startswith("../"):
            raise InputError(f"path escapes the input root: {rel}")
        return norm

    def full_path(self, rel: str) -> str:
        """The filesystem path of ``rel``, after the escape checks."""
        norm = self._normalise(rel)
        if not self.local:
            return f"{self.path}/{norm}"
        full = os.path.join(self.path, norm)
        real = os.path.realpath(full)
        if real != self.real and not real.startswith(self.real + os.sep):
            raise InputError(f"path escapes the input root (symlink): {rel}")
        return full

    def read_bytes(self, rel: str) -> bytes:
        """A file's bytes; InputError when it escapes the root, is missing, not a file or empty."""
        path = self.full_path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"file not found: {rel}")
        if info.type != pafs.FileType.File:
            raise InputError(f"not a file: {rel}")
        with self.fs.open_input_stream(path) as f:
            data = f.read()
        if not data:
            raise InputError(f"empty file (0 bytes): {rel}")
        return data

    def exists(self, rel: str) -> bool:
        try:
            path = self.full_path(rel)
        except InputError:
            return True  # let read_bytes report the escape
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_dirs(self) -> list[str]:
        """Names of the folders directly under the root (hidden ones skipped), sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        names = [posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if not n.startswith("."))

    def list_files(self, sub: str = "") -> list[str]:
        """Relative paths of every file under ``sub`` (recursive, hidden entries skipped), sorted.

        A local symlinked folder that leads outside the root is listed as one entry so that reading it
        gives a Reject instead of silently skipping it.
        """
        start = self.full_path(sub) if sub else self.path
        if self.local:
            return sorted(self._walk_local(start, sub))
        infos = self.fs.get_file_info(pafs.FileSelector(start, recursive=True, allow_not_found=True))
        out = []
        for info in infos:
            rel = info.path[len(self.path) :].lstrip("/")
            if info.type == pafs.FileType.File and not any(p.startswith(".") for p in rel.split("/")):
                out.append(rel)
        return sorted(out)

    def _walk_local(self, folder: str, rel: str) -> Iterator[str]:
        seen = {os.path.realpath(folder)}
        stack = [(folder, rel)]
        while stack:
            path, prefix = stack.pop()
            for entry in os.scandir(path):
                if entry.name.startswith("."):
                    continue
                child = f"{prefix}/{entry.name}" if prefix else entry.name
                if entry.is_dir(follow_symlinks=True):
                    real = os.path.realpath(entry.path)
                    if real != self.real and not real.startswith(self.real + os.sep):
                        yield child
                    elif real not in seen:
                        seen.add(real)
                        stack.append((entry.path, child))
                elif entry.is_file(follow_symlinks=True) or entry.is_symlink():
                    yield child


def binarize_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """A decoded annotation mask -> uint8 {0, 1, 255}; InputError when it is not a binary mask.

    Accepted: values in {0, 1}, {0, 1, 255} (255 = ignore) or two levels {0, v} (v = object, e.g. 0/255).
    Colour masks with three equal channels count as grey.
    """
    if mask.ndim == 3:
        if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(mask.shape[2], 3))):
            raise InputError(f"{what} is a colour image, expected a binary mask")
        mask = mask[..., 0]
    values = np.unique(mask)
    present = set(values.tolist())
    if present <= {0, 1} or (present <= {0, 1, MASK_IGNORE} and 1 in present):
        return mask.astype(np.uint8)
    if present <= {0, int(values[-1])}:
        # Two levels {0, v}: the usual 0/255 PNG mask, v is the object.
        return (mask > 0).astype(np.uint8) * MASK_OBJECT
    shown = values[:6].tolist()
    raise InputError(f"{what} is not binary (values {shown}{'...' if values.size > 6 else ''})")
