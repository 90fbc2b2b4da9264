"""Ratio benchmarks: every figure is a ratio of two things measured in the same run.

Run::

    python -m benchmarks.run --mode quick      # `make bench`: tiny sizes, a few minutes on 2 CPUs
    python -m benchmarks.run --mode full       # vgg16 steps, 112² co-attention, larger Ray runs
    python -m benchmarks.run --only memory     # one benchmark (quick sizes)
    python -m benchmarks.run --mode smoke --out /tmp/b   # minimal sizes (the smoke test)

Writes ``benchmarks/results/<YYYY-MM-DD>.json`` (or ``--out``) and prints a table. Timings are medians
of several repetitions after warm-up, the two sides of a ratio interleaved. The device is
``select_device()``'s, so the same command runs on a GPU machine. On a CPU whose load average is at
least its core count, torch runs 1 thread unless ``--threads`` says otherwise: several threads
spinning on cores that other processes hold slow a step down many times over, and noisily.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BENCHMARKS", "MODES", "format_table", "main", "run_all"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARKS = (
    "train_cost",
    "coattention_memory",
    "data_path",
    "preprocess",
    "ray_train",
    "localize",
    "memory",
)

# Sizes per mode. warmup/repeats apply to every timed comparison.
MODES: dict[str, dict[str, Any]] = {
    "smoke": {
        "warmup": 1,
        "repeats": 1,
        "train_cost": [{"backbone": "tiny", "batch": 4, "size": 32}],
        "coattention_memory": {"sizes": (28,), "channels": 64, "repeats": 1, "min_time_s": 0.0},
        "data_path": {"subjects": 3, "slices": 2, "size": 32, "batch": 4, "backbones": ("tiny",)},
        "preprocess": {"subjects": 3, "slices": 2, "size": 32},
        "ray_train": None,
        "localize": None,
        "memory": None,
    },
    "quick": {
        "warmup": 1,
        "repeats": 5,
        "train_cost": [{"backbone": "tiny", "batch": 8, "size": 64}],
        "coattention_memory": {"sizes": (12, 28, 56), "channels": 128, "repeats": 5},
        "data_path": {"subjects": 16, "slices": 8, "size": 64, "batch": 8, "backbones": ("tiny",)},
        "preprocess": {"subjects": 16, "slices": 16, "size": 64},
        # 4 epochs of 448 rows, at 1 and at 2 torch threads: ~2 min. The steady figure is the median of
        # epochs 1-3 (epoch 1's stream starts beside the val rows' first, uncached, read).
        "ray_train": {"subjects": 40, "slices": 16, "size": 64, "batch": 16, "epochs": 4},
        # 96 and 480 test rows (scale 5): Ray's fixed cost and its steady throughput apart.
        "localize": {
            "subjects": 20,
            "slices": 8,
            "size": 64,
            "batch": 16,
            "object_store_mib": 100,
            "scale": 5,
        },
        # 1× = the 80 MiB object store in decoded rows (432 × 3×128² float32), 5× = 405 MiB: ~4 min.
        "memory": {"subjects": 27, "slices": 16, "size": 128, "batch": 16, "object_store_mib": 80},
    },
    "full": {
        "warmup": 2,
        "repeats": 7,
        "train_cost": [
            {"backbone": "tiny", "batch": 16, "size": 128},
            {"backbone": "vgg16", "batch": 8, "size": 64},
            # The paper's VGG16 heads cost ~1.36x in FLOPs alone: the same pair with one-conv heads.
            {"backbone": "vgg16", "batch": 8, "size": 64, "head_depth": 1},
        ],
        "coattention_memory": {"sizes": (12, 28, 56, 112), "channels": 128, "repeats": 5},
        "data_path": {"subjects": 20, "slices": 8, "size": 96, "batch": 16, "backbones": ("tiny", "vgg16")},
        "preprocess": {"subjects": 20, "slices": 16, "size": 96},
        "ray_train": {"subjects": 80, "slices": 16, "size": 96, "batch": 16, "epochs": 4},
        # ~1440 then ~2900 test rows at 192²: the larger ~5× the 80 MiB object store once decoded.
        "localize": {
            "subjects": 75,
            "slices": 32,
            "size": 192,
            "batch": 32,
            "object_store_mib": 80,
            "scale": 2,
        },
        # 1× = 2× a 100 MiB object store (348 × 3×224² float32 rows), 5× = 1 GiB.
        "memory": {"subjects": 29, "slices": 12, "size": 224, "batch": 32, "object_store_mib": 100},
    },
}


def _choose_threads(requested: int | None) -> tuple[int | None, str]:
    import torch

    from acol_core.train import select_device

    if requested:
        return requested, "--threads"
    if select_device().type != "cpu":
        return None, "torch default (accelerator)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cpus = os.cpu_count() or 1
    if load >= cpus:
        return 1, f"1: load average {load:.1f} >= {cpus} CPUs"
    return torch.get_num_threads(), "torch default"


def _coattention(cfg: dict[str, Any], device: Any, threads: int | None) -> dict[str, Any]:
    from benchmarks.coattention_memory import format_table, run

    rows = run(
        sizes=tuple(cfg["sizes"]),
        channels=cfg["channels"],
        repeats=cfg["repeats"],
        device=device.type if device.type in ("cpu", "cuda") else None,
        threads=threads,
        min_time_s=cfg.get("min_time_s", 2.0),
    )
    by = {(r["impl"], r["size"]): r for r in rows}
    ratios, errors = {}, [f"{r['impl']} {r['size']}: {r['error']}" for r in rows if "error" in r]
    # "auto" is what the models run (attend's own choice of path); the sdpa column stays in the details.
    for size in cfg["sizes"]:
        naive, auto = by.get(("naive", size), {}), by.get(("auto", size), {})
        for key, label in (("peak_mib", "memory"), ("time_ms", "time")):
            if key in naive and key in auto and naive[key] > 0:
                ratios[f"{label}_auto_over_naive_{size}"] = auto[key] / naive[key]
    out = {
        "ratios": ratios,
        "targets": {"memory_auto_over_naive_56": "<= 0.25", "time_auto_over_naive_*": "<= 1"},
        "details": {"rows": rows, "table": format_table(rows)},
    }
    if errors:
        out["errors"] = errors
    return out


def _runners(
    mode: dict[str, Any], workdir: Path, device: Any, threads: int | None
) -> dict[str, Callable[[], Any]]:
    warmup, repeats = mode["warmup"], mode["repeats"]

    def train_cost() -> dict[str, Any]:
        from benchmarks import train_cost as tc

        merged: dict[str, Any] = {"ratios": {}, "targets": {}, "details": {}}
        for case in mode["train_cost"]:
            depth = case.get("head_depth")
            res = tc.run(case["backbone"], case["batch"], case["size"], device, warmup, repeats, depth)
            tag = case["backbone"] + ("" if depth is None else f"_head{depth}")
            merged["ratios"].update({f"{k}_{tag}": v for k, v in res["ratios"].items()})
            merged["targets"].update({f"{k}_{tag}": v for k, v in res["targets"].items()})
            merged["details"][tag] = res["details"]
        return merged

    def data_path() -> dict[str, Any]:
        from benchmarks import data_path as dp

        cfg = mode["data_path"]
        return dp.run(
            workdir,
            cfg["subjects"],
            cfg["slices"],
            cfg["size"],
            cfg["batch"],
            tuple(cfg["backbones"]),
            device,
            warmup,
            repeats,
        )

    def preprocess() -> dict[str, Any]:
        from benchmarks import preprocess as pp

        cfg = mode["preprocess"]
        return pp.run(workdir, cfg["subjects"], cfg["slices"], cfg["size"], warmup, repeats)

    def ray_train() -> dict[str, Any]:
        from benchmarks import ray_train as rt

        cfg = mode["ray_train"]
        if cfg is None:
            return {"skipped": "a Ray Train run is too slow for this mode (~70 s): --mode quick"}
        return rt.run(
            workdir, cfg["subjects"], cfg["slices"], cfg["size"], cfg["batch"], cfg["epochs"], threads or 0
        )

    def localize() -> dict[str, Any]:
        if not (Path(__file__).resolve().parents[1] / "acol_core" / "jobs" / "localize_job.py").exists():
            return {"skipped": "not done: acol_core/jobs/localize_job.py does not exist"}
        cfg = mode["localize"]
        if cfg is None:
            return {"skipped": "a local Ray start is too slow for this mode (~11 s): --mode quick"}
        from benchmarks import localize as lz

        return lz.run(
            workdir,
            cfg["subjects"],
            cfg["slices"],
            cfg["size"],
            cfg["batch"],
            cfg["object_store_mib"],
            threads or 0,
            cfg.get("scale", 5),
        )

    def memory() -> dict[str, Any]:
        cfg = mode["memory"]
        if cfg is None:
            return {"skipped": "four Ray runs are too slow for this mode (~4 min): --mode quick"}
        from benchmarks import memory as mem

        return mem.run(workdir, **cfg, threads=threads or 0)

    return {
        "train_cost": train_cost,
        "coattention_memory": lambda: _coattention(mode["coattention_memory"], device, threads),
        "data_path": data_path,
        "preprocess": preprocess,
        "ray_train": ray_train,
        "localize": localize,
        "memory": memory,
    }


def run_all(mode_name: str, threads: int | None = None, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the benchmarks of ``mode_name`` (all, or ``only``) and return the JSON-able report."""
    import torch

    from acol_core.train import select_device
    from benchmarks.common import GpuUtilisation, environment

    mode = MODES[mode_name]
    chosen, reason = _choose_threads(threads)
    if chosen:
        torch.set_num_threads(chosen)
    device = select_device()
    env = environment() | {"threads_reason": reason}
    report: dict[str, Any] = {"date": dt.date.today().isoformat(), "mode": mode_name, "environment": env}
    workdir = Path(tempfile.mkdtemp(prefix="acol-bench-"))
    results: dict[str, Any] = {}
    try:
        for name, fn in _runners(mode, workdir, device, chosen).items():
            if only and name not in only:
                continue
            start = time.perf_counter()
            with GpuUtilisation() as gpu:  # records nothing on a machine without CUDA
                try:
                    results[name] = fn()
                except Exception as exc:  # one broken benchmark must not hide the others' figures
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            results[name]["wall_s"] = time.perf_counter() - start
            if gpu.result() is not None:
                results[name]["gpu_utilisation"] = gpu.result()
            print(f"[bench] {name}: {results[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["benchmarks"] = results
    report["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "nan"


def format_table(report: dict[str, Any]) -> str:
    """One line per ratio: benchmark, ratio, value, target; skipped and failed benchmarks say why."""
    env = report["environment"]
    lines = [
        f"mode {report['mode']}, device {env['device']} ({env.get('device_name') or '?'}), torch threads "
        f"{env['torch_threads']} ({env['threads_reason']}), {env['cpu_count']} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in env['load_average'] or [])}, commit {env['git_commit']}",
        "",
        f"| {'benchmark':<18} | {'ratio':<42} | {'value':>7} | {'target':<8} |",
        f"|{'-' * 20}|{'-' * 44}|{'-' * 9}|{'-' * 10}|",
    ]
    for name, res in report["benchmarks"].items():
        if "ratios" not in res:
            why = res.get("skipped") or f"ERROR {res.get('error')}"
            lines.append(f"| {name:<18} | {why[:42]:<42} | {'-':>7} | {'':<8} |")
            continue
        targets = res.get("targets", {})
        for key, value in res["ratios"].items():
            target = targets.get(key) or next(
                (t for k, t in targets.items() if k.endswith("*") and key.startswith(k[:-1])), ""
            )
            lines.append(f"| {name:<18} | {key:<42} | {_fmt(value):>7} | {target:<8} |")
        for err in res.get("errors", []):
            lines.append(f"| {name:<18} | ERROR {err[:34]:<34} | {'-':>7} | {'':<8} |")
    notes = [
        f"- {n}: {r.get('skipped') or r.get('error')}"
        for n, r in report["benchmarks"].items()
        if "ratios" not in r
    ]
    gpu = {n: r["gpu_utilisation"] for n, r in report["benchmarks"].items() if r.get("gpu_utilisation")}
    if gpu:
        notes.append(
            "- GPU utilisation, mean (max) while each ran: "
            + ", ".join(f"{n} {g['mean_pct']:.0f}% ({g['max_pct']:.0f}%)" for n, g in gpu.items())
        )
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: see module doc)"
    )
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=(), help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for <date>.json")
    args = parser.parse_args(argv)
    report = run_all(args.mode, args.threads, tuple(args.only))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{report['date']}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(format_table(report))
    coatt = report["benchmarks"].get("coattention_memory", {}).get("details", {}).get("table")
    if coatt:
        print("\nco-attention, one direction, forward + backward:\n" + coatt)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
