"""MEMORY: peak memory of a Ray Train run and a Ray Data localize job at 1× and 5× the data, store capped.

Run::

    python -m benchmarks.memory                        # quick sizes (as `make bench`), ~4 min on 2 CPUs
    python -m benchmarks.memory --only localize --subjects 54   # 2× and 10× the object store
    python -m benchmarks.memory --only train --scales 1,5,20   # also 20× the store (~12 min more)
    python -m benchmarks.run --mode full --only memory # larger: 1× is already 2× the object store

Does memory stay bounded when the data outgrows the object store (and, by extension, RAM)? Two phantom
datasets differ only in their number of subjects (5× the rows); every other setting is equal. Each
measured run is a fresh child process (``peak_rss_of``) that starts its own local Ray with
``object_store_memory`` capped, then either trains (``run_training``: tiny backbone, 1 epoch, 1 worker,
every row in ``train``) or localizes (``run_localize``: 1 actor, the same rows, an exported untrained
model: memory does not depend on the weights). The child and all its descendants (driver, GCS, raylet,
Ray Train's controller and worker, Ray Data's task workers and actor) are sampled every 50 ms. Ratios
per run kind, 5× over 1× (bounded: close to 1):

- ``<kind>_tree_rss_5x_over_1x``: peak of the summed RSS (target <= 1.5). It counts a shared page once
  per process mapping it (Ray's object store is shared memory), so it overstates the tree's use;
- ``<kind>_tree_pss_5x_over_1x``: the same for PSS (shared pages divided among their mappers: the
  tree's actual share of RAM), sampled every 0.5 s;
- ``<kind>_own_growth_over_extra_data``: how much the processes' own memory (PSS less the object
  store's shared memory) grew from 1× to 5×, over how much more decoded data went through: >= 1 if a
  run kept its rows, ~0 if it streams them. Each run's timeline (RSS, PSS, its shared-memory and
  file-backed parts, every 0.5 s) is in the JSON: a bounded run plateaus once its pipeline is full;
  ``top_processes`` names the processes whose own memory peaked highest (``ray::RayTrainWorker``,
  ``ray::MapBatches(...)``, ...), to compare between sizes. File-backed pages count as own memory: they
  are the processes' code, and the objects that the object store, once its shared memory is full,
  places in files it maps from disk (so a window of blocks held past the store's size shows there).

``--scales`` takes other sizes (the first is the base, in units of ``--subjects``); each larger one
adds ``<kind>_tree_rss_<N>x_over_1x``, ``<kind>_tree_pss_<N>x_over_1x`` and
``<kind>_own_growth_over_extra_data_<N>x_over_1x`` (5× keeps the names above). A run that streams has
the same own memory at 5× and 20×; one that keeps rows grows 4.75 times as much at 20×. A fixed
window shows as a step between a 1× run too small to fill it and the larger ones: the train stream's
shuffle window of 512 decoded rows in each worker is one (Ray holds up to ~1.5× of it, at 192 KiB a
row), which the 432-row 1× run never fills.

Sizes. What must exceed the object store is what flows through it: the rows decoded to float32
tensors (``map_batches`` output) on their way to the train step or the model. Images are decoded to 3
channels (as an RGB dataset would be; the phantom's grey values repeated): 3× the bytes per row for
about the same compute, since the tiny backbone's cost sits after its first convolution. Quick mode:
128² inputs (192 KiB per decoded row), an 80 MiB object store (Ray's floor is 75 MiB), 27 and 135
subjects of 16 slices: 432 rows (81 MiB decoded, 1× the store) and 2160 rows (405 MiB, 5×). One epoch
of the 5× run is ~28 s of tiny-backbone compute on one core; larger inputs or more rows cost
proportionally more time and add nothing to the question. Full mode: 224² inputs, a 100 MiB store,
348 and 1740 rows (2× and 10× the store decoded), so that the 1× run too reaches its steady state.

On a GPU machine the train worker and the localize actor take one GPU each (the device is
``select_device()``'s) and the tree's RSS includes each process's CUDA context; ``run.py`` samples the
GPU's utilisation and memory in use around the whole benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import peak_rss_of, ratio

__all__ = ["DEFAULTS", "make_dataset", "measure_run", "run"]

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_MEMORY "
SCALES = (
    1,
    5,
)  # the datasets' sizes in units of ``subjects``: the first is the base the others are read against
DEFAULTS: dict[str, Any] = {
    "subjects": 27,  # × scale
    "slices": 16,
    "size": 128,
    "in_channels": 3,
    "batch": 16,
    "object_store_mib": 80,
}


def make_dataset(uri: str, subjects: int, slices: int, size: int) -> dict[str, Any]:
    """A phantom dataset whose every row is in ``train``; its row count and bytes on disk."""
    from acol_core.data.prepare import prepare_dataset
    from acol_core.data.shards import open_dataset

    manifest = prepare_dataset(
        "phantom",
        uri,
        num_subjects=subjects,
        slices_per_subject=slices,
        size=size,
        split_fractions=(1.0, 0.0, 0.0),
    )
    paths = [Path(p) for p in open_dataset(uri, verify=False).shard_paths()]
    return {
        "rows": manifest.split_counts["train"],
        "disk_mib": sum(p.stat().st_size for p in paths) / 2**20,
        "class_names": list(manifest.class_names),
    }


def _use_gpu() -> bool:
    from acol_core.train import select_device

    return select_device().type == "cuda"


def _train(case: dict[str, Any]) -> dict[str, Any]:
    from acol_core.config import TrainConfig
    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    config = TrainConfig(
        backbone="tiny",
        in_channels=case["in_channels"],
        image_size=case["size"],
        epochs=1,
        batch_size=case["batch"],
        num_threads=case["threads"],
    )
    options = RunOptions(
        data=case["data"], storage=case["out"], workers=1, gpus_per_worker=1.0 if _use_gpu() else 0.0
    )
    result = run_training(config, options)
    last = result.history[-1] if result.history else {}
    return {"images_per_s": last.get("train_images_per_s")}


def _localize(case: dict[str, Any]) -> dict[str, Any]:
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize

    options = LocalizeOptions(
        case["model"], case["data"], case["out"], split="train", actors=1, batch_size=case["batch"]
    )
    res = run_localize(options)
    return {"rows_written": res.info.num_rows}


def _child(kind: str, case: dict[str, Any]) -> None:
    """In the measured child: a local Ray with the object store capped, one run, a result line."""
    runs = {"train": _train, "localize": _localize}
    if kind not in runs:
        raise SystemExit(f"unknown run {kind!r} (known: {', '.join(runs)})")
    import ray
    import torch

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    for attempt in range(3):
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                configure_logging=False,
                object_store_memory=case["object_store_mib"] * 2**20,
            )
            break
        except Exception as exc:  # noqa: BLE001 - Ray gives its raylet 30 s, too few on a busy host
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    start = time.perf_counter()
    try:
        out = runs[kind](case)
    finally:
        ray.shutdown()
    out["run_s"] = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def _short_tmp() -> str:
    # Ray's socket paths must stay under 107 bytes: a short folder under /tmp, not a long $TMPDIR.
    return tempfile.mkdtemp(prefix="rb", dir="/tmp" if os.path.isdir("/tmp") else None)


def measure_run(kind: str, case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One child process running ``kind`` ("train" or "localize"); its peak memory and result line."""
    env = dict(os.environ)
    env["RAY_TMPDIR"] = _short_tmp()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", json.dumps([kind, case])]
    try:
        res = peak_rss_of(cmd, timeout_s=timeout_s, env=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)  # Ray's session files and logs
    lines = [ln for ln in res["stdout"].splitlines() if ln.startswith(RESULT_PREFIX)]
    out = {k: v for k, v in res.items() if k not in ("stdout", "stderr")}
    if res["returncode"] != 0 or not lines:
        tail = (res["stderr"] or res["stdout"]).strip().splitlines()[-3:]
        why = "timed out" if res["timed_out"] else f"exit {res['returncode']}"
        return out | {"error": f"{kind}: {why}: {' | '.join(tail)}"[:500]}
    return out | json.loads(lines[-1][len(RESULT_PREFIX) :])


