"""Tools the fault tests share: an S3 server that can be cut off, CLI runs in their own process group,
and scanners that look for secrets in every file a run wrote.

    with MotoServer(tmp_path) as moto, S3Gate(moto.port) as gate:  # clients talk to gate.endpoint
        gate.cut_on(rb"PUT /bucket/[^ ]*part-00002")             # refuse connections from that request on
        ...
        gate.restore()                                           # same port, same objects behind it

The gate is a TCP forwarder in front of a moto server: "cut" closes its listener and every open
connection (clients see a refused or reset connection, as with a stopped server), "restore" listens
on the same port again, and the objects written before the cut are still there. A request handler
can also hold a request (a slow network) or drop one connection.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "ACOL",
    "FAKE_ACCESS_KEY",
    "FAKE_SECRET_KEY",
    "MotoServer",
    "S3Gate",
    "cli_env",
    "driver_tracebacks",
    "free_port",
    "kill_group",
    "listening_sockets",
    "readable_forms",
    "s3_env",
]

VENV_BIN = Path(sys.executable).parent
ACOL = str(VENV_BIN / "acol")
# The session's fake keys (tests/conftest.py); repeated so that this module imports without it.
FAKE_ACCESS_KEY = "AKIAACOLFLOWTESTKEY0"
FAKE_SECRET_KEY = "acolflow-FAKE-secret-7Qx9Zt2Lm4Vb8Np1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# --------------------------------------------------------------------------- S3


class MotoServer:
    """A moto S3 server of the test's own (never the session's), with one bucket."""

    def __init__(self, log_dir: Path, bucket: str = "faults") -> None:
        self.port = free_port()
        self.bucket = bucket
        self._log = open(log_dir / f"moto-{self.port}.log", "wb")  # noqa: SIM115
        binary = shutil.which("moto_server", path=str(VENV_BIN)) or "moto_server"
        self.proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self._log, stderr=self._log
        )

    def __enter__(self) -> MotoServer:
        _wait_for_port(self.port, self.proc)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region="us-east-1",
            access_key=FAKE_ACCESS_KEY,
            secret_key=FAKE_SECRET_KEY,
            allow_bucket_creation=True,
        ).create_dir(self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class S3Gate:
    """A TCP forwarder in front of ``target_port`` that a test can cut and restore (same port).

    ``on_request(handler)``: every chunk a client sends goes through ``handler(data)`` first, which
    answers ``"pass"`` (forward it), ``"drop"`` (reset this connection, forward nothing) or ``"cut"``
    (forward nothing; the gate stops listening and resets every connection, until ``restore``). The
    handler may block: that holds the client's request, as a slow network would.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cuts = 0
        self._handler: Callable[[bytes], str] | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def __enter__(self) -> S3Gate:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def on_request(self, handler: Callable[[bytes], str] | None) -> None:
        self._handler = handler

    def cut_on(self, pattern: bytes) -> None:
        """Cut at the first client request whose bytes match ``pattern`` (it is not forwarded)."""
        regex, done = re.compile(pattern), []

        def handler(data: bytes) -> str:
            if done or not regex.search(data):
                return "pass"
            done.append(data)
            return "cut"

        self.on_request(handler)

    def restore(self) -> None:
        """Listen on the gate's port (again)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection: the server is gone for the clients."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is None:
            return
        self.cuts += 1
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in conns:
            _reset(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = {client: upstream, upstream: client}
        try:
            while True:
                ready, _, _ = select.select(list(pair), [], [], 1.0)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client and self._handler is not None:
                        action = self._handler(data)
                        if action == "cut":
                            self.cut()
                        if action != "pass":
                            _reset(client)
                            return
                    pair[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._conns.difference_update(pair)


def _reset(sock: socket.socket) -> None:
    """Close with RST, not FIN: a client mid-request sees a reset connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


def s3_env(endpoint: str) -> dict[str, str]:
    """The AWS variables a client of ``endpoint`` runs with (fake keys; no developer config)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def cli_env(home: Path, **extra: str) -> Iterator[dict[str, str]]:
    """Environment for ``acol`` subprocesses: own HOME and short Ray temp dir, no inherited RAY_/AWS_.

    RAY_AUTH_TOKEN is kept: the CLI's local Ray runs with the session's token (a subprocess may use it).
    """
    ray_tmp = tempfile.mkdtemp(prefix="af", dir="/tmp")  # Ray's socket paths must stay < 107 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "PREFECT_"))}
    if "RAY_AUTH_TOKEN" in os.environ:
        env["RAY_AUTH_TOKEN"] = os.environ["RAY_AUTH_TOKEN"]
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    try:
        yield env
    finally:
        for _ in range(10):  # Ray workers may still write logs for a moment after their driver exited
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if not os.path.exists(ray_tmp):
                break
            time.sleep(0.3)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process started with ``start_new_session=True`` and everything in its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (Ray's raylet, workers)


def driver_tracebacks(stderr: str) -> list[str]:
    """Python tracebacks printed by the driver itself (not the worker logs Ray forwards, "(pid=…) …")."""
    return [line for line in stderr.splitlines() if line.startswith("Traceback")]


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(link[8:-1])
    return out


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def listening_sockets(pgid: int) -> dict[str, str]:
    """``{listening TCP address: command}`` of every process in a process group (from /proc)."""
    owners: dict[str, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) != pgid:
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except (OSError, ProcessLookupError):
            continue
        for inode in _socket_inodes(pid):
            owners[inode] = command
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in owners:  # 0A: LISTEN
                    found[_address(parts[1])] = owners[parts[9]]
    return found


# --------------------------------------------------------------------------- scanning outputs


def readable_forms(name: str, data: bytes) -> Iterator[bytes]:
    """The bytes of a file and what a reader would decode from them (gzip, Parquet values/metadata)."""
    yield data
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            yield gzip.decompress(data)
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        metadata = pq.read_metadata(io.BytesIO(data)).metadata or {}
        yield repr(metadata).encode()
        yield repr(table.to_pylist()).encode()
