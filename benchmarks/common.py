"""Timing helpers shared by the ratio benchmarks: warm-up, interleaved repeats, medians, peak RSS.

Every figure the harness reports is a ratio of two things measured in the same run. `compare` alternates
the two sides (A, B, A, B, ...) after warm-up, so that a change in the machine's load during the run
weighs on both sides alike instead of on whichever ran second.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Comparison",
    "GpuUtilisation",
    "compare",
    "environment",
    "median_time",
    "peak_rss_of",
    "process_tree",
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


def _proc_status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The ``/proc/<pid>/status`` fields ``keys`` in KiB; empty once the process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (one scan of ``/proc/*/stat`` for the parent links)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # exited between listdir and read
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _pss_kib(pid: int) -> tuple[int, int, int]:
    """(PSS, its shared-memory part ``Pss_Shmem``, its file-backed part ``Pss_File``) in KiB; shared pages
    are divided among their mappers."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0, 0
    fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()[1:] if ln.count(" ") >= 1}
    return fields.get("Pss", 0), fields.get("Pss_Shmem", 0), fields.get("Pss_File", 0)


def _process_name(pid: int) -> str:
    """A short label for ``pid``: its command line (Ray workers set theirs to ``ray::<task or actor>``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = raw.replace(b"\0", b" ").decode(errors="replace").split()
    # A Python process: its module or script, not the interpreter's path.
    if words and Path(words[0]).name.startswith("python"):
        words = [w for w in words[1:] if w != "-m"] or words
    return " ".join(words)[:60]


@dataclass
class _TreePeak:
    """Running maxima over samples of one process tree (KiB), and a coarse timeline (MiB)."""

    root_hwm: int = 0
    tree_rss: int = 0
    tree_anon: int = 0
    tree_pss: int = 0
    tree_pss_shmem: int = 0
    tree_pss_non_shmem: int = 0
    tree_procs: int = 0
    samples: int = 0
    timeline: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # pid -> [largest PSS less shared memory (KiB), its file-backed part then, the label it had then].
    per_process: dict[int, list] = field(default_factory=dict)

    def top_processes(self, count: int = 12) -> list[dict[str, Any]]:
        """The ``count`` processes with the largest own memory (PSS less shared memory) at their peak."""
        ranked = sorted(self.per_process.items(), key=lambda kv: -kv[1][0])[:count]
        return [
            {
                "pid": pid,
                "name": name,
                "peak_own_mib": round(kib / 1024, 1),
                "file_mib": round(file / 1024, 1),
            }
            for pid, (kib, file, name) in ranked
        ]

    def sample(self, root: int, elapsed_s: float, with_pss: bool) -> None:
        rss = anon = pss = shmem = file = procs = 0
        for pid in process_tree(root):
            fields = _proc_status_kib(pid, ("VmHWM", "VmRSS", "RssAnon"))
            if pid == root:
                self.root_hwm = max(self.root_hwm, fields.get("VmHWM", 0))
            if "VmRSS" not in fields:
                continue  # gone, or a zombie
            rss += fields["VmRSS"]
            anon += fields.get("RssAnon", 0)
            procs += 1
            if with_pss:  # smaps_rollup walks the page tables (~1 ms for a large process): now and then
                pid_pss, pid_shmem, pid_file = _pss_kib(pid)
                pss, shmem, file = pss + pid_pss, shmem + pid_shmem, file + pid_file
                own = self.per_process.setdefault(pid, [0, 0, ""])
                if pid_pss - pid_shmem > own[0] or not own[2]:
                    own[:] = [max(own[0], pid_pss - pid_shmem), pid_file, _process_name(pid)]
        self.tree_rss, self.tree_anon = max(self.tree_rss, rss), max(self.tree_anon, anon)
        self.tree_procs = max(self.tree_procs, procs)
        self.samples += 1
        if with_pss and procs:
            self.tree_pss, self.tree_pss_shmem = max(self.tree_pss, pss), max(self.tree_pss_shmem, shmem)
            self.tree_pss_non_shmem = max(self.tree_pss_non_shmem, pss - shmem)
            self.timeline.append(
                (round(elapsed_s, 2), *(round(v / 1024, 1) for v in (rss, pss, shmem, file)))
            )


def peak_rss_of(
    cmd: Sequence[str],
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    interval_s: float = 0.05,
    pss_interval_s: float = 0.5,
) -> dict[str, Any]:
    """Run ``cmd`` as a child; its exit code, wall seconds and peak memory (MiB) of it and its process tree.

    Returns ``returncode``, ``timed_out``, ``wall_s``, and
    - ``peak_rss_mib``: the child's own high-water mark (``VmHWM``; the child's memory after exec);
    - ``tree_peak_rss_mib``: the largest sum of ``VmRSS`` over the child and all its live descendants
      at one sample (Ray's GCS, raylet and worker processes count). A shared page counts once per
      process that maps it (Ray's object store is shared memory), so this overstates the tree's use;
    - ``tree_peak_anon_mib``: the same for ``RssAnon`` (private anonymous memory, no shared pages);
    - ``tree_peak_pss_mib``: the same for PSS (each shared page divided among its mappers: the
      tree's actual share of RAM), sampled every ``pss_interval_s`` only (reading it costs ~1 ms a
      process); ``tree_peak_pss_shmem_mib``: the largest shared-memory part of it (Ray's object
      store lives there), ``tree_peak_pss_non_shmem_mib``: the largest PSS less that part (the
      processes' own memory); ``timeline``: ``[seconds, RSS, PSS, PSS shmem, PSS file]`` (MiB) at those
      samples (the file-backed part: libraries' code, and files mapped as memory);
      ``top_processes``: the processes whose own memory (PSS less shared memory) peaked highest, each
      with its pid, command line (``ray::...`` for Ray's workers) and that peak;
    - ``tree_max_processes``, ``samples``, ``stdout``, ``stderr``.
    The tree is sampled every ``interval_s`` while the child runs, so a peak shorter than that can be
    missed by the tree figures (``VmHWM`` misses nothing but the last interval). ``wait4``'s
    ``ru_maxrss`` is not used: Linux carries it over fork + exec, so the child of a large parent
    reports the parent's high-water mark.
    """
    if not Path("/proc/self/status").exists():
        raise OSError("peak_rss_of needs Linux /proc")
    # Output goes to files, not pipes: a child filling a pipe nobody reads would block until the timeout.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.perf_counter()
        # Its own session, so that a timeout can end the whole tree it started (by its process group).
        proc = subprocess.Popen(list(cmd), stdout=out_f, stderr=err_f, env=env, start_new_session=True)
        peak = _TreePeak()
        timed_out = False
        next_pss = start
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                peak.sample(proc.pid, now - start, with_pss=now >= next_pss)
                if now >= next_pss:
                    next_pss = now + pss_interval_s
                if now - start > timeout_s:
                    timed_out = True
                    break
                time.sleep(interval_s)
        finally:
            if proc.poll() is None:  # timed out, or this process was interrupted (Ctrl-C)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.perf_counter() - start
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "peak_rss_mib": peak.root_hwm / 1024,
        "tree_peak_rss_mib": peak.tree_rss / 1024,
        "tree_peak_anon_mib": peak.tree_anon / 1024,
        "tree_peak_pss_mib": peak.tree_pss / 1024,
        "tree_peak_pss_shmem_mib": peak.tree_pss_shmem / 1024,
        "tree_peak_pss_non_shmem_mib": peak.tree_pss_non_shmem / 1024,
        "tree_max_processes": peak.tree_procs,
        "samples": peak.samples,
        "timeline": peak.timeline,
        "top_processes": peak.top_processes(),
        "stdout": out,
        "stderr": err,
    }


Reading = tuple[float | None, float | None]  # (utilisation %, memory used MiB)


def _nvidia_smi(index: int) -> Reading | None:
    try:
        done = subprocess.run(
            [
                "nvidia-smi",
                f"--id={index}",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        util, used = done.stdout.strip().splitlines()[0].split(",")
        return (float(util), float(used)) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _gpu_reader() -> tuple[Callable[[], Reading | None], str] | None:
    """A reader of the GPU's (utilisation %, memory used MiB) and its source's name; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    # Device-wide, so Ray's worker processes count: nvidia-smi, else NVML through torch (utilisation only).
    if _nvidia_smi(index) is not None:
        return (lambda: _nvidia_smi(index)), "nvidia-smi"
    try:
        torch.cuda.utilization(index)  # needs the NVML bindings (nvidia-ml-py)
    except Exception:  # noqa: BLE001 - neither source: nothing to record
        return None
    return (lambda: (float(torch.cuda.utilization(index)), None)), "torch.cuda.utilization (NVML)"


class GpuUtilisation:
    """Samples the GPU's utilisation (% of time a kernel ran) and memory in use while the ``with`` body runs.

    ``result()``: ``{"mean_pct", "max_pct", "max_memory_used_mib", "samples", "source"}`` (device-wide:
    other processes' kernels count too), or None on a machine without CUDA (or without nvidia-smi and
    NVML). Examples::

        with GpuUtilisation() as gpu:
            step()
        gpu.result()
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.values: list[float] = []
        self.memory: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuUtilisation:
        reader = _gpu_reader()
        if reader is not None:
            read, self.source = reader
            self._thread = threading.Thread(target=self._run, args=(read,), daemon=True)
            self._thread.start()
        return self

    def _run(self, read: Callable[[], Reading | None]) -> None:
        while not self._stop.wait(self.interval_s):
            util, used = read() or (None, None)
            if util is not None:
                self.values.append(util)
            if used is not None:
                self.memory.append(used)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, Any] | None:
        if self.source is None:
            return None
        values = self.values or [math.nan]
        return {
            "mean_pct": statistics.fmean(values),
            "max_pct": max(values),
            "max_memory_used_mib": max(self.memory) if self.memory else None,
            "samples": len(self.values),
            "source": self.source,
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
