from __future__ import annotations

import os
import time

import pyarrow.fs as pafs
import pytest

from acol_core import storage
from acol_core.storage import StorageError


def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "dir")
    fs, path = storage.resolve(f"file://{tmp_path}/a%20b")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/a b"
    assert storage.resolve(str(tmp_path))[1] == str(tmp_path)


def test_resolve_s3_takes_endpoint_and_region_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-the-object")
    fs, path = storage.resolve("s3://bucket/some/key/")
    assert path == "bucket/some/key"
    settings = fs.__reduce__()[1][0]
    assert settings["endpoint_override"] == "127.0.0.1:9"
    assert settings["scheme"] == "http"
    assert settings["region"] == "eu-west-3"
    # Credentials stay in the environment: a pickled filesystem (shipped to Ray workers) has none.
    assert settings["secret_key"] is None and settings["access_key"] is None


def test_resolve_s3_region_fallback_and_https(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:9000")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    settings = storage.resolve("s3://b")[0].__reduce__()[1][0]
    assert (settings["scheme"], settings["endpoint_override"], settings["region"]) == (
        "https",
        "minio.example:9000",
        "ap-south-1",
    )


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAXXXX:topsecretvalue@bucket/key",
        "s3://bucket/key?secret_key=topsecretvalue",
        "s3://bucket/key?access_key=a&secret_key=topsecretvalue",
    ],
)
def test_credentials_in_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(StorageError, match="environment") as err:
        storage.resolve(uri)
    assert "topsecretvalue" not in str(err.value)


def test_credentials_in_endpoint_are_refused(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:topsecretvalue@127.0.0.1:9000")
    with pytest.raises(StorageError) as err:
        storage.resolve("s3://bucket/key")
    assert "topsecretvalue" not in str(err.value)


@pytest.mark.parametrize("uri", ["gs://bucket/x", "hdfs://host/x", "s3://"])
def test_unsupported_uris(uri):
    with pytest.raises(StorageError):
        storage.resolve(uri)


def test_local_helpers(tmp_path):
    target = storage.join(str(tmp_path), "a", "b.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")  # replaces atomically
    assert storage.read_bytes(target) == b"two"
    assert storage.exists(target)
    assert os.listdir(tmp_path / "a") == ["b.bin"]  # no temporary file left behind
    assert storage.list_dir(str(tmp_path)) == ["a"]
    assert storage.list_dir(str(tmp_path / "missing")) == []
    storage.delete(str(tmp_path / "a"))
    storage.delete(str(tmp_path / "a"))  # missing is fine
    assert storage.list_dir(str(tmp_path)) == []
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(target)


def test_join_for_uris():
    assert storage.join("s3://b/p/", "x", "/y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.join("file:///d", "m.json") == "file:///d/m.json"


def test_unreachable_endpoint_fails_fast_and_clean(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNREACHABLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable-secret-value")
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3 at http://127.0.0.1:9") as err:
        storage.check_reachable("s3://bucket/data")
    assert time.monotonic() - start < 15
    assert "unreachable-secret-value" not in str(err.value)


def test_check_reachable_local_is_silent(tmp_path):
    storage.check_reachable(str(tmp_path / "new"))


@pytest.mark.integration
def test_s3_helpers_against_moto(s3_server, aws_secret_key):
    base = storage.join(s3_server, "storage-test")
    storage.check_reachable(base)
    storage.write_bytes(storage.join(base, "dir", "x.txt"), b"hello")
    assert storage.exists(storage.join(base, "dir", "x.txt"))
    assert storage.read_bytes(storage.join(base, "dir", "x.txt")) == b"hello"
    assert storage.list_dir(storage.join(base, "dir")) == ["x.txt"]  # no temp object left
    fs, path = storage.fsspec_filesystem(storage.join(base, "dir", "x.txt"))
    assert fs.cat_file(path) == b"hello"
    storage.delete(storage.join(base, "dir"))
    assert storage.list_dir(base) == []
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as err:
        storage.check_reachable("s3://no-such-bucket/x")
    assert aws_secret_key not in str(err.value)
