"""Batch localization: images/s of the Ray Data job (``run_localize``) / the plain loop (``localize_plain``).

Ratios, on the test split of a ``scale``× larger dataset: ``ray_over_plain`` (whole jobs, 1 actor; target
>= 0.8), ``ray_over_plain_steady`` (the throughput once fixed costs are paid: extra rows over extra
seconds between the small and the large dataset, on each side) and ``two_over_one_actor`` (the same job
with a pool of 2 actors over 1, each actor at 0.5 CPU: on 2 CPUs little to gain).

Each side has an untimed warm-up run first. Both run the same ``Localizer`` with an exported (untrained: speed does not depend on the weights) ACoL
model on the same phantom test split. The Ray side includes its own start-up (actor pool, model load,
``write_parquet`` and the commit); the plain side returns a table in memory and writes nothing, so on a
small split the whole-job ratio mostly prices Ray's fixed costs (hence the steady ratio). Ray is started here with ``object_store_mib``
so that a full-mode dataset several times the object store shows whether the job streams.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.export import export_model
from acol_core.train import build_model, select_device

from .common import ratio

__all__ = ["run"]


def _prepare(uri: str, subjects: int, slices: int, size: int) -> int:
    manifest = prepare_dataset(
        "phantom",
        uri,
        num_subjects=subjects,
        slices_per_subject=slices,
        size=size,
        split_fractions=(0.2, 0.2, 0.6),
    )
    return manifest.split_counts["test"]


def run(
    workdir: Path,
    subjects: int,
    slices: int,
    size: int,
    batch: int,
    object_store_mib: int,
    threads: int,
    scale: int = 5,
) -> dict[str, Any]:
    import ray
    import torch

    from acol_core.batch_localize import localize_plain
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize

    # The plain loop runs at this process's torch threads; one actor gets as many, two share them.
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    # Two sizes: the whole jobs' times at each, and from their difference the steady throughput
    # (rows/s once every fixed cost, Ray's or the plain loop's, is paid).
    sizes = {"small": subjects, "large": subjects * scale}
    data = {name: str(workdir / f"localize_ds_{name}") for name in sizes}
    rows = {name: _prepare(data[name], n, slices, size) for name, n in sizes.items()}
    shard_bytes = sum(
        Path(p).stat().st_size for p in open_dataset(data["large"]).shard_paths() if Path(p).exists()
    )
    config = TrainConfig(backbone="tiny", image_size=size, num_threads=threads)
    model_uri = export_model(
        build_model(config), config, ["healthy", "tumour"], str(workdir / "m.safetensors")
    )

    localize_plain(model_uri, data["small"], split="test", batch_size=batch)  # warm-up: load, first kernels
    plain = {}
    for name in sizes:
        start = time.perf_counter()
        localize_plain(model_uri, data[name], split="test", batch_size=batch)
        plain[name] = time.perf_counter() - start

    # A short private temp dir: Ray's socket paths must stay under the 107-byte limit.
    os.environ.setdefault(
        "RAY_TMPDIR", tempfile.mkdtemp(prefix="rb", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    ray.init(address="local", include_dashboard=False, object_store_memory=object_store_mib * 2**20)
    seconds: dict[tuple[str, int], float] = {}
    gpu = select_device().type == "cuda"
    try:
        # Warm-up, as the plain side had: a fresh cluster's first job also starts its worker processes.
        for name, actors in (("warmup", 1), ("small", 1), ("large", 1), ("large", 2)):
            start = time.perf_counter()
            options = LocalizeOptions(
                model_uri,
                data["small" if name == "warmup" else name],
                str(workdir / f"pred_{name}{actors}"),
                split="test",
                actors=actors,
                batch_size=batch,
                # One GPU shared by the pool (a whole GPU per actor would leave the second one waiting).
                gpus_per_actor=1.0 / actors if gpu else 0.0,
                threads_per_actor=max(1, threads // actors),
            )
            run_localize(options)
            seconds[name, actors] = time.perf_counter() - start
    finally:
        ray.shutdown()
    extra_rows = rows["large"] - rows["small"]
    plain_steady = ratio(extra_rows, plain["large"] - plain["small"])
    ray_steady = ratio(extra_rows, seconds["large", 1] - seconds["small", 1])
    return {
        "ratios": {
            "ray_over_plain": ratio(plain["large"], seconds["large", 1]),
            "ray_over_plain_steady": ratio(ray_steady, plain_steady),
            "two_over_one_actor": ratio(seconds["large", 1], seconds["large", 2]),
        },
        "targets": {"ray_over_plain": ">= 0.8"},
        "details": {
            "test_rows": rows,
            "input": size,
            "batch": batch,
            "plain_seconds": plain,
            "ray_seconds": {
                f"{name}_{actors}_actors": s for (name, actors), s in seconds.items() if name != "warmup"
            },
            "ray_warmup_seconds": seconds["warmup", 1],
            "plain_images_per_s": ratio(rows["large"], plain["large"]),
            "ray_images_per_s": ratio(rows["large"], seconds["large", 1]),
            "plain_steady_images_per_s": plain_steady,
            "ray_steady_images_per_s": ray_steady,
            "ray_fixed_seconds": seconds["small", 1] - rows["small"] / ray_steady if ray_steady else None,
            "ray_two_actors_images_per_s": ratio(rows["large"], seconds["large", 2]),
            "ray_includes": "actor start, model load, write_parquet, commit",
            "torch_threads": {
                "plain": threads,
                "one_actor": threads,
                "each_of_two_actors": max(1, threads // 2),
            },
            "object_store_mib": object_store_mib,
            "dataset_shard_mib": shard_bytes / 2**20,
            # What flows through the object store once decoded (float32 images), against its size.
            "decoded_test_mib": rows["large"] * size * size * 4 / 2**20,
            "decoded_over_object_store": rows["large"] * size * size * 4 / 2**20 / object_store_mib,
            "memory": "see the memory benchmark (peak of Ray's process tree at 1× and 5× the data)",
        },
    }
