"""The ``acol`` command: one verb per pipeline stage. Every URI may be a local path or ``s3://``.

    acol prepare --source phantom --output runs/data
    acol train --data runs/data --model acol --backbone tiny --storage runs/train --workers 2

Errors are one line on stderr (``acol VERB: error: ...``) and a non-zero exit: 2 for inputs and
settings that cannot be used, 1 for a run that started and failed (its checkpoints are kept). The Ray
adapters are imported only by the verbs that need them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

from acol_core.config import parse_key_values
from acol_core.errors import exit_code

__all__ = ["app", "main"]

HELP = """Weakly supervised object localization (CAM, ACoL, co-attention): one verb per pipeline stage.

Every URI may be a local path or s3:// (credentials and endpoint from the AWS_* environment).

Typical order: prepare -> train (or tune) -> localize -> evaluate -> report; study runs models x seeds.

Errors are one line on stderr and an exit code: 2 for input or settings that cannot be used, 1 for a run
that started and failed (what it committed is kept; the same command resumes).
"""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=HELP,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"acol-flow {version('acol-flow')}")
        raise typer.Exit()


_VERBOSE = {"on": False}


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's and Prefect's own logs here instead of in a log file."
    ),
) -> None:
    """Weakly supervised object localization, one verb per stage."""
    _VERBOSE["on"] = verbose


def _quiet(verb: str, folder: str | None = None) -> None:
    """Ray's and Prefect's logs to a file, and say where: ``<folder>/logs/`` for verbs that own a local
    folder (a study), else the system temp folder (an output folder holds only what the verb commits)."""
    import tempfile
    import time

    from acol_core.console import quiet_logs
    from acol_core.storage import is_local

    stamp = time.strftime("%Y%m%d-%H%M%S")
    local = folder is not None and is_local(folder)
    base = folder.removeprefix("file://") if local else f"{tempfile.gettempdir()}/acol-flow"
    _LOG["path"] = quiet_logs(f"{base}/logs/{verb}-{stamp}-{os.getpid()}.log", verbose=_VERBOSE["on"])


_LOG: dict[str, Any] = {"path": None}


def _logs_note(verb: str) -> None:
    """After a run: where Ray's and Prefect's logs went (errors name it in their one line instead)."""
    from acol_core.console import print_err

    if _LOG["path"] is not None:
        print_err(
            f"acol {verb}: Ray's logs are in {_LOG['path']} (workers': Ray's session folder); -v shows them"
        )


F = TypeVar("F", bound=Callable[..., Any])


def _fail(verb: str, exc: BaseException, code: int) -> NoReturn:
    # Messages quoting files (YAML errors, Ray reports) span lines: the contract is one line.
    message = " ".join(str(exc).split()) or type(exc).__name__
    if code == 1 and _LOG["path"] is not None:
        message += f" (Ray's logs: {_LOG['path']})"
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        # Worker output Ray forwarded to stderr (progress bars) may have left the last line open.
        typer.echo("", err=True)
    typer.echo(f"acol {verb}: error: {message}", err=True)
    raise typer.Exit(code)


def clear_errors(fn: F) -> F:
    """Known failures become one line on stderr and a non-zero exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            _fail(fn.__name__, exc, code)

    return wrapper  # type: ignore[return-value]


@app.command(
    epilog="Examples: acol prepare --source phantom --output runs/data --option num_subjects=20\n\n"
    "acol prepare --source nifti --input site-b/ --output runs/site-b --split test   # external cohort"
)
@clear_errors
def prepare(
    source: str = typer.Option("phantom", help="phantom, imagefolder, wsol-metadata or nifti"),
    output: str = typer.Option(..., help="dataset URI to write (local path or s3://)"),
    input: str | None = typer.Option(None, "--input", help="source URI (not for phantom)"),
    seed: int = typer.Option(0, help="split seed"),
    split: str | None = typer.Option(
        None, help="put EVERY subject in this split (train, val or test), e.g. test for an external cohort"
    ),
    split_fractions: str | None = typer.Option(
        None, help="train,val,test shares of the subjects, e.g. 0.8,0.1,0.1 (default 0.7,0.15,0.15)"
    ),
    fullsup_per_class: int | None = typer.Option(
        None,
        help="val rows per class whose ground truth may be used (default: scales with the val split, "
        "max(10, ceil(0.1 × n)) for a class's n val rows with ground truth)",
    ),
    rows_per_shard: int = typer.Option(256),
    option: list[str] = typer.Option([], "--option", "-o", help="source option key=value (repeatable)"),
) -> None:
    """Read a source and write the Parquet dataset (shards, then _manifest.json last).

    Subjects are split 70/15/15 by default; --split-fractions sets other shares, --split puts every
    subject in one split. The manifest records the choice under preparation.split_policy.
    """
    from acol_core.data.prepare import prepare_dataset
    from acol_core.data.splits import parse_fractions

    if split is not None and split_fractions is not None:
        raise ValueError("--split and --split-fractions are mutually exclusive")
    fractions = parse_fractions(split_fractions) if split_fractions is not None else None
    from acol_core.console import RowProgress

    with RowProgress("prepare (shards)") as progress:
        manifest = prepare_dataset(
            source,
            output,
            input_uri=input,
            seed=seed,
            split_fractions=fractions,
            fullsup_per_class=fullsup_per_class,
            rows_per_shard=rows_per_shard,
            progress=progress,
            split=split,
            **parse_key_values(option),
        )
    summary = {"output": output, "accepted": manifest.accepted, "rejected": manifest.rejected}
    typer.echo(json.dumps({**summary, "split_counts": manifest.split_counts}))


