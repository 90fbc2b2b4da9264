"""Prove the GPU path in one command: CUDA, DDP training with NCCL and bf16 on every visible GPU, a
localize job with GPU actors; one JSON with the figures.

    scripts/gpu-check                      # on a GPU machine (≤ a few minutes): writes benchmarks/results/gpu-check.json
    scripts/gpu-check --dry-run            # the same steps on CPU, tiny sizes, gloo (what CI runs)
    scripts/gpu-check --output /tmp/g.json --workdir /tmp/gpu-check

Steps (each recorded in the JSON; the first failure ends the run with one line and exit 1):

1. ``cuda``: torch sees CUDA, the GPUs' names and memory, bf16 and NCCL support (dry run: recorded,
   not required);
2. ``train``: ``acol_core.jobs.train_run.run_training`` with one Ray Train worker per GPU,
   ``gpus_per_worker=1`` (so NCCL) and ``amp=bf16``; images/s from the workers' own epoch timing; the
   GPUs' peak memory and mean utilisation sampled with ``nvidia-smi`` while it runs;
3. ``localize``: ``run_localize`` with one actor per GPU (``gpus_per_actor=1``); rows/s.

Exit codes: 0 all steps passed, 1 a step failed, 2 no CUDA (without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = ["main", "run_check"]

# (phantom dataset, training) sizes: the GPU run is big enough for images/s to mean something.
SIZES = {
    "gpu": {
        "phantom": {"num_subjects": 40, "slices_per_subject": 16, "size": 128, "rows_per_shard": 128},
        "train": {"backbone": "vgg16", "image_size": 128, "batch_size": 32},
        "localize_batch": 64,
    },
    "dry": {
        "phantom": {"num_subjects": 4, "slices_per_subject": 4, "size": 32, "rows_per_shard": 16},
        "train": {"backbone": "tiny", "image_size": 32, "batch_size": 8},
        "localize_batch": 8,
    },
}


class CheckFailed(RuntimeError):
    """A step of the check failed; the message is the report's one line."""


class NoCuda(CheckFailed):
    """Torch sees no CUDA device (exit 2: this machine cannot run the check, ``--dry-run`` can)."""