def run(
    workdir: Path,
    subjects: int = DEFAULTS["subjects"],
    slices: int = DEFAULTS["slices"],
    size: int = DEFAULTS["size"],
    batch: int = DEFAULTS["batch"],
    object_store_mib: int = DEFAULTS["object_store_mib"],
    in_channels: int = DEFAULTS["in_channels"],
    threads: int = 0,
    kinds: tuple[str, ...] = ("train", "localize"),
    timeout_s: float = 900.0,
    scales: tuple[int, ...] = SCALES,
) -> dict[str, Any]:
    """Both runs at each of ``scales`` × ``subjects``; ratios of the larger runs' peaks over the first's."""
    from acol_core.config import TrainConfig
    from acol_core.export import export_model
    from acol_core.train import build_model

    config = TrainConfig(backbone="tiny", in_channels=in_channels, image_size=size)
    decoded_row = in_channels * size * size * 4
    data: dict[int, dict[str, Any]] = {}
    if len(scales) < 2 or sorted(set(scales)) != list(scales) or scales[0] < 1:
        raise ValueError(f"scales must rise from >= 1, at least two of them, got {scales}")
    for scale in scales:
        uri = str(workdir / f"memory_{scale}x")
        start = time.perf_counter()
        data[scale] = make_dataset(uri, subjects * scale, slices, size) | {"uri": uri}
        data[scale]["prepare_s"] = time.perf_counter() - start
        data[scale]["decoded_mib"] = data[scale]["rows"] * decoded_row / 2**20
        data[scale]["decoded_over_object_store"] = data[scale]["decoded_mib"] / object_store_mib
    names = data[1]["class_names"]
    config = config.replace(num_classes=len(names))
    model_uri = export_model(build_model(config), config, names, str(workdir / "mem.safetensors"))
    common = {
        "size": size,
        "in_channels": in_channels,
        "batch": batch,
        "threads": threads,
        "object_store_mib": object_store_mib,
        "model": model_uri,
    }
    ratios, errors, runs = {}, [], {}
    base = scales[0]
    for kind in kinds:
        for scale in scales:
            case = common | {"data": data[scale]["uri"], "out": str(workdir / f"memory_{kind}_{scale}x_out")}
            res = measure_run(kind, case, timeout_s)
            runs[f"{kind}_{scale}x"] = res
            print(
                f"[bench] memory {kind} {scale}x: tree peak {res['tree_peak_rss_mib']:.0f} MiB RSS, "
                f"own {res['tree_peak_pss_non_shmem_mib']:.0f} MiB, {res['wall_s']:.0f} s"
                f"{' ERROR' if 'error' in res else ''}",
                file=sys.stderr,
                flush=True,
            )
            if "error" in res:
                errors.append(res["error"])
        small = runs[f"{kind}_{base}x"]
        for scale in scales[1:]:
            large = runs[f"{kind}_{scale}x"]
            if "error" in small or "error" in large:
                continue
            # The 5x figures keep their historical names; other scales say theirs.
            tag = f"{scale}x_over_{base}x"
            ratios[f"{kind}_tree_rss_{tag}"] = ratio(large["tree_peak_rss_mib"], small["tree_peak_rss_mib"])
            ratios[f"{kind}_tree_pss_{tag}"] = ratio(large["tree_peak_pss_mib"], small["tree_peak_pss_mib"])
            # The processes' own memory (PSS less the object store's shared memory), its growth against
            # the extra decoded data: >= 1 if a run held all its decoded rows, ~0 if it streams them.
            extra = data[scale]["decoded_mib"] - data[base]["decoded_mib"]
            growth = large["tree_peak_pss_non_shmem_mib"] - small["tree_peak_pss_non_shmem_mib"]
            suffix = "" if (base, scale) == (1, 5) else f"_{tag}"
            ratios[f"{kind}_own_growth_over_extra_data{suffix}"] = ratio(growth, extra)
    out: dict[str, Any] = {
        "ratios": ratios,
        "targets": {f"{k}_tree_rss_{s}x_over_{base}x": "<= 1.5" for k in kinds for s in scales[1:]},
        "details": {
            "object_store_mib": object_store_mib,
            "input": size,
            "in_channels": in_channels,
            "decoded_row_kib": decoded_row / 1024,
            "batch": batch,
            "datasets": {
                f"{s}x": {k: v for k, v in d.items() if k not in ("uri", "class_names")}
                for s, d in data.items()
            },
            "runs": runs,
        },
    }
    if errors:
        out["errors"] = errors
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in the runs (0: default)")
    parser.add_argument("--only", choices=("train", "localize"), default=None)
    parser.add_argument(
        "--scales",
        default=",".join(map(str, SCALES)),
        help="dataset sizes in units of --subjects, comma-separated, the base first (e.g. 1,5,20)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # [kind, case]: the measured child
    args = parser.parse_args(argv)
    if args.worker:
        _child(*json.loads(args.worker))
        return
    with tempfile.TemporaryDirectory(prefix="acol-mem-") as folder:
        res = run(
            Path(folder),
            args.subjects,
            args.slices,
            args.size,
            args.batch,
            args.object_store_mib,
            args.in_channels,
            args.threads,
            (args.only,) if args.only else ("train", "localize"),
            scales=tuple(int(v) for v in args.scales.split(",")),
        )
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
