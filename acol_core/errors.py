"""The two error bases every module raises from, and what the CLI and the flows catch.

- ``UserError`` (exit code 2): bad input or settings, found before or while reading them: a config key
  that does not exist, a corrupt dataset, an unreachable bucket, predictions of another dataset.
  Fix the input and run again.
- ``RunFailure`` (exit code 1): a run that started and failed (a Ray Train run out of restarts, a
  Ray Data job whose actors kept dying). What it committed stays; the same command resumes.

Each module's own error class subclasses one of these (and, where callers already expected it, a
builtin such as ``ValueError``), so the CLI needs no list of module errors.

Examples:
    >>> from acol_core.config import ConfigError
    >>> issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    True
    >>> exit_code(ConfigError("bad")), exit_code(RunFailure("died")), exit_code(KeyError("x"))
    (2, 1, None)
    >>> one_line(RuntimeError("Traceback (most recent call last):\\n  File x\\nOSError: disk full"))
    'OSError: disk full'
"""

from __future__ import annotations

__all__ = ["RunFailure", "UserError", "exit_code", "one_line"]


class UserError(Exception):
    """Bad input or settings (exit code 2)."""


class RunFailure(Exception):
    """A run that started and failed (exit code 1)."""


def exit_code(exc: BaseException) -> int | None:
    """2 for bad input (``UserError``, or the builtins that parsing raises: ``ValueError``,
    ``FileNotFoundError``, YAML errors), 1 for a ``RunFailure``, None for anything else (a bug: let
    its traceback show)."""
    if isinstance(exc, RunFailure):
        return 1
    if isinstance(exc, (UserError, ValueError, FileNotFoundError)):
        return 2
    yaml = __import__("sys").modules.get("yaml")
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        return 2
    return None


def one_line(exc: BaseException, limit: int = 400) -> str:
    """One line for an error that Ray wrapped (Train, Tune, Data): the failing code's own ``Type: message``.

    Ray's messages are multi-line reports with tracebacks. A Ray Train failure names its first
    failing rank (``worker_failures``) or its controller; a Ray Data task error carries the original
    as ``cause``; Train keeps a worker's exception as ``_base_exc``. Of a report, the last
    ``…Error: …`` / ``…Exception: …`` line is the cause a user needs.
    """
    prefix = ""
    failures = sorted((getattr(exc, "worker_failures", None) or {}).items())
    controller = getattr(exc, "controller_failure", None)
    if failures:
        where, exc = failures[0]
        prefix = f"rank {where}: "
    elif isinstance(controller, BaseException):
        exc, prefix = controller, "controller: "
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    exc = getattr(exc, "_base_exc", exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line or "Exception:" in line]
    if len(lines) > 1 and (causes or any(line.startswith("Traceback") for line in lines)):
        text = causes[-1] if causes else lines[-1]
    else:
        text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return (prefix + text)[:limit]
