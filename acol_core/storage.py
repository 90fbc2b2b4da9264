"""URI -> filesystem: the one place that knows about local paths, ``file://`` and ``s3://``.

S3 settings come from the environment, never from the URI: ``AWS_ENDPOINT_URL`` (``http://host:port``
for MinIO/moto, unset for AWS), ``AWS_DEFAULT_REGION``/``AWS_REGION``, and credentials through the AWS
default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, instance roles).

Examples:
    >>> fs, path = resolve("/tmp/data")              # LocalFileSystem, "/tmp/data"
    >>> fs, path = resolve("s3://bucket/datasets/x")  # S3FileSystem, "bucket/datasets/x"
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from acol_core.errors import UserError

__all__ = [
    "StorageError",
    "absolute",
    "check_reachable",
    "delete",
    "exists",
    "fsspec_filesystem",
    "is_local",
    "join",
    "list_dir",
    "read_bytes",
    "resolve",
    "uri_for_path",
    "write_bytes",
]


class StorageError(UserError, RuntimeError):
    """A URI that cannot be used: bad form, unreachable endpoint, missing bucket, a failed read or write."""


@contextlib.contextmanager
def _storage_errors(action: str, uri: str) -> Iterator[None]:
    """pyarrow's OSErrors (endpoint down, write refused, disk full) as one-line StorageErrors.

    The message names the URI (never credentials: URIs with them are refused) and pyarrow's first line.
    """
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {uri}: {_short_reason(exc)}") from exc


def _scheme(uri: str) -> str:
    # "C:\\x" style paths and plain paths have no scheme we know of.
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return _scheme(uri) in ("", "file")


def _endpoint() -> tuple[str | None, str]:
    """(host[:port] or None, scheme) from ``AWS_ENDPOINT_URL``; userinfo in it is refused."""
    url = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if not url:
        return None, "https"
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.username or parts.password:
        raise StorageError("AWS_ENDPOINT_URL must not contain credentials; use AWS_ACCESS_KEY_ID etc.")
    if parts.scheme not in ("http", "https"):
        raise StorageError(f"AWS_ENDPOINT_URL scheme must be http or https, got {parts.scheme!r}")
    return parts.netloc, parts.scheme


def _endpoint_label() -> str:
    """The endpoint for messages (never carries credentials: _endpoint refuses those)."""
    host, scheme = _endpoint()
    return f"{scheme}://{host}" if host else "the default AWS endpoint"


def _region() -> str | None:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None


def _s3_filesystem(fail_fast: bool = False) -> pafs.S3FileSystem:
    host, scheme = _endpoint()
    kwargs: dict[str, Any] = {"scheme": scheme}
    if host:
        kwargs["endpoint_override"] = host
    region = _region()
    if region:
        kwargs["region"] = region
    if fail_fast:
        # A reachability probe should answer in seconds, not after the SDK's retry schedule.
        kwargs.update(
            connect_timeout=3,
            request_timeout=10,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
    return pafs.S3FileSystem(**kwargs)


def _split_s3(uri: str) -> str:
    parts = urlsplit(uri)
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise StorageError(
            "S3 URIs must be plain s3://bucket/key: credentials and options come from the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)"
        )
    if not parts.netloc:
        raise StorageError(f"S3 URI without a bucket: {uri!r}")
    key = parts.path.strip("/")
    return f"{parts.netloc}/{key}" if key else parts.netloc


def resolve(uri: str, *, fail_fast: bool = False) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(pyarrow filesystem, path inside it)``.

    Args:
        uri: a local path, ``file:///abs/path`` or ``s3://bucket/key``.
        fail_fast: for S3, short timeouts and no retries (reachability probes).
    """
    scheme = _scheme(uri)
    if scheme == "":
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file:// URIs must name a local path, got host {parts.netloc!r}")
        return pafs.LocalFileSystem(), os.path.abspath(unquote(parts.path))
    if scheme == "s3":
        return _s3_filesystem(fail_fast), _split_s3(uri)
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file:// or s3://)")


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers and Tune trials do not share the driver's working
    directory); other URIs as they are."""
    return resolve(uri)[1] if is_local(uri) else uri


def uri_for_path(storage_uri: str, path: str | None) -> str | None:
    """A path inside ``storage_uri``'s filesystem (as Ray reports checkpoint and trial folders) back as a
    URI under ``storage_uri``; None for no path.

    Examples:
        >>> uri_for_path("s3://bucket/runs", "bucket/runs/x/checkpoint_1")
        's3://bucket/runs/x/checkpoint_1'
    """
    if not path:
        return None
    relative = os.path.relpath(path, _path_in_filesystem(storage_uri))
    return storage_uri if relative == "." else join(storage_uri, *relative.split(os.sep))


def _path_in_filesystem(uri: str) -> str:
    scheme = _scheme(uri)
    if scheme == "s3":
        return _split_s3(uri)
    return resolve(uri)[1]


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``/`` separators for every scheme)."""
    if _scheme(uri) == "":
        return os.path.join(uri, *parts)
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _storage_errors("look up", uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {uri}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {_short_reason(exc)}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically: a temporary sibling first, then a move onto the final name.

    On failure the final name is untouched (an old file stays whole) and the temporary one is removed
    when the store still answers.
    """
    fs, path = resolve(uri)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with _storage_errors("write", uri):
        if is_local(uri):
            fs.create_dir(os.path.dirname(path), recursive=True)
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            # The store may be what failed: cleaning up must not replace the error being raised.
            with contextlib.suppress(OSError):
                _delete_path(fs, tmp)
            raise


def _delete_path(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete(uri: str) -> None:
    """Delete a file or a folder tree; a missing path is not an error."""
    fs, path = resolve(uri)
    with _storage_errors("delete", uri):
        _delete_path(fs, path)


def list_dir(uri: str) -> list[str]:
    """Sorted names (not paths) directly under a folder; [] when it does not exist."""
    fs, path = resolve(uri)
    with _storage_errors("list", uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def check_reachable(uri: str) -> None:
    """Raise StorageError when the URI's endpoint or bucket cannot be used (local: always fine)."""
    if is_local(uri):
        resolve(uri)
        return
    fs, path = resolve(uri, fail_fast=True)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(
            f"cannot reach S3 at {_endpoint_label()} for bucket {bucket!r}: {_short_reason(exc)} "
            "(check AWS_ENDPOINT_URL and the network)"
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"S3 bucket {bucket!r} does not exist at {_endpoint_label()}")


def _short_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def fsspec_filesystem(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for libraries that want fsspec (s3fs for S3), same settings."""
    if is_local(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), resolve(uri)[1]
    import s3fs

    path = _split_s3(uri)
    host, scheme = _endpoint()
    client_kwargs: dict[str, Any] = {}
    if _region():
        client_kwargs["region_name"] = _region()
    endpoint = f"{scheme}://{host}" if host else None
    return s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs=client_kwargs), path
