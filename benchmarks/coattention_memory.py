"""Peak memory and time of co-attention, forward + backward: naive (builds the HW×HW affinity) vs the rest.

Run::

    python -m benchmarks.coattention_memory                      # 28², 56², 112² maps; CUDA if available
    python -m benchmarks.coattention_memory --sizes 28 56 --channels 512 --repeats 5 --device cpu

From code (what `make bench` calls): ``rows = run(sizes=(28, 56, 112))``; ``print(format_table(rows))``.

Implementations (both directions of a pair, as ``coattention_naive`` returns them):
- ``naive``: ``coattention_naive``, the reference that builds the affinity P whole;
- ``sdpa``: ``coattention_efficient``, always through ``scaled_dot_product_attention`` (P never whole);
- ``auto``: what the models run, ``attend`` with its default path: P whole while the batch's P fits
  ``AFFINITY_BUDGET_BYTES``, SDPA beyond (so at a small map ``auto`` is ``naive``'s arithmetic).

Memory: each case (implementation × map size) runs in a fresh Python process, so that neither
allocator caches nor an earlier case's high-water mark leak into the next one. The case builds both
images' features (`batch`×`channels`×size×size) and W_P and runs one forward + ``backward()`` of the
sum of the outputs, after one step on 2×2 maps that pays the process's one-time set-up. Peak memory is
the extra memory of that step over what the inputs already hold:
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the step (exact for tensors; excludes the CUDA context and cuBLAS workspaces).
- CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus the resident set before it. It counts every
  touched page, torch's or a library's (oneDNN scratch included), at page granularity; ``tracemalloc``
  does not see torch's allocator and the profiler reports per-op totals, not a peak. Where ``/proc`` is
  missing the column falls back to the ``ru_maxrss`` delta, which can only under-report.
Time: one more fresh process per map size times the three implementations alternately (naive, sdpa,
auto, naive, ...) on the same inputs, after one untimed round; median of `repeats` rounds, at least
``MIN_TIMED_S`` of rounds (small maps get more), synchronised on CUDA. Alternating keeps a change in the
machine's load from landing on one implementation only.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["IMPLEMENTATIONS", "format_table", "measure_case", "run", "time_size"]

IMPLEMENTATIONS = ("naive", "sdpa", "auto")
MIB = 2**20
MIN_TIMED_S = 2.0
MAX_ROUNDS = 40


def _proc_memory_kib() -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in KiB, or None where /proc is not available."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    hwm = re.search(r"VmHWM:\s+(\d+)", status)
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    return (int(hwm.group(1)), int(rss.group(1))) if hwm and rss else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak-RSS counter (Linux >= 4.0)
    except OSError:
        return False
    return _proc_memory_kib() is not None


def _functions() -> dict[str, Any]:
    from acol_core.models.coattention import attend

    return {
        "naive": partial(attend, path="materialised"),
        "sdpa": partial(attend, path="sdpa"),
        "auto": attend,
    }


def _inputs(size: int, channels: int, batch: int, device: Any, seed: int) -> tuple[Any, Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    f_m = torch.randn(batch, channels, size, size, generator=gen).to(device).requires_grad_(True)
    f_n = torch.randn(batch, channels, size, size, generator=gen).to(device).requires_grad_(True)
    weight = (torch.randn(channels, channels, generator=gen) / channels**0.5).to(device).requires_grad_(True)
    return f_m, f_n, weight


def _step(fn: Any, f_m: Any, f_n: Any, weight: Any) -> None:
    fn(f_m, f_n, weight).sum().backward()
    f_m.grad = f_n.grad = weight.grad = None


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_case(
    impl: str,
    size: int,
    channels: int,
    batch: int,
    device: str,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Peak memory of one forward + backward of ``impl`` (meant for a fresh process; `run` starts one)."""
    import torch

    from acol_core.models.coattention import attention_path

    if threads:
        torch.set_num_threads(threads)
    fn = _functions()[impl]
    dev = torch.device(device)
    f_m, f_n, weight = _inputs(size, channels, batch, dev, seed)
    # One-time set-up (kernel code pages, thread pools, library scratch) is not the step's memory.
    tiny = [t[:, :, :2, :2].detach().requires_grad_(True) for t in (f_m, f_n)]
    _step(fn, *tiny, weight)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        _step(fn, f_m, f_n, weight)
        _sync(dev)
        peak, method = torch.cuda.max_memory_allocated(dev) - before, "cuda max_memory_allocated"
    elif _reset_hwm():
        before = _proc_memory_kib()[1]
        _step(fn, f_m, f_n, weight)
        peak, method = (_proc_memory_kib()[0] - before) * 1024, "rss high-water mark"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _step(fn, f_m, f_n, weight)
        peak, method = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss delta"
    positions = size * size
    return {
        "impl": impl,
        "size": size,
        "positions": positions,
        "channels": channels,
        "batch": batch,
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "affinity_mib": batch * positions**2 * 4 / MIB,  # one float32 P for the batch
        "path": attention_path(batch, positions, positions, f_m.element_size()) if impl == "auto" else impl,
        "peak_mib": max(peak, 0) / MIB,
        "memory_method": method,
    }


