"""Sweep entry point: a thin wrapper over ``acol_core.jobs.sweep.run_sweep`` (same as ``acol tune``).

One machine (a local Ray starts in this process)::

    python -m tune.sweep --space tune/spaces/smoke.yaml --data runs/data --trials 4 --storage runs/sweeps

A cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m tune.sweep \
        --space tune/spaces/acol_mri.yaml --data s3://bucket/mri --trials 64 --storage s3://bucket/sweeps \
        --workers-per-trial 2 --gpus-per-worker 1

Rerunning the same command resumes a sweep whose driver died. Prints the best config, its metrics and
where the outputs are as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", required=True, help="search-space YAML")
    parser.add_argument("--data", required=True, help="dataset URI written by `acol prepare`")
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--storage", required=True, help="where the sweep folder goes (path or s3://)")
    parser.add_argument("--name", default="acol-sweep", help="sweep name; the same name + storage resumes")
    parser.add_argument("--workers-per-trial", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--max-concurrent-trials", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from acol_core.jobs.sweep import SweepOptions, run_sweep

    options = SweepOptions(
        data=args.data,
        storage=args.storage,
        trials=args.trials,
        name=args.name,
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_concurrent_trials=args.max_concurrent_trials,
        seed=args.seed,
    )
    result = run_sweep(args.space, options)
    json.dump(result.to_dict(), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
