"""Prefect flow: a source -> the Parquet dataset, one task per shard, retried on failure.

Locally, no server (Prefect starts a temporary API in-process), from the repository root::

    .venv/bin/python -m flows.preprocess --output runs/data/phantom -o num_subjects=8 -o size=64
    .venv/bin/python -m flows.preprocess --source nifti --input site-b/ --output runs/site-b --split test

With a Prefect server, a ``process`` work pool and a worker (deployments in ``flows/prefect.yaml``)::

    prefect server start                                     # terminal 1 (or PREFECT_API_URL of yours)
    prefect work-pool create acol-process --type process     # once
    prefect --no-prompt deploy --prefect-file flows/prefect.yaml --all   # from the repository root
    prefect worker start --pool acol-process                 # terminal 2, from the repository's venv
    prefect deployment run 'preprocess/phantom' --param output_uri=s3://bucket/data/phantom \\
        --param source_options='{"num_subjects": 40, "size": 128}' --watch

The flow only composes ``acol_core.data.prepare``: a plan task, a start task, one task per shard
(submitted together, retried 3 times with exponential back-off), and a manifest task that writes
``_manifest.json`` last. Shards are independent and give the same bytes in any order or on a retry, so
the dataset equals what ``acol prepare`` writes for the same arguments.

Here the shard tasks run on Prefect's ``ThreadPoolTaskRunner``. On a Ray cluster the same flow runs its
shards as Ray tasks by swapping the runner (prefect-ray, not a dependency of this project)::

    from prefect_ray import RayTaskRunner
    preprocess.with_options(task_runner=RayTaskRunner(address="ray://head:10001"))(output_uri=...)

S3 settings (``AWS_ENDPOINT_URL``, credentials) come from the environment of the process that runs the
flow: the worker's, or the one running ``serve``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from acol_core.config import ConfigError, parse_key_values
from acol_core.data import prepare
from acol_core.data.shards import Manifest
from acol_core.data.splits import parse_fractions

__all__ = ["preprocess", "summarize"]

SHARD_RETRIES = 3
# Tasks write files: a cached result would skip the write, so nothing is cached.
_TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="plan", **_TASK)
def plan_task(
    source: str,
    output_uri: str,
    input_uri: str | None,
    seed: int,
    fullsup_per_class: int | None,
    rows_per_shard: int,
    source_options: dict[str, Any],
    split: str | None = None,
    split_fractions: list[float] | None = None,
) -> dict[str, Any]:
    """List and split the inputs; the plan travels to the shard tasks as a plain dict."""
    plan = prepare.plan_dataset(
        source,
        output_uri,
        input_uri,
        seed,
        split_fractions=split_fractions,
        fullsup_per_class=fullsup_per_class,
        rows_per_shard=rows_per_shard,
        split=split,
        **source_options,
    )
    get_run_logger().info("%s: %d inputs in %d shards", source, plan.num_inputs, plan.num_shards)
    return plan.to_dict()


@task(name="start", **_TASK)
def start_task(plan: dict[str, Any]) -> None:
    prepare.start_dataset(prepare.PreparePlan.from_dict(plan))


@task(
    name="shard",
    task_run_name="shard-{index}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    **_TASK,
)
def shard_task(plan: dict[str, Any], index: int) -> prepare.ShardResult:
    """Write ``part-<index>.parquet``; a retry rewrites the same file with the same bytes."""
    # Called through the module so that a fault test can wrap run_shard.
    result = prepare.run_shard(prepare.PreparePlan.from_dict(plan), index)
    rows = result.shard.rows if result.shard is not None else 0
    get_run_logger().info("shard %d: %d rows, %d rejects", index, rows, len(result.rejects))
    return result


@task(name="manifest", **_TASK)
def manifest_task(plan: dict[str, Any], results: list[prepare.ShardResult]) -> dict[str, Any]:
    manifest = prepare.finish_dataset(prepare.PreparePlan.from_dict(plan), results)
    return summarize(plan["output_uri"], manifest)


def summarize(output_uri: str, manifest: Manifest) -> dict[str, Any]:
    """The flow's return value: where the dataset is and what it holds."""
    return {
        "output_uri": output_uri,
        "inputs": manifest.inputs,
        "accepted": manifest.accepted,
        "rejected": manifest.rejected,
        "rows": manifest.num_rows,
        "shards": len(manifest.shards),
        "split_counts": manifest.split_counts,
        "fullsup": manifest.counts["fullsup"],
    }


@flow(name="preprocess", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def preprocess(
    source: str = "phantom",
    output_uri: str = "runs/data/phantom",
    input_uri: str | None = None,
    seed: int = 0,
    fullsup_per_class: int | None = None,
    rows_per_shard: int = 256,
    source_options: dict[str, Any] | None = None,
    split: str | None = None,
    split_fractions: list[float] | None = None,
) -> dict[str, Any]:
    """Prepare a dataset from a named source (see ``acol_core.data.prepare.prepare_dataset``).

    Args:
        source: phantom, imagefolder, wsol-metadata or nifti.
        output_uri: dataset folder (path, file:// or s3://); rewritten if it exists.
        input_uri: the source's input folder (not for the phantom).
        seed: drives the split, the fullsup pick and the phantom.
        fullsup_per_class: val rows per class whose ground truth may be used for model selection;
            None (default) scales with the val split: ``max(10, ceil(0.1 × n))`` per class.
        rows_per_shard: rows per Parquet shard.
        source_options: the source's own options, e.g. ``{"num_subjects": 8, "size": 64}``.
        split: every subject into this one split (``"test"``: an external cohort); excludes
            ``split_fractions``.
        split_fractions: train/val/test shares of the subjects (default 0.7/0.15/0.15).

    Returns:
        output URI, inputs, accepted, rejected, rows, shards, rows per split, fullsup rows.
    """
    plan = plan_task(
        source,
        output_uri,
        input_uri,
        seed,
        fullsup_per_class,
        rows_per_shard,
        dict(source_options or {}),
        split=split,
        split_fractions=None if split_fractions is None else list(split_fractions),
    )
    start_task(plan)
    futures = [shard_task.submit(plan, k) for k in range(len(plan["shards"]))]
    results = [f.result() for f in futures]
    return manifest_task(plan, results)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="phantom")
    parser.add_argument("--output", default="runs/data/phantom")
    parser.add_argument("--input", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fullsup-per-class", type=int, default=None, help="default: scales with val")
    parser.add_argument("--split", default=None, help="every subject in this split (e.g. test)")
    parser.add_argument("--split-fractions", default=None, help="train,val,test shares, e.g. 0.8,0.1,0.1")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument(
        "-o", "--option", action="append", default=[], help="source option key=value (a YAML value)"
    )
    args = parser.parse_args(argv)
    if args.split is not None and args.split_fractions is not None:
        parser.error("--split and --split-fractions are mutually exclusive")
    try:
        fractions = None if args.split_fractions is None else list(parse_fractions(args.split_fractions))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        options = parse_key_values(args.option)
    except ConfigError as exc:
        parser.error(str(exc))
    summary = preprocess(
        source=args.source,
        output_uri=args.output,
        input_uri=args.input,
        seed=args.seed,
        fullsup_per_class=args.fullsup_per_class,
        rows_per_shard=args.rows_per_shard,
        source_options=options,
        split=args.split,
        split_fractions=fractions,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    _main()
