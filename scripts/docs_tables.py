"""Regenerate the docs' tables from the JSON that commands wrote; never edit those tables by hand.

    .venv/bin/python scripts/docs_tables.py           # rewrite the generated blocks (DOCS)
    .venv/bin/python scripts/docs_tables.py --check   # exit 1 if a file differs (the test suite runs this)

Blocks (between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``), in README.md and
benchmarks/README.md:
- ``skull`` / ``demo``: a study's table, from ``docs/results/<name>.json`` (written by
  ``acol study --config studies/<name>.yaml --storage runs/studies --table docs/results/<name>.md``);
- ``benchmarks``: the ratios that have a target, from the newest quick-mode
  ``benchmarks/results/<date>.json`` (``make bench``; every ratio is in that JSON and in its printout).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acol_core.study import results_markdown  # noqa: E402
from benchmarks.run import format_table  # noqa: E402

README = ROOT / "README.md"
DOCS = (README, ROOT / "benchmarks" / "README.md")
BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def _study(name: str) -> str:
    path = ROOT / "docs" / "results" / f"{name}.json"
    if not path.exists():
        return (
            f"No results yet: run the command in `studies/{name}.yaml` (writes `{path.relative_to(ROOT)}`).\n"
        )
    results = json.loads(path.read_text())
    results["description"] = ""  # the study's own page (docs/results/<name>.md) carries it
    text = results_markdown(results)
    body = text.split("\n", 2)[2].lstrip("\n")  # drop the title line: the README section has its own
    return body.replace(
        "`acol study` from", f"`acol study` (`studies/{name}.yaml`) into `docs/results/{name}.json`, from"
    )


def _benchmarks() -> str:
    quick = sorted(
        p
        for p in (ROOT / "benchmarks" / "results").glob("*.json")
        if re.fullmatch(r"\d{4}-\d\d-\d\d", p.stem)
    )
    if not quick:
        return "No benchmark results yet: `make bench`.\n"
    lines = format_table(json.loads(quick[-1].read_text())).splitlines()
    # Rows are "| benchmark | ratio | value | target |": keep those with a target.
    targeted = [line for line in lines[4:] if line.startswith("| ") and line.split("|")[4].strip()]
    return (
        f"From `benchmarks/results/{quick[-1].name}` ({lines[0]}); the ratios with a target, every other "
        "one in the JSON:\n\n" + "\n".join(lines[2:4] + targeted) + "\n"
    )


RENDER = {"skull": lambda: _study("skull"), "demo": lambda: _study("demo"), "benchmarks": _benchmarks}


def render(text: str, where: str = "README.md") -> str:
    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDER:
            raise SystemExit(f"{where}: unknown generated block {name!r}")
        return m.group(1) + RENDER[name]() + m.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not up to date")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCS:
        current = path.read_text()
        fresh = render(current, str(path.relative_to(ROOT)))
        if fresh == current:
            continue
        stale.append(str(path.relative_to(ROOT)))
        if not args.check:
            path.write_text(fresh)
    if args.check and stale:
        print(f"generated tables out of date in {', '.join(stale)}: run python scripts/docs_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