@app.command(
    epilog="Example: acol train --data runs/data --model acol --delta 0.6 --storage runs/train --workers 2"
)
@clear_errors
def train(
    data: str = typer.Option(..., help="dataset URI written by `acol prepare`"),
    storage: str = typer.Option(..., help="where runs, checkpoints and the exported model go"),
    model: str | None = typer.Option(None, help="cam, acol, coatt or acol_coatt [default: config's, acol]"),
    backbone: str | None = typer.Option(None, help="tiny, vgg16 or resnet50 [default: config's, tiny]"),
    delta: float | None = typer.Option(None, help="ACoL erase threshold δ in (0, 1)"),
    epochs: int | None = typer.Option(None, help="[default: config's, 10]"),
    lr: float | None = typer.Option(None, "--lr", help="learning rate [default: config's, 0.01]"),
    image_size: int | None = typer.Option(None, help="square input size in pixels [default: config's, 128]"),
    seed: int | None = typer.Option(None, help="initialisation and row order [default: config's, 0]"),
    workers: int = typer.Option(1, help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU)"),
    gpus_per_worker: float = typer.Option(0.0),
    cpus_per_worker: float = typer.Option(0.5, help="fractional: Ray Data's readers need CPUs too"),
    name: str = typer.Option("acol-train", help="run name; the same name + storage resumes"),
    max_failures: int = typer.Option(1, help="restarts after a worker dies"),
    keep_checkpoints: int = typer.Option(2, help="best checkpoints kept (the latest is kept too)"),
    deterministic: bool = typer.Option(False, help="same data order every run (slower streaming)"),
    class_balance: str | None = typer.Option(
        None,
        help="auto (balance when the train split is imbalanced), sampler (draw minority rows more often), "
        "weights (weigh the loss) or none [default: auto]",
    ),
    pretrained: str | None = typer.Option(
        None, help="backbone weights (state dict .pt/.pth/.safetensors): a path or s3:// URI, cached per node"
    ),
    input_norm: str | None = typer.Option(
        None, help="auto (imagenet with --pretrained, else phantom), phantom, imagenet or none"
    ),
    harmonize: str | None = typer.Option(
        None,
        help="brain: skull-strip on the rows' anatomy masks and bias-correct the inputs (again at "
        "localize), or none [default: none]",
    ),
    placement_strategy: str = typer.Option(
        "PACK", help="workers' placement: PACK, SPREAD (over nodes) or STRICT_SPREAD (one per node)"
    ),
    config: str | None = typer.Option(None, "--config", help="YAML file of TrainConfig fields"),
) -> None:
    """Train on Ray Train (a local Ray, or the cluster in RAY_ADDRESS); prints the result as JSON.

    Ray Data streams the dataset's train rows to the workers; every epoch rank 0 scores the val rows
    and saves a checkpoint (state.pt + model.safetensors) under STORAGE/NAME. The checkpoint kept is
    the best val localisation among epochs within 0.03 of the best val balanced accuracy (the last
    epoch when val has under 10 rows of a class); the JSON says which and why, and the class balance.
    """
    from acol_core.config import TrainConfig, load_config_file
    from acol_core.console import EpochProgress
    from acol_core.jobs.train_run import run_training
    from acol_core.train_session import RunOptions

    values = load_config_file(config) if config else {}
    given = {
        "model": model, "backbone": backbone, "epochs": epochs, "lr": lr, "image_size": image_size, "seed": seed,
        "class_balance": class_balance, "pretrained": pretrained, "input_norm": input_norm,
        "harmonize": harmonize,
    }  # fmt: skip
    values.update({k: v for k, v in given.items() if v is not None})
    if delta is not None:
        values["model_options"] = {**values.get("model_options", {}), "delta": delta}
    options = RunOptions(
        data=data,
        storage=storage,
        name=name,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        keep_checkpoints=keep_checkpoints,
        deterministic=deterministic,
        placement_strategy=placement_strategy,
    )
    train_config = TrainConfig.from_dict(values)
    _quiet("train")
    with EpochProgress(f"train {name}", train_config.epochs) as progress:
        options.progress = progress
        result = run_training(train_config, options)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    summary = {
        "run": result.run_uri,
        "checkpoint": result.checkpoint_uri,
        "model": result.model_uri,
        "latest_checkpoint": result.latest_checkpoint_uri,
        "epochs": len(result.history),
        "metrics": metrics,
        "selection": result.selection,
        "class_balance": result.class_balance,
    }
    typer.echo(json.dumps(summary, indent=2))
    _logs_note("train")


