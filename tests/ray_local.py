"""Helpers for tests that run Ray steps: a thread with a deadline, so a hung Ray step fails instead of
hanging the suite (Ray Data + Train on 2 CPUs can stall silently: ../shared/STACK.md)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from acol_core.faults import TEST_FAULT_ENV

__all__ = ["injected_fault", "with_timeout"]


@contextlib.contextmanager
def injected_fault(kind: str, spec: dict[str, Any]) -> Iterator[None]:
    """Set ``ACOL_TEST_FAULT`` (``acol_core.faults``) to ``{kind: spec}`` for the block, then restore it.

    A context manager rather than ``monkeypatch``: module-scoped fixtures inject faults too.
    """
    saved = os.environ.get(TEST_FAULT_ENV)
    os.environ[TEST_FAULT_ENV] = json.dumps({kind: spec})
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TEST_FAULT_ENV, None)
        else:
            os.environ[TEST_FAULT_ENV] = saved


def with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """Run ``fn`` in a thread; fail (not hang) when it takes longer than ``seconds``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"Ray step did not finish within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# A line Ray forwards from an actor or task's log to the driver's stderr: "(Name pid=N) ...", maybe coloured.
RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")


def command_lines(stderr: str) -> list[str]:
    """A command's own non-blank stderr lines, without what an in-process Ray forwarded meanwhile (a CliRunner
    captures the process's stderr, where the module's Ray prints its actors' logs, e.g. a finished run's
    placement-group cleaner)."""
    return [line for line in stderr.splitlines() if line.strip() and not RAY_LOG_LINE.match(line)]
