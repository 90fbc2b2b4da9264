"""Run a study (``acol_core.study``): every cell a Ray Train run, a Ray Data localize job and an evaluation.

One machine (Ray starts in this process)::

    acol study --config studies/demo.yaml --storage runs/studies --table docs/results/demo.md

A cluster (storage on S3; ``--parallel`` cells train at once, each with ``workers`` Ray Train workers)::

    ray job submit --address http://HEAD:8265 --working-dir . -- acol study --config studies/skull.yaml \
        --storage s3://bucket/studies --parallel 8

The same command again resumes: prepared datasets, exported models, committed predictions and written
evaluations are kept; an unfinished training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from acol_core.errors import RunFailure, one_line
from acol_core.storage import exists, join, read_bytes, write_bytes
from acol_core.study import StudyCell, StudyConfig, aggregate, results_markdown

__all__ = ["run_study"]


def _prepare(config: StudyConfig, storage: str, preset: str, echo: Callable[[str], None]) -> str:
    from acol_core.data.prepare import prepare_dataset

    data = config.data_uri(storage, preset)
    spec = config.presets[preset]
    if spec.data is not None or exists(join(data, "_manifest.json")):
        return data
    echo(f"[{preset}] preparing {spec.source} -> {data}")
    options: dict[str, Any] = dict(spec.source_options)
    if spec.fullsup_per_class is not None:
        options["fullsup_per_class"] = spec.fullsup_per_class
    if spec.split_fractions is not None:
        options["split_fractions"] = spec.split_fractions
    prepare_dataset(spec.source, data, input_uri=spec.input, seed=spec.seed, **options)
    return data


def _committed(predictions: str) -> bool:
    from acol_core.predictions import PredictionsError, read_success

    try:
        read_success(predictions)
    except PredictionsError:
        return False
    return True


def _run_cell(config: StudyConfig, storage: str, cell: StudyCell, echo: Callable[[str], None]) -> None:
    """Train, localize and evaluate one cell, skipping each step whose output is already committed."""
    from acol_core.evaluate import evaluate_predictions
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize
    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    data = config.data_uri(storage, cell.preset)
    root = config.cell_uri(storage, cell)
    model = join(root, "model.safetensors")
    predictions = join(root, "predictions")
    evaluation = join(root, "evaluation.json")
    if exists(evaluation):
        return
    started = time.perf_counter()
    twin = config.twin(cell)
    twin_model = join(config.cell_uri(storage, twin), "model.safetensors")
    if not exists(model) and twin != cell and exists(twin_model):
        write_bytes(model, read_bytes(twin_model))  # same training (only localize options differ)
    if not exists(model):
        options = RunOptions(data=data, storage=root, name="train", workers=config.workers)
        result = run_training(config.train_config(cell), options)
        if result.model_uri is None:
            raise RuntimeError(f"{cell.key}: training finished without a checkpoint")
        write_bytes(model, read_bytes(result.model_uri))
    if not _committed(predictions):
        run_localize(LocalizeOptions(model, data, predictions, split="val,test", **cell.localize))
    report = evaluate_predictions(predictions, data, split="test")
    write_bytes(evaluation, (json.dumps(report, indent=2) + "\n").encode())
    echo(f"[{cell.key}] done in {time.perf_counter() - started:.0f} s")


def _run_cells_in_tasks(
    config: StudyConfig, storage: str, cells: list[StudyCell], parallel: int, echo: Callable[[str], None]
) -> None:
    """At most ``parallel`` cells at once, each driven from a Ray task (a Ray Train run's driver may live in
    a task, as under Tune): the cells' trainings then spread over the cluster. A cell that shares its
    twin's training starts only once the twin has finished (else both would train). A failed cell fails
    the study once the running ones finish; what finished stays committed."""
    import ray

    run = ray.remote(num_cpus=0, max_retries=0)(_run_cell)
    pending: dict[Any, StudyCell] = {}
    queue, errors = list(cells), []
    while queue or pending:
        while len(pending) < parallel:
            busy = {c.key for c in [*pending.values(), *queue]}
            ready = [c for c in queue if config.twin(c) == c or config.twin(c).key not in busy]
            if not ready:
                break
            cell = ready[0]
            queue.remove(cell)
            pending[run.remote(config, storage, cell, print)] = cell
        if not pending:  # only twins of failed cells are left
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            ray.get(done[0])
            echo(f"[{cell.key}] finished")
        except Exception as exc:  # noqa: BLE001 - reported below, after the running cells finish
            errors.append(f"{cell.key}: {one_line(exc)}")
            queue.clear()
    if errors:
        raise RunFailure(f"{len(errors)} study cell(s) failed: {'; '.join(errors)}")


def run_study(
    config: StudyConfig,
    storage: str,
    parallel: int = 1,
    table: str | None = None,
    echo: Callable[[str], None] = print,
    run_cells: bool = True,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every unfinished cell, then write ``results.json`` and ``results.md`` (and ``table``, a copy).

    Args:
        parallel: cells trained at once; above 1 each cell is driven from a Ray task, so on a cluster the
            cells spread over its nodes (storage must then be a URI every node reaches, e.g. s3://).
        table: also write the Markdown table here (e.g. ``docs/results/<name>.md``), and the results
            JSON beside it (``docs/results/<name>.json``: what ``scripts/docs_tables.py`` renders).
        run_cells: False writes the results of the cells finished so far and runs nothing.
        only: run only these model labels (the table still lists every model, with its seeds done).
    """
    from acol_core.jobs import ray_init
    from acol_core.storage import check_reachable

    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    check_reachable(storage)
    root = config.root(storage)
    unknown = set(only) - {m["label"] for m in config.models}
    if unknown:
        raise ValueError(f"--only: no model labelled {', '.join(sorted(unknown))} in study {config.name!r}")
    cells = [c for c in config.cells() if not only or c.label in only] if run_cells else []
    for preset in config.presets if run_cells else []:
        _prepare(config, storage, preset, echo)
    if cells:
        ray_init()
        echo(f"study {config.name}: {len(cells)} cells ({len(config.presets)} presets × "
             f"{len(config.models)} models × {len(config.seeds)} seeds) in {root}")  # fmt: skip
    if cells and parallel == 1:
        for cell in cells:
            _run_cell(config, storage, cell, echo)
    elif cells:
        _run_cells_in_tasks(config, storage, cells, parallel, echo)
    results = aggregate(config, storage)
    results["results_uri"] = join(root, "results.json")
    write_bytes(results["results_uri"], (json.dumps(results, indent=2) + "\n").encode())
    markdown = results_markdown(results)
    write_bytes(join(root, "results.md"), markdown.encode())
    if table:
        write_bytes(table, markdown.encode())
        stem = table[: -len(".md")] if table.endswith(".md") else table
        write_bytes(stem + ".json", (json.dumps(results, indent=2) + "\n").encode())
    return results