@app.command(
    epilog="Example: acol tune --space tune/spaces/smoke.yaml --data runs/data --trials 4 --storage runs/sweeps"
)
@clear_errors
def tune(
    space: str = typer.Option(..., help="search-space YAML (tune/spaces/*.yaml)"),
    data: str = typer.Option(..., help="dataset URI written by `acol prepare`"),
    trials: int = typer.Option(..., help="number of trials"),
    storage: str = typer.Option(..., help="where the sweep folder goes (path or s3://)"),
    name: str = typer.Option(
        "acol-sweep", help="sweep name; the same name + storage resumes a stopped sweep"
    ),
    workers_per_trial: int = typer.Option(1, help="Ray Train workers per trial"),
    cpus_per_worker: float = typer.Option(0.5),
    gpus_per_worker: float = typer.Option(0.0),
    max_concurrent_trials: int | None = typer.Option(None, help="default: what the cluster holds"),
    seed: int = typer.Option(0, help="Optuna sampler seed"),
) -> None:
    """Sweep with Ray Tune (Optuna + ASHA), one Ray Train run per trial; prints the best config as JSON."""
    from acol_core.jobs.sweep import SweepOptions, run_sweep

    _quiet("tune")
    options = SweepOptions(
        data=data,
        storage=storage,
        trials=trials,
        name=name,
        workers_per_trial=workers_per_trial,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_concurrent_trials=max_concurrent_trials,
        seed=seed,
    )
    result = run_sweep(space, options)
    typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    _logs_note("tune")


@app.command(
    epilog="Example: acol localize --model runs/model.safetensors --data runs/data --output runs/pred --actors 2"
)
@clear_errors
def localize(
    model: str = typer.Option(..., help="model export (.safetensors; path or s3://)"),
    data: str = typer.Option(..., help="dataset URI written by `acol prepare`"),
    output: str = typer.Option(..., help="predictions folder to (re)write (path or s3://)"),
    split: str = typer.Option("test", help="split(s) to localize: test, val,test or all"),
    threshold: float | None = typer.Option(None, help="CAM threshold τ [default: the model's, else 0.5]"),
    nifti_out: str | None = typer.Option(None, help="also write mask/CAM NIfTI volumes per subject here"),
    nifti_orientation: str = typer.Option(
        "original", help="original (source file's axes) or canonical (RAS)"
    ),
    actors: int = typer.Option(1, help="Ray Data actors, each holding one copy of the model"),
    batch_size: int = typer.Option(32),
    gpus_per_actor: float | None = typer.Option(None, help="[default: 1 when the Ray cluster has GPUs]"),
    cpus_per_actor: float = typer.Option(
        0.5, help="fractional: Ray Data's readers and writers need CPUs too"
    ),
    threads_per_actor: int | None = typer.Option(
        None, help="torch CPU threads per actor [default: 1 with GPUs, else a node's CPUs / actors]"
    ),
    gt_maps: bool = typer.Option(True, help="also store the labelled class's map where it differs (cam_gt)"),
    gate: str = typer.Option(
        "none", help="none, or anatomy: zero the maps on the rows' anatomy_mask (skull/scalp), renormalise"
    ),
) -> None:
    """Localize a split with Ray Data (an actor pool holds the model); prints a summary as JSON.

    Writes one row per image (predicted class, softmax scores, CAM and mask PNGs at image size, boxes)
    to OUTPUT, committed by _SUCCESS.json last; a rerun replaces the folder.
    """
    from acol_core.console import RowProgress
    from acol_core.jobs.localize_job import LocalizeOptions, run_localize

    _quiet("localize")
    with RowProgress("localize (rows)") as progress:
        options = LocalizeOptions(
            model=model,
            data=data,
            output=output,
            split=split,
            threshold=threshold,
            actors=actors,
            batch_size=batch_size,
            gpus_per_actor=gpus_per_actor,
            cpus_per_actor=cpus_per_actor,
            threads_per_actor=threads_per_actor,
            gt_maps=gt_maps,
            nifti_out=nifti_out,
            nifti_orientation=nifti_orientation,
            progress=progress,
            gate=gate,
        )
        result = run_localize(options)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    _logs_note("localize")


