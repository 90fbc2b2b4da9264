"""Hyper-parameter sweeps without Ray: the search space (``space``) and the results (``results``).

The Tune driver that runs the trials is ``acol_core.jobs.sweep``.
"""

from __future__ import annotations

__all__: list[str] = []