def time_size(
    size: int,
    channels: int,
    batch: int,
    repeats: int,
    device: str,
    threads: int | None = None,
    seed: int = 0,
    min_time_s: float = MIN_TIMED_S,
) -> dict[str, Any]:
    """Median ms of forward + backward per implementation, the implementations timed alternately."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    fns = _functions()
    dev = torch.device(device)
    inputs = _inputs(size, channels, batch, dev, seed)
    for fn in fns.values():  # warm-up round
        _step(fn, *inputs)
    _sync(dev)
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_time_s and rounds < MAX_ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            _step(fn, *inputs)
            _sync(dev)
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {
        "size": size,
        "rounds": rounds,
        "time_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
    }


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _worker(kind: str, case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one ``--worker`` in a fresh process; its JSON line, or ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "benchmarks.coattention_memory", "--worker", json.dumps([kind, case])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1])


def run(
    sizes: tuple[int, ...] = (28, 56, 112),
    channels: int = 128,
    batch: int = 1,
    repeats: int = 3,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float = 900.0,
    min_time_s: float = MIN_TIMED_S,
) -> list[dict[str, Any]]:
    """One row per (size, implementation): peak MiB and median ms; failed parts carry "error".

    Args:
        sizes: feature-map sides (28 = vgg16 at 224 input, 56 and 112 = larger inputs / finer strides).
        channels: feature channels D (the head width).
        batch: image pairs per step.
        repeats: least number of timed rounds (median reported); more until ``min_time_s`` is spent.
        device: "cuda" or "cpu"; CUDA when available if None.
        threads: CPU threads per case (torch's default if None).
    """
    device = device or _default_device()
    rows = []
    for size in sizes:
        common = {"size": size, "channels": channels, "batch": batch, "device": device, "threads": threads}
        timing = _worker("time", common | {"repeats": repeats, "min_time_s": min_time_s}, timeout_s)
        for impl in IMPLEMENTATIONS:
            row = {"impl": impl, **common, **_worker("memory", common | {"impl": impl}, timeout_s)}
            if "time_ms" in timing:
                row |= {"time_ms": timing["time_ms"][impl], "rounds": timing["rounds"]}
            elif "error" in timing:
                row["error"] = "; ".join(filter(None, (row.get("error"), f"timing: {timing['error']}")))
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, width: int) -> str:
    return f"{row[key]:>{width}.1f}" if key in row else f"{'error':>{width}}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per map size: P's size, then peak MiB and ms of each implementation, and the path auto took."""
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_size.setdefault(row["size"], {})[row["impl"]] = row
    head = (
        f"{'map':>8} {'P MiB':>7} "
        + " ".join(f"{impl + ' MiB':>10}" for impl in IMPLEMENTATIONS)
        + " "
        + " ".join(f"{impl + ' ms':>9}" for impl in IMPLEMENTATIONS)
        + f" {'auto path':>12}"
    )
    lines = [head, "-" * len(head)]
    for size, impls in sorted(by_size.items()):
        p_mib = next((r["affinity_mib"] for r in impls.values() if "affinity_mib" in r), float("nan"))
        mem = " ".join(_cell(impls.get(i, {}), "peak_mib", 10) for i in IMPLEMENTATIONS)
        ms = " ".join(_cell(impls.get(i, {}), "time_ms", 9) for i in IMPLEMENTATIONS)
        path = impls.get("auto", {}).get("path", "?")
        lines.append(f"{f'{size}×{size}':>8} {p_mib:>7.1f} {mem} {ms} {path:>12}")
    first = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    lines.append(
        f"device {first.get('device')}, threads {first.get('threads')}, batch {first.get('batch')}, "
        f"D {first.get('channels')}, memory: {first.get('memory_method')} (fresh process per cell), "
        f"time: median forward+backward, implementations alternated ({first.get('rounds')} rounds)"
    )
    lines += [f"error {r['impl']} {r['size']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="least number of timed rounds")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # [kind, case], in this process (used by run)
    args = parser.parse_args(argv)
    if args.worker:
        kind, case = json.loads(args.worker)
        print(json.dumps((measure_case if kind == "memory" else time_size)(**case)))
        return
    rows = run(tuple(args.sizes), args.channels, args.batch, args.repeats, args.device, args.threads)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
