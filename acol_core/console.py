"""What a person sees in the terminal: one progress display per long step, Ray's and Prefect's own logs in a
file instead.

Long verbs (train, tune, localize, study, the pipeline) call ``quiet_logs(log_file)`` before Ray or Prefect
start: Ray Data's progress bars are switched off in every Ray process, Ray workers' output stays in Ray's
session logs (``ray_init(log_to_driver=False)``), and the ``ray``, ``prefect`` and ``py.warnings``
loggers of this process write to ``log_file``, whose path is printed. ``verbose=True`` (``acol -v``)
leaves everything as Ray and Prefect set it up.

Progress is drawn with ``rich``: a live bar on a terminal, plain lines when stderr is a file or a pipe
(CI logs). ``EpochProgress`` turns each epoch's metrics into one line: loss, val accuracy (balanced),
val PxAP, images/s and the time left.

Examples:
    >>> epoch_line({"epoch": 2, "train_loss": 0.41, "val_accuracy": 0.93, "val_balanced_accuracy": 0.9,
    ...             "val_pxap": 0.78, "train_images_per_s": 215.0}, epochs=12, eta_s=100)
    'epoch 3/12  loss 0.410  val acc 0.930 (bal 0.900)  PxAP 0.780  215 img/s  ETA 1:40'
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = [
    "EpochProgress",
    "RowProgress",
    "epoch_line",
    "err_console",
    "print_err",
    "quiet",
    "quiet_logs",
    "reroute_logs",
]

_QUIET_LOGGERS = (
    "ray",
    "prefect",
    "py.warnings",
    "optuna",
    "uvicorn",
    "httpx",
    "alembic",
    "asyncio",
    "filelock",
)
_state: dict[str, Any] = {"quiet": False, "handler": None}


def err_console() -> Console:
    """stderr as rich sees it: live bars only on a terminal (``NO_COLOR`` and pipes respected)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def quiet() -> bool:
    """Whether ``quiet_logs`` routed the logs to a file (then Ray workers' output stays in Ray's logs)."""
    return bool(_state["quiet"])


def quiet_logs(log_file: str | Path | None, verbose: bool = False) -> Path | None:
    """Send Ray's and Prefect's logs (and Python warnings) to ``log_file`` instead of the terminal.

    Call before Ray starts: the environment set here is what its processes inherit. Returns the log
    file's path (None with ``verbose``, which changes nothing).
    """
    if verbose or log_file is None:
        return None
    _state["quiet"] = True
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune prints nothing at verbose=0 then
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    _state["handler"] = handler
    reroute_logs()
    return path


def reroute_logs() -> None:
    """Point every terminal handler of Ray's, Prefect's and the warnings' loggers at the log file.

    Libraries add handlers when they are first imported (Ray Data's on ``import ray.data``): the Ray
    adapters call this again once Ray and Ray Data are up. Without ``quiet_logs`` it does nothing.
    """
    handler = _state["handler"]
    if handler is None:
        return
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _QUIET_LOGGERS]
    for name in {*names, *_QUIET_LOGGERS}:
        logger = logging.getLogger(name)
        removed = False
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
                removed = True
        if (removed or name in _QUIET_LOGGERS) and handler not in logger.handlers:
            logger.addHandler(handler)
            logger.propagate = False


def epoch_line(metrics: Mapping[str, Any], epochs: int, eta_s: float | None) -> str:
    """One epoch as one line (values a run does not report are left out)."""
    parts = [f"epoch {int(metrics.get('epoch', 0)) + 1}/{epochs}"]
    if "train_loss" in metrics:
        parts.append(f"loss {metrics['train_loss']:.3f}")
    if "val_accuracy" in metrics:
        acc = f"val acc {metrics['val_accuracy']:.3f}"
        if "val_balanced_accuracy" in metrics:
            acc += f" (bal {metrics['val_balanced_accuracy']:.3f})"
        parts.append(acc)
    if "val_pxap" in metrics:
        parts.append(f"PxAP {metrics['val_pxap']:.3f}")
    if metrics.get("train_images_per_s"):
        parts.append(f"{metrics['train_images_per_s']:.0f} img/s")
    if eta_s is not None:
        minutes, seconds = divmod(int(round(eta_s)), 60)
        parts.append(f"ETA {minutes}:{seconds:02d}")
    return "  ".join(parts)


class _Bar:
    """A rich progress bar over ``total`` steps that also prints lines above it."""

    def __init__(self, label: str, total: int | None) -> None:
        self.console = err_console()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task(label, total=total)
        self.label = label

    def __enter__(self) -> _Bar:
        if self.console.is_terminal:  # a live bar only where it can be redrawn; logs get plain lines
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.progress.stop()

    def line(self, text: str) -> None:
        self.progress.console.print(f"{self.label}: {text}")


class EpochProgress(_Bar):
    """Driver-side epoch display of a training run: ``progress(metrics)`` per reported epoch.

    ``metrics`` carries ``epoch`` (0-based) and, from the run, ``epochs`` (the plan). The ETA is the mean
    time of the epochs seen by this display times the epochs left. On a terminal the bar shows the
    latest epoch's line and one line stays when the run ends; elsewhere (logs) every epoch is a line.
    """

    def __init__(self, label: str, epochs: int, every_epoch: bool | None = None) -> None:
        super().__init__(label, epochs)
        self.epochs = epochs
        self.started = time.monotonic()
        self.seen = 0
        self.last = ""
        self.every_epoch = (not self.console.is_terminal) if every_epoch is None else every_epoch

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        self.seen += 1
        epoch = int(metrics.get("epoch", 0)) + 1
        left = max(self.epochs - epoch, 0)
        eta = (time.monotonic() - self.started) / self.seen * left
        self.last = epoch_line(metrics, self.epochs, eta)
        self.progress.update(self.task, completed=epoch, description=f"{self.label}: {self.last}")
        if self.every_epoch:
            self.line(self.last)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.last and not self.every_epoch:
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            self.console.print(f"{self.label}: {self.last.split('  ETA')[0]}  ({minutes}:{seconds:02d})")


class RowProgress(_Bar):
    """Rows (or shards) done out of a total: ``progress(done, total)``, as prepare and localize report."""

    def __init__(self, label: str) -> None:
        super().__init__(label, None)
        self.last_line = -1.0

    def __call__(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)
        if not self.console.is_terminal and (done == total or time.monotonic() - self.last_line > 30):
            self.last_line = time.monotonic()
            self.line(f"{done}/{total}")


def print_err(text: str) -> None:
    """A line on stderr, outside any progress display."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
