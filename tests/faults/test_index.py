"""tests/faults/README.md maps the fault issue to tests: every test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_the_index_names_exists() -> None:
    text = (REPO / "tests" / "faults" / "README.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`", text)
    assert len(named) > 30
    missing = [
        f"{path}::{name}"
        for path, name in sorted(set(named))
        if not re.search(rf"^def {name}\(", (REPO / path).read_text(), flags=re.M)
    ]
    assert not missing, missing
