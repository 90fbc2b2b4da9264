"""The docs' tables are generated from JSON (scripts/docs_tables.py), never typed by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_their_json() -> None:
    assert _docs_tables().main(["--check"]) == 0


def test_a_hand_edited_table_is_caught() -> None:
    module = _docs_tables()
    text = (ROOT / "benchmarks" / "README.md").read_text()
    start = text.index("<!-- generated:benchmarks -->\n") + len("<!-- generated:benchmarks -->\n")
    edited = text[:start] + "| hand | typed |\n" + text[start:]
    assert module.render(edited) != edited and module.render(edited) == module.render(text)
