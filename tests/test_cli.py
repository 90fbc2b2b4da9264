"""The `acol` command itself: version, help text, the train flags and --config from any URI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from acol_core.cli import app
from acol_core.storage import write_bytes


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_version_and_help() -> None:
    code, out = _run("--version")
    assert code == 0 and out.startswith("acol-flow ")
    code, out = _run("--help")
    assert code == 0 and "``" not in out and "Ray adapters" not in out
    for verb in ("prepare", "train", "tune", "localize", "evaluate", "study", "report"):
        assert verb in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-0.1"], "lr must be > 0"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--lr", "fast"], "Invalid value for '--lr'"),
        (["--seed", "x"], "Invalid value for '--seed'"),
    ],
)
def test_bad_train_flags_are_one_line_exit_2(tmp_path: Path, flags: list[str], message: str) -> None:
    code, out = _run("train", "--data", str(tmp_path / "d"), "--storage", str(tmp_path / "s"), *flags)
    assert code == 2 and message in out, out


def test_config_is_read_from_s3(tmp_path: Path, s3_server: str) -> None:
    """A config on S3 is read (its bad value is reported); a missing one is one line, exit 2."""
    uri = f"{s3_server}/cli/train.yaml"
    write_bytes(uri, b"epochs: 0\n")
    args = ("train", "--data", str(tmp_path / "d"), "--storage", str(tmp_path / "s"), "--config")
    code, out = _run(*args, uri)
    assert code == 2 and "epochs must be >= 1" in out, out
    code, out = _run(*args, f"{s3_server}/cli/missing.yaml")
    assert code == 2 and len(out.strip().splitlines()) == 1 and "missing.yaml" in out, out
    write_bytes(uri, b"epochs: [1\n")
    code, out = _run(*args, uri)
    assert code == 2 and "not valid YAML" in out, out
