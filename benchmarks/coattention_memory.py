"""Peak memory and time of co-attention, forward + backward: naive (builds the HW×HW affinity) vs efficient.

Run::

    python -m benchmarks.coattention_memory                      # 28², 56², 112² maps; CUDA if available
    python -m benchmarks.coattention_memory --sizes 28 56 --channels 512 --repeats 5 --device cpu

From code (what `make bench` calls): ``rows = run(sizes=(28, 56, 112))``; ``print(format_table(rows))``.

Each case (implementation × map size) runs in a fresh Python process, so that neither allocator caches
nor an earlier case's high-water mark leak into the next one. The case builds both images' features
(`batch`×`channels`×size×size) and W_P, then times ``coattention_naive`` or ``coattention_efficient``
(both directions) plus ``backward()`` of the sum of their outputs, after one step on 2×2 maps that
pays the process's one-time set-up.

Peak memory is the extra memory of one forward + backward over what the inputs already hold:
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the step (exact for tensors; excludes the CUDA context and cuBLAS workspaces).
- CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus the resident set before it. It counts every
  touched page, torch's or a library's (oneDNN scratch included), at page granularity; ``tracemalloc``
  does not see torch's allocator and the profiler reports per-op totals, not a peak. Where ``/proc`` is
  missing the column falls back to the ``ru_maxrss`` delta, which can only under-report.
Time is the median of `repeats` timed steps after one untimed warm-up step (synchronised on CUDA).
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
from pathlib import Path
from typing import Any

__all__ = ["format_table", "measure_case", "run"]

IMPLEMENTATIONS = ("naive", "efficient")
MIB = 2**20


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


def measure_case(
    impl: str,
    size: int,
    channels: int,
    batch: int,
    repeats: int,
    device: str,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure one case in this process (meant for a fresh process; `run` starts one per case)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from acol_core.models import coattention_efficient, coattention_naive

    fn = {"naive": coattention_naive, "efficient": coattention_efficient}[impl]
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    f_m = torch.randn(batch, channels, size, size, generator=gen).to(dev).requires_grad_(True)
    f_n = torch.randn(batch, channels, size, size, generator=gen).to(dev).requires_grad_(True)
    weight = (torch.randn(channels, channels, generator=gen) / channels**0.5).to(dev).requires_grad_(True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(a: torch.Tensor = f_m, b: torch.Tensor = f_n) -> None:
        att_m, att_n = fn(a, b, weight)
        (att_m.sum() + att_n.sum()).backward()
        a.grad = b.grad = weight.grad = None

    # One-time set-up (kernel code pages, thread pools, library scratch) is not the step's memory.
    step(f_m[:, :, :2, :2].detach().requires_grad_(True), f_n[:, :, :2, :2].detach().requires_grad_(True))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        sync()
        peak, method = torch.cuda.max_memory_allocated(dev) - before, "cuda max_memory_allocated"
    elif _reset_hwm():
        before = _proc_memory_kib()[1]
        step()
        peak, method = (_proc_memory_kib()[0] - before) * 1024, "rss high-water mark"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak, method = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "ru_maxrss delta"

    step()  # warm-up (the measured step above already ran once; this one settles caches)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
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
        "peak_mib": max(peak, 0) / MIB,
        "memory_method": method,
        "time_ms": 1000 * statistics.median(times),
        "repeats": repeats,
    }


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(
    sizes: tuple[int, ...] = (28, 56, 112),
    channels: int = 128,
    batch: int = 1,
    repeats: int = 3,
    device: str | None = None,
    threads: int | None = None,
    timeout_s: float = 900.0,
) -> list[dict[str, Any]]:
    """One row per (size, implementation), each measured in a fresh subprocess; failed cases carry "error".

    Args:
        sizes: feature-map sides (28 = vgg16 at 224 input, 56 and 112 = larger inputs / finer strides).
        channels: feature channels D (the head width).
        batch: image pairs per step.
        repeats: timed steps per case (median reported).
        device: "cuda" or "cpu"; CUDA when available if None.
        threads: CPU threads per case (torch's default if None).
    """
    device = device or _default_device()
    rows = []
    for size in sizes:
        for impl in IMPLEMENTATIONS:
            case = {"impl": impl, "size": size, "channels": channels, "batch": batch, "repeats": repeats}
            case |= {"device": device, "threads": threads}
            cmd = [sys.executable, "-m", "benchmarks.coattention_memory", "--worker", json.dumps(case)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                rows.append({**case, "error": f"timed out after {timeout_s:.0f} s"})
                continue
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode != 0 or not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                rows.append({**case, "error": tail[0][:200]})
            else:
                rows.append(json.loads(lines[-1]))
    return rows


def _cell(row: dict[str, Any], key: str, width: int) -> str:
    return f"{row[key]:>{width}.1f}" if key in row else f"{'error':>{width}}"


def _ratio(naive: dict[str, Any], eff: dict[str, Any], key: str) -> str:
    ok = key in naive and key in eff and eff[key] > 0
    return f"{naive[key] / eff[key]:>7.1f}" if ok else f"{'-':>7}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Naive vs efficient side by side per size, with ratios naive / efficient."""
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_size.setdefault(row["size"], {})[row["impl"]] = row
    head = (
        f"{'map':>8} {'P MiB':>8} {'naive MiB':>10} {'eff. MiB':>9} {'mem ×':>7} "
        f"{'naive ms':>9} {'eff. ms':>8} {'time ×':>7}"
    )
    lines = [head, "-" * len(head)]
    for size, pair in sorted(by_size.items()):
        naive, eff = pair.get("naive", {}), pair.get("efficient", {})
        p_mib = naive.get("affinity_mib", eff.get("affinity_mib", float("nan")))
        lines.append(
            f"{f'{size}×{size}':>8} {p_mib:>8.1f} {_cell(naive, 'peak_mib', 10)} {_cell(eff, 'peak_mib', 9)} "
            f"{_ratio(naive, eff, 'peak_mib')} {_cell(naive, 'time_ms', 9)} {_cell(eff, 'time_ms', 8)} "
            f"{_ratio(naive, eff, 'time_ms')}"
        )
    first = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    lines.append(
        f"device {first.get('device')}, threads {first.get('threads')}, batch {first.get('batch')}, "
        f"D {first.get('channels')}, memory: {first.get('memory_method')}, time: median of "
        f"{first.get('repeats')} forward+backward"
    )
    lines += [f"error {r['impl']} {r['size']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one case, in this process (used by run)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_case(**json.loads(args.worker))))
        return
    rows = run(tuple(args.sizes), args.channels, args.batch, args.repeats, args.device, args.threads)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
