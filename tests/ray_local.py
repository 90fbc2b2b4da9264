"""Helpers for tests that run Ray steps: a thread with a deadline, so a hung Ray step fails instead of
hanging the suite (Ray Data + Train on 2 CPUs can stall silently: ../shared/STACK.md)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["with_timeout"]


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
