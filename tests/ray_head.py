"""A real Ray head for integration tests: token auth on, own HOME and temp dir, free ports.

    with ray_head(num_cpus=2) as head:
        subprocess.run([RAY, "job", "submit", "--address", head.dashboard, ...], env=head.env)
        status, body = head.get("/api/jobs/")

The head runs from the project's venv (so a job's ``acol`` and ``python`` are ours). Its auth token is
generated into its own ``$HOME/.ray`` (the user's is never touched). It is stopped by its process group,
never with ``ray stop`` (that kills every Ray on the host, other test sessions' included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RAY", "Head", "Node", "free_port", "ray_head", "ray_node", "stop_process_group"]

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this process: the OS may return a port it just gave us
    (nothing listens on it yet), and two of a head's components on one port fail `ray start`."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # what clients of this head run with (HOME with the token, auth mode, PATH)
    token: str
    gcs: str = ""  # <ip>:<port> of the GCS, what `ray start --address` and drivers take

    def get(self, path: str, token: str | None = "") -> tuple[int, bytes]:
        """GET ``path`` on the dashboard with this head's token (``token=None``: without one)."""
        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{self.dashboard}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""


def stop_process_group(pgid: int, grace_s: float = 4.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
        if not [s for s in alive.split() if not s.startswith("Z")]:
            return
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def ray_head(
    num_cpus: int = 2,
    start_timeout_s: float = 120.0,
    resources: dict[str, float] | None = None,
    node_ip: str | None = None,
    extra_env: dict[str, str] | None = None,
    system_config: dict[str, object] | None = None,
) -> Iterator[Head]:
    """Start a head (``ray start --head``), yield it, stop its process group.

    Args:
        resources: custom resources of the head node (tests force placement with them).
        node_ip: the address the node announces (127.0.0.1 for clusters of several nodes on this host).
        extra_env: environment of the head's processes (and so of its jobs and workers) on top of the
            cleaned one: e.g. the S3 settings a real cluster's nodes get from their instance profile.
        system_config: Ray's internal settings for the cluster (e.g. faster node-death detection).
    """
    # Short paths: Ray's socket paths under the temp dir must stay below 107 characters.
    home = tempfile.mkdtemp(prefix="arh", dir="/tmp")
    tmp = tempfile.mkdtemp(prefix="art", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        HOME=home,
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        # Ray processes that look for "their" cluster without an address (Ray Train's placement-group
        # cleaner does) read $RAY_TMPDIR/ray/ray_current_cluster, which `ray start --temp-dir` writes.
        RAY_TMPDIR=tmp,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra_env or {})
    # With RAY_AUTH_MODE=token, `ray start` wants the token to exist: generate it into $HOME/.ray.
    subprocess.run(
        [str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60
    )
    token = (Path(home) / ".ray" / "auth_token").read_text().strip()
    dashboard_port = free_port()
    gcs_port = free_port()
    command = [str(RAY), "start", "--head", "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus)]
    command += ["--temp-dir", os.path.join(tmp, "ray"), "--disable-usage-stats"]
    if resources:
        command += ["--resources", json.dumps(resources)]
    if node_ip:
        command += ["--node-ip-address", node_ip]
    if system_config:
        command += ["--system-config", json.dumps(system_config)]
    ports = {
        "--port": gcs_port,
        "--dashboard-port": dashboard_port,
        # Defaults are fixed ports (52365, 10001) that another head on this host may hold.
        "--dashboard-agent-listen-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    for flag, port in ports.items():
        command += [flag, str(port)]
    # A new session: every process of this head (GCS, raylet, dashboard, workers) shares its group id.
    start = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = start.communicate(timeout=start_timeout_s)
        if start.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{output[-3000:]}")
        found = re.search(r"Local node IP: (\S+)", output)
        gcs = f"{node_ip or (found.group(1) if found else '127.0.0.1')}:{gcs_port}"
        yield Head(f"http://127.0.0.1:{dashboard_port}", env, token, gcs)
    finally:
        if start.poll() is None:
            start.kill()
        stop_process_group(start.pid)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Node:
    """A second Ray node on this host, in its own process group (raylet, its agents and workers)."""

    pgid: int
    resources: dict[str, float]

    def kill(self) -> None:
        """SIGKILL every process of the node at once: the node is lost as a machine is (no cleanup)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)


@contextlib.contextmanager
def ray_node(
    head: Head, num_cpus: int = 2, resources: dict[str, float] | None = None, start_timeout_s: float = 120.0
) -> Iterator[Node]:
    """Join a worker node to ``head`` (``ray start --address``) with its own ports; stop it afterwards.

    It runs with the head's environment (token, temp dir, S3 settings), as nodes of one cluster do.
    """
    node_ip = head.gcs.rsplit(":", 1)[0]
    command = [str(RAY), "start", "--address", head.gcs, "--num-cpus", str(num_cpus)]
    command += ["--node-ip-address", node_ip, "--disable-usage-stats"]
    if resources:
        command += ["--resources", json.dumps(resources)]
    # Fixed defaults (52365, ...) are held by the head's node already.
    ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
    for flag in (*ports, "--runtime-env-agent-port"):
        command += [flag, str(free_port())]
    start = subprocess.Popen(
        command,
        env=head.env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = start.communicate(timeout=start_timeout_s)
        if start.returncode != 0:
            raise RuntimeError(f"ray start (worker node) failed:\n{output[-3000:]}")
        yield Node(start.pid, dict(resources or {}))
    finally:
        if start.poll() is None:
            start.kill()
        stop_process_group(start.pid)
