"""The Ray adapters (Train run, Tune sweep, Ray Data batch localization): the only code that imports Ray.

Shared helpers live here; Ray is imported inside them, so importing this package does not start or
import Ray.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["parquet_reader_v1", "ray_init", "ray_logs_dir"]


def ray_init(dashboard: bool = False) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, else start a local Ray in this process (once).

    A Ray already initialised by the caller (tests, notebooks) is used as it is.

    Args:
        dashboard: start the local Ray with its dashboard (on 127.0.0.1, a free port). Sweeps need it:
            Ray Train's placement-group cleaner, which frees the CPUs of a trial Tune stopped, queries
            the state API that the dashboard serves.
    """
    import ray

    from acol_core.console import quiet, reroute_logs

    if ray.is_initialized():
        return
    try:
        _init(ray, dashboard, to_driver=not quiet())
    finally:
        import ray.data  # noqa: F401 - its loggers exist from here on, and go where ours go

        reroute_logs()


def _init(ray: Any, dashboard: bool, to_driver: bool) -> None:
    # Quiet (``console.quiet_logs``): workers' output stays in Ray's session logs, not this terminal.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=to_driver)
        return
    if not dashboard:
        # address="local": a new Ray, never some other Ray found on the host. No dashboard, so the demo
        # and tests need no free ports beyond Ray's own. Workers inherit this process's environment
        # (AWS_* for s3:// URIs included).
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=to_driver)
        return
    # With the dashboard, the GCS address is chosen here and put in the environment the Ray processes
    # inherit: without one, a Ray process looks for "the" Ray on the host and fails when several run.
    # This process's own environment is left as it was.
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=0,
            configure_logging=False,
            log_to_driver=to_driver,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def parquet_reader_v1() -> Iterator[None]:
    """Build ``read_parquet`` datasets with Ray Data's V1 Parquet datasource.

    Ray 2.60's default (V2) reader starts a pool of ``FooterReader`` actors on every execution, seconds
    per run on a small machine; V1 reads the same shards in a fraction of that. The flag is read when the
    dataset is built, so it is restored right after and other Ray Data users keep the default.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def ray_logs_dir() -> str | None:
    """This Ray session's log folder (where workers' output goes when quiet), if Ray runs here."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return str(ray._private.worker.global_worker.node.get_logs_dir_path())  # noqa: SLF001
    except AttributeError:
        return None