def cuda_info(require: bool) -> dict[str, Any]:
    """What torch sees: CUDA, each GPU's name and memory, bf16, NCCL."""
    import torch
    import torch.distributed as dist

    available = torch.cuda.is_available()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": available,
        "cuda_version": torch.version.cuda,
        "device_count": torch.cuda.device_count() if available else 0,
        "nccl_available": dist.is_available() and dist.is_nccl_available(),
        "bf16_supported": bool(available and torch.cuda.is_bf16_supported()),
        "devices": [],
    }
    for index in range(info["device_count"]):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append({"name": props.name, "memory_mib": props.total_memory // 2**20})
        # a bf16 matmul on each GPU: the kernels the training's autocast uses exist on this card
        a = torch.randn(256, 256, device=f"cuda:{index}", dtype=torch.bfloat16)
        info["devices"][-1]["bf16_matmul_ok"] = bool(torch.isfinite((a @ a).float()).all())
    if require:
        if not available or info["device_count"] < 1:
            raise NoCuda(f"cuda: torch {torch.__version__} sees no CUDA device (try --dry-run)")
        if not info["nccl_available"] or not info["bf16_supported"]:
            raise CheckFailed(f"cuda: NCCL available {info['nccl_available']}, bf16 {info['bf16_supported']}")
    return info


class GpuSampler:
    """``nvidia-smi`` every ``period_s`` in a thread: peak memory and mean utilisation per GPU."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.samples: list[list[tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            done = subprocess.run(query, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                rows = [line.split(",") for line in done.stdout.strip().splitlines()]
                self.samples.append([(float(m), float(u)) for m, u in rows])
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(30)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_memory_peak_mib": None, "gpu_util_mean_pct": None, "samples": 0}
        gpus = len(self.samples[0])
        per_gpu = [[s[i] for s in self.samples if len(s) == gpus] for i in range(gpus)]
        return {
            "gpu_memory_peak_mib": [max(m for m, _ in g) for g in per_gpu],
            "gpu_util_mean_pct": [round(sum(u for _, u in g) / len(g), 1) for g in per_gpu],
            "samples": len(self.samples),
        }


def run_check(dry_run: bool, workdir: Path, workers: int | None = None) -> dict[str, Any]:
    """Run every step; returns the report (``ok`` False and ``error`` set when a step failed)."""
    sizes = SIZES["dry" if dry_run else "gpu"]
    report: dict[str, Any] = {"mode": "dry-run" if dry_run else "gpu", "ok": False, "steps": {}}
    started = time.perf_counter()
    report["steps"]["cuda"] = info = cuda_info(require=not dry_run)  # before the heavy imports

    from acol_core.config import TrainConfig
    from acol_core.data.prepare import prepare_dataset
    from acol_core.jobs import ray_init
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize
    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    gpus = 0 if dry_run else info["device_count"]
    if workers is None:
        workers = 2 if dry_run else gpus  # DDP needs two workers to prove anything on CPU
    actors = 2 if dry_run else gpus

    data = str(workdir / "data")
    prepare_dataset("phantom", data, **sizes["phantom"])
    ray_init()

    config = TrainConfig(
        model="acol",
        model_options={"delta": 0.6},
        epochs=2,
        augment=False,
        amp="off" if dry_run else "bf16",
        **sizes["train"],
    )
    options = RunOptions(
        data=data,
        storage=str(workdir / "runs"),
        name="gpu-check",
        workers=workers,
        gpus_per_worker=0.0 if dry_run else 1.0,
        cpus_per_worker=0.5,
        max_failures=0,
    )
    t0 = time.perf_counter()
    with GpuSampler() as sampler:
        result = run_training(config, options)
    seconds = time.perf_counter() - t0
    if result.model_uri is None or len(result.history) != config.epochs:
        raise CheckFailed(f"train: {len(result.history)} of {config.epochs} epochs, model {result.model_uri}")
    last = result.history[-1]
    report["steps"]["train"] = {
        "workers": workers,
        "backend": "gloo" if dry_run else "nccl",
        "amp": config.amp,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "epochs": config.epochs,
        "seconds": round(seconds, 1),
        # rank 0's own timing of its last epoch, times the workers (each sees its share of the rows)
        "images_per_s": round(last["train_images_per_s"] * workers, 1),
        "train_loss": last["train_loss"],
        "val_accuracy": last.get("val_accuracy"),
        **sampler.summary(),
    }

    t0 = time.perf_counter()
    with GpuSampler() as sampler:
        localized = run_localize(
            LocalizeOptions(
                result.model_uri,
                data,
                str(workdir / "predictions"),
                split="all",
                actors=actors,
                batch_size=sizes["localize_batch"],
                gpus_per_actor=0.0 if dry_run else 1.0,
            )
        )
    rows = localized.info.num_rows
    report["steps"]["localize"] = {
        "actors": actors,
        "gpus_per_actor": 0.0 if dry_run else 1.0,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows_per_s": round(rows / max(localized.seconds, 1e-9), 1),
        **sampler.summary(),
    }
    expected = sizes["phantom"]["num_subjects"] * sizes["phantom"]["slices_per_subject"]
    if rows != expected:
        raise CheckFailed(f"localize: {rows} rows written, the dataset has {expected}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = True
    return report


def _fail(step: str, message: str, code: int = 1) -> int:
    print(f"gpu-check: error: {step}: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, gloo (no GPU needed)")
    parser.add_argument(
        "--output", default=None, help="report JSON [default: benchmarks/results/gpu-check.json]"
    )
    parser.add_argument("--workdir", default=None, help="data, runs and predictions [default: a temp dir]")
    parser.add_argument("--workers", type=int, default=None, help="train workers [default: one per GPU]")
    args = parser.parse_args(argv)
    output = Path(args.output or REPO / "benchmarks" / "results" / "gpu-check.json")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        report = run_check(args.dry_run, workdir, args.workers)
    except NoCuda as exc:
        return _fail("check", str(exc), code=2)
    except CheckFailed as exc:
        return _fail("check", str(exc))
    except Exception as exc:  # noqa: BLE001 - any step's failure is the report's one line
        return _fail(type(exc).__name__, str(exc))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(output)
    train, localize = report["steps"]["train"], report["steps"]["localize"]
    print(
        f"gpu-check ({report['mode']}): ok in {report['seconds']:.0f} s; train {train['images_per_s']} images/s "
        f"on {train['workers']} workers ({train['backend']}, amp {train['amp']}); localize "
        f"{localize['rows_per_s']} rows/s; report {output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
