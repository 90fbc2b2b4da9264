"""TEST ONLY: fault injection through one environment variable, never through a public parameter.

Tests set ``ACOL_TEST_FAULT`` to a JSON object; nothing else does. The job modules forward it to their
Ray processes (``fault_env``), where the code that dies reads it (``injected_fault``):

- ``{"train": {"rank", "epoch", "after_batches", "marker"}}``: that Ray Train rank SIGKILLs itself in
  that epoch after that many batches, unless the marker file exists (it creates the marker first, so
  the restarted attempt runs through). Needs storage every worker can see.
- ``{"localize": {"image_id", "times", "marker_dir"}}``: a ``Localizer`` SIGKILLs its process (no
  cleanup, like an OOM kill) when a batch holds that row, at most ``times`` times in all (counted as
  files in ``marker_dir``, a folder every actor can see).

Example (a test)::

    monkeypatch.setenv(TEST_FAULT_ENV, json.dumps({"localize": {"image_id": "s1-3", "times": 1,
                                                                 "marker_dir": str(tmp_path)}}))
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TEST_FAULT_ENV", "fault_env", "injected_fault", "kill_after_batches"]

TEST_FAULT_ENV = "ACOL_TEST_FAULT"
_KILL_DELAY_S = 3.0


def injected_fault(kind: str) -> dict[str, Any] | None:
    """The ``kind`` (``train`` or ``localize``) entry of ``ACOL_TEST_FAULT``; None when unset."""
    raw = os.environ.get(TEST_FAULT_ENV)
    if not raw:
        return None
    value = json.loads(raw).get(kind)
    return dict(value) if value else None


def fault_env() -> dict[str, str]:
    """``{ACOL_TEST_FAULT: value}`` when this process has it (for a Ray runtime env), else ``{}``."""
    raw = os.environ.get(TEST_FAULT_ENV)
    return {TEST_FAULT_ENV: raw} if raw else {}


def kill_after_batches(batches: Iterable[dict], fault: dict[str, Any]) -> Iterator[dict]:
    """``batches``, but this process dies by SIGKILL (no cleanup, like an OOM kill) after the ``train``
    fault's ``after_batches`` batches, once: unless its ``marker`` file exists."""
    marker = Path(fault["marker"])
    for index, batch in enumerate(batches):
        if index == int(fault["after_batches"]) and not marker.exists():
            marker.touch()  # first: the restarted attempt must run through
            # A crash mid-epoch, not at its start: Train V2's controller collects reports by polling,
            # and a worker killed within a moment of its last report (an epoch start with no wait
            # for data) can take that report with it; the run then redoes the epoch.
            time.sleep(_KILL_DELAY_S)
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch
