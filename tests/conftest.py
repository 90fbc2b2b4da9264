"""Shared fixtures: a real local S3 (moto server) for the tests that read and write s3:// URIs, and a
local Ray per test module."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Distinctive so that a grep over written files can tell a leak from a coincidence.
FAKE_ACCESS_KEY = "AKIAACOLFLOWTESTKEY0"
FAKE_SECRET_KEY = "acolflow-FAKE-secret-7Qx9Zt2Lm4Vb8Np1"
TEST_BUCKET = "acol-test"


def pytest_configure(config: pytest.Config) -> None:
    """One Ray auth token for every local Ray this test process starts.

    Ray reads the token once per process and keeps it: a second local Ray started in the same process
    with another token fails with ``AuthenticationError: InvalidAuthToken``. Setting it here, before any
    test starts Ray, also keeps Ray from writing ``~/.ray/auth_token``. Subprocesses inherit it.
    """
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def _moto_server_binary() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("moto_server", path=venv_bin) or shutil.which("moto_server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="session")
def aws_secret_key() -> str:
    """The fake secret the S3 fixture puts in the environment (for leak checks)."""
    return FAKE_SECRET_KEY


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server for the session; yields ``s3://acol-test`` with the AWS environment set.

    AWS_ENDPOINT_URL, the fake credentials and the region stay set until the session ends; tests use
    their own prefix under the bucket.
    """
    binary = _moto_server_binary()
    if binary is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto_server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    env = pytest.MonkeyPatch()
    try:
        _wait_for_port(port, proc)
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        # Keep a developer's own AWS config out of the tests.
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
            env.delenv(name, raising=False)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        ).create_dir(TEST_BUCKET)
        yield f"s3://{TEST_BUCKET}"
    finally:
        env.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def local_ray(s3_server: str) -> Iterator[None]:
    """A local 2-CPU Ray for one test module, started after the S3 environment (its workers inherit it).

    Module scope on purpose: modules that start their own Ray head or fault-inject expect a fresh
    cluster. Token auth stays on (the session's token, ``pytest_configure``); the temp dir is short
    because Ray's socket paths must stay under 107 characters.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="acr", dir="/tmp")
    env = pytest.MonkeyPatch()
    env.delenv("RAY_AUTH_MODE", raising=False)
    env.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False
        )
        yield
    finally:
        ray.shutdown()
        env.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)
