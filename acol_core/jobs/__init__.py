"""The Ray adapters (Train run, Tune sweep, Ray Data batch localization): the only code that imports Ray.

Shared helpers live here; Ray is imported inside them, so importing this package does not start or
import Ray.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["parquet_reader_v1", "ray_init"]


def ray_init() -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, else start a local Ray in this process (once).

    A Ray already initialised by the caller (tests, notebooks) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # address="local": a new Ray, never some other Ray found on the host. No dashboard, so the demo
        # and tests need no free ports beyond Ray's own. Workers inherit this process's environment
        # (AWS_* for s3:// URIs included).
        ray.init(address="local", include_dashboard=False, configure_logging=False)


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