@app.command(
    epilog="Examples: acol evaluate --predictions runs/pred --data runs/data --output runs/metrics.json\n\n"
    "acol evaluate --predictions ext/pred --data ext/data --val-predictions runs/pred --val-data runs/data\n\n"
    "acol evaluate --predictions s0/pred,s1/pred,s2/pred --data runs/data --compare-to cam/pred"
)
@clear_errors
def evaluate(
    predictions: str = typer.Option(
        ...,
        help="predictions folder written by `acol localize`; several (comma-separated): seeds of one model",
    ),
    data: str = typer.Option(..., help="the dataset the predictions were made on"),
    split: str = typer.Option("test", help="split to score"),
    val_predictions: str | None = typer.Option(
        None,
        help="val predictions for the threshold choice, one per --predictions folder "
        "[default: the val rows of --predictions, if any]",
    ),
    val_data: str | None = typer.Option(
        None, help="the dataset --val-predictions were made on (a training cohort) [default: --data]"
    ),
    compare_to: str | None = typer.Option(
        None,
        help="predictions of another model on the same rows (one, or one per --predictions folder): "
        "bootstrap 95% interval of the PxAP difference",
    ),
    n_boot: int = typer.Option(2000, min=1, help="bootstrap resamples of --compare-to"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    output: str | None = typer.Option(None, help="also write the JSON here (path or s3://)"),
    subjects_csv: str | None = typer.Option(
        None, help="per-subject volume metrics CSV [default: next to --output, <name>.subjects.csv]"
    ),
) -> None:
    """Score predictions against the ground truth: accuracy, PxAP, MaxBoxAcc(V2), loc, Dice/IoU, per-subject; JSON."""
    from acol_core.evaluate import evaluate_runs, subjects_csv_uri, write_subjects_csv
    from acol_core.storage import write_bytes

    def uris(value: str | None) -> list[str]:
        return [u.strip() for u in value.split(",") if u.strip()] if value else []

    report = evaluate_runs(
        uris(predictions),
        data,
        split=split,
        val_predictions=uris(val_predictions) or None,
        val_data=val_data,
        compare_to=uris(compare_to),
        n_boot=n_boot,
        seed=seed,
    )
    if subjects_csv:
        write_subjects_csv(report, subjects_csv)
    elif output:  # next to the JSON, when the dataset has subjects of several slices
        write_subjects_csv(report, subjects_csv_uri(output), required=False)
    text = json.dumps(report, indent=2)
    if output:
        write_bytes(output, (text + "\n").encode())
    typer.echo(text)


@app.command(epilog="Example: acol report --run runs/demo")
@clear_errors
def report(run: str = typer.Option(..., help="pipeline run folder holding run.json (path or s3://)")) -> None:
    """Write the run's HTML report (metrics table, CAM overlays, threshold curves, sweep plots); prints its URI."""
    from acol_core.report import write_report

    typer.echo(write_report(run))


@app.command(
    epilog="Example: acol study --config studies/demo.yaml --storage runs/studies --table docs/results/demo.md"
)
@clear_errors
def study(
    config: str = typer.Option(..., help="study YAML (models × seeds × presets), path or URI"),
    storage: str = typer.Option(..., help="where the study folder goes (path or s3://)"),
    parallel: int = typer.Option(1, help="cells trained at once (each its own Ray Train run)"),
    table: str | None = typer.Option(None, help="also write the generated Markdown table here"),
    tables_only: bool = typer.Option(
        False, "--tables-only", help="train nothing: write the tables of the cells finished so far"
    ),
    only: str | None = typer.Option(None, help="comma-separated model labels: run only these"),
) -> None:
    """Train, localize and evaluate every model × seed × preset; print the mean ± sd table."""
    from acol_core.jobs.study_run import run_study
    from acol_core.study import load_study, results_markdown

    study_config = load_study(config)
    _quiet("study", f"{storage}/{study_config.name}")
    results = run_study(
        study_config, storage, parallel=parallel, table=table, echo=_echo_err, run_cells=not tables_only,
        only=[label for label in (only or "").split(",") if label],
    )  # fmt: skip
    typer.echo(results_markdown(results))
    _logs_note("study")
    typer.echo(f"results: {results['results_uri']}", err=True)


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
