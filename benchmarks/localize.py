"""Batch localization: images/s of the Ray Data job (``run_localize``) / the plain loop (``localize_plain``).

Ratios: ``ray_over_plain`` (1 actor; target >= 0.8) and ``two_over_one_actor`` (the same job with a pool
of 2 actors over 1, each actor at 0.5 CPU: on 2 CPUs little to gain).

Both run the same ``Localizer`` with an exported (untrained: speed does not depend on the weights) ACoL
model on the same phantom test split. The Ray side includes its own start-up (actor pool, model load,
``write_parquet`` and the commit); the plain side returns a table in memory and writes nothing, so on a
small split the ratio mostly prices Ray's fixed costs. Ray is started here with ``object_store_mib``
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


def run(
    workdir: Path, subjects: int, slices: int, size: int, batch: int, object_store_mib: int, threads: int
) -> dict[str, Any]:
    import ray

    from acol_core.jobs.localize_job import localize_plain, run_localize

    data_uri = str(workdir / "localize_ds")
    manifest = prepare_dataset(
        "phantom",
        data_uri,
        num_subjects=subjects,
        slices_per_subject=slices,
        size=size,
        split_fractions=(0.2, 0.2, 0.6),
    )
    rows = manifest.split_counts["test"]
    shard_bytes = sum(
        Path(p).stat().st_size for p in open_dataset(data_uri).shard_paths() if Path(p).exists()
    )
    config = TrainConfig(backbone="tiny", image_size=size, num_threads=threads)
    model_uri = export_model(
        build_model(config), config, list(manifest.class_names), str(workdir / "m.safetensors")
    )

    localize_plain(model_uri, data_uri, split="test", batch_size=batch)  # warm-up: load, first kernels
    start = time.perf_counter()
    localize_plain(model_uri, data_uri, split="test", batch_size=batch)
    plain_s = time.perf_counter() - start

    # A short private temp dir: Ray's socket paths must stay under the 107-byte limit.
    os.environ.setdefault(
        "RAY_TMPDIR", tempfile.mkdtemp(prefix="rb", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    ray.init(address="local", include_dashboard=False, object_store_memory=object_store_mib * 2**20)
    seconds = {}
    gpu = select_device().type == "cuda"
    try:
        for actors in (1, 2):
            start = time.perf_counter()
            run_localize(
                model_uri,
                data_uri,
                str(workdir / f"pred{actors}"),
                split="test",
                actors=actors,
                batch_size=batch,
                # One GPU shared by the pool (a whole GPU per actor would leave the second one waiting).
                gpus_per_actor=1.0 / actors if gpu else 0.0,
            )
            seconds[actors] = time.perf_counter() - start
    finally:
        ray.shutdown()
    ray_s = seconds[1]
    return {
        "ratios": {
            "ray_over_plain": ratio(plain_s, ray_s),
            "two_over_one_actor": ratio(seconds[1], seconds[2]),
        },
        "targets": {"ray_over_plain": ">= 0.8"},
        "details": {
            "test_rows": rows,
            "input": size,
            "batch": batch,
            "plain_images_per_s": ratio(rows, plain_s),
            "ray_images_per_s": ratio(rows, ray_s),
            "ray_two_actors_images_per_s": ratio(rows, seconds[2]),
            "ray_includes": "actor start, model load, write_parquet, commit",
            "object_store_mib": object_store_mib,
            "dataset_shard_mib": shard_bytes / 2**20,
            # What flows through the object store once decoded (float32 images), against its size.
            "decoded_test_mib": rows * size * size * 4 / 2**20,
            "decoded_over_object_store": rows * size * size * 4 / 2**20 / object_store_mib,
            "memory": "see the memory benchmark (peak of Ray's process tree at 1× and 5× the data)",
        },
    }
