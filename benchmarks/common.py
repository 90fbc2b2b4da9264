"""Timing helpers shared by the ratio benchmarks: warm-up, interleaved repeats, medians, peak RSS.

Every figure the harness reports is a ratio of two things measured in the same run. `compare` alternates
the two sides (A, B, A, B, ...) after warm-up, so that a change in the machine's load during the run
weighs on both sides alike instead of on whichever ran second.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Comparison",
    "compare",
    "environment",
    "median_time",
    "peak_rss_of",
    "ratio",
]


@dataclass
class Comparison:
    """Median seconds per call of two interleaved callables and their ratio a / b."""

    a_s: float
    b_s: float
    repeats: int

    @property
    def ratio(self) -> float:
        return ratio(self.a_s, self.b_s)


def ratio(num: float, den: float) -> float:
    """num / den, NaN where the denominator is not positive (the smoke test then fails loudly)."""
    return num / den if den > 0 else math.nan


def median_time(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], warmup: int = 1, repeats: int = 5
) -> Comparison:
    """Median seconds of ``fn_a`` and ``fn_b``, timed alternately after ``warmup`` calls of each."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return Comparison(statistics.median(times_a), statistics.median(times_b), repeats)


def peak_rss_of(cmd: Sequence[str], timeout_s: float = 600.0, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` as a child and return its exit code, wall seconds and peak RSS (MiB, ``wait4``).

    ``wait4`` reports the high-water mark of that child alone (grandchildren it waited for count in it
    only if they were its own children: Linux folds a reaped grandchild's peak into ``ru_maxrss`` as a max).
    """
    # Output goes to files, not pipes: a child filling a pipe nobody reads would block until the timeout.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out_f, stderr=err_f, env=env)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "stdout": out,
        "stderr": err,
    }


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if done.returncode == 0 else None


def _cpu_name() -> str | None:
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115 - tiny file, read once
    except OSError:
        return None
    return next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None
    )


def environment() -> dict[str, Any]:
    """Device, threads, CPUs, load average, versions and git commit: what a figure depends on."""
    import torch

    from acol_core.train import select_device

    device = select_device()
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
    }
    return info
