"""Study configs (a table of bad ones), the generated table, and one real study through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from acol_core.cli import app
from acol_core.config import ConfigError
from acol_core.study import load_study, metric_values, parse_study, results_markdown

ROOT = Path(__file__).resolve().parents[1]


def _study(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "s",
        "seeds": [0, 1, 2],
        "presets": {"p": {"source": "phantom", "source_options": {"num_subjects": 4}}},
        "models": [{"model": "cam"}, {"label": "acol", "model": "acol", "options": {"delta": 0.9}}],
        "train": {"epochs": 1},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_cells_layout_and_train_configs() -> None:
    cfg = parse_study(_study())
    assert [c.key for c in cfg.cells()] == [
        "p/cam/seed-0", "p/acol/seed-0", "p/cam/seed-1", "p/acol/seed-1", "p/cam/seed-2", "p/acol/seed-2",
    ]  # fmt: skip
    two = parse_study(_study(presets={"p": {"data": "d1"}, "q": {"data": "d2"}}, seeds=[0, 1]))
    assert [c.key for c in two.cells()][:4] == [
        "p/cam/seed-0",
        "p/acol/seed-0",
        "q/cam/seed-0",
        "q/acol/seed-0",
    ]
    assert cfg.baseline == "cam"
    acol = cfg.cells()[3]
    train = cfg.train_config(acol)
    assert (train.model, train.model_options, train.seed, train.epochs) == ("acol", {"delta": 0.9}, 1, 1)
    assert cfg.cell_uri("/s", acol) == "/s/s/p/acol/seed-1"
    assert cfg.data_uri("/s", "p") == "/s/s/p/data"
    given = parse_study(_study(presets={"mine": {"data": "s3://b/d"}}))
    assert given.data_uri("/s", "mine") == "s3://b/d"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "../x"}, r"name: model label"),
        ({"seeds": []}, r"seeds: give a list of integers"),
        ({"seeds": [0, 0]}, r"repeated seed"),
        ({"presets": {}}, r"presets: give at least one preset"),
        ({"presets": {"p": {"sauce": "phantom"}}}, r"presets.p: unknown key\(s\) sauce"),
        ({"presets": {"p": {"split_fractions": [0.5, 0.5, 0.5]}}}, r"summing to 1"),
        ({"models": [{"model": "resnet"}]}, r"models\[0\]: unknown model 'resnet'"),
        ({"models": [{"model": "cam"}, {"model": "cam"}]}, r"label 'cam' used twice"),
        (
            {"models": [{"model": "acol", "options": {"delta": 1.5}}]},
            r"models/acol: delta must be in \(0, 1\)",
        ),
        ({"models": [{"model": "cam", "options": {"dleta": 1}}]}, r"models/cam: .*dleta"),
        ({"baseline": "gradcam"}, r"baseline: 'gradcam' is not a model label"),
        ({"train": {"seed": 3}}, r"train.seed: set per model"),
        ({"train": {"epochs": 0}}, r"epochs must be >= 1"),
        ({"colour": "red"}, r"unknown key\(s\) colour"),
        (
            {"models": [{"model": "cam", "localize": {"gate": "brain"}}]},
            r"localize.gate: gate must be one of",
        ),
        (
            {"models": [{"model": "cam", "localize": {"threshold": 0.5}}]},
            r"localize: unknown key\(s\) threshold",
        ),
        ({"models": [{"model": "cam", "train": {"seed": 1}}]}, r"train.seed: set by the model entry"),
        ({"models": [{"model": "cam", "train": {"intensity_augment": 2}}]}, r"models/cam: .*intensity"),
    ],
)
def test_bad_study_configs_name_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_study(_study(**changes))


def test_cells_with_the_same_training_share_one_model() -> None:
    cfg = parse_study(
        _study(
            models=[
                {"model": "cam"},
                {"label": "cam+gate", "model": "cam", "localize": {"gate": "anatomy"}},
                {"label": "cam+aug", "model": "cam", "train": {"intensity_augment": 0.5}},
            ]
        )
    )
    cells = {c.key: c for c in cfg.cells()}
    gated, plain = cells["p/cam+gate/seed-1"], cells["p/cam/seed-1"]
    assert cfg.twin(gated) == plain and cfg.twin(plain) == plain and gated.localize == {"gate": "anatomy"}
    aug = cells["p/cam+aug/seed-1"]
    assert cfg.twin(aug) == aug and cfg.train_config(aug).intensity_augment == 0.5
    assert cfg.twin(cells["p/cam+gate/seed-2"]) == cells["p/cam/seed-2"]


def test_shipped_studies_load() -> None:
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        cfg = load_study(str(path))
        assert len(cfg.seeds) >= 2 and cfg.baseline in [m["label"] for m in cfg.models], path


def test_metric_values_and_generated_table() -> None:
    report = {
        "classification": {"accuracy": 0.9, "balanced_accuracy": 0.85},
        "localization": {
            "overall": {"pxap": 0.7, "dice_iou": {"dice": 0.6}, "off_target_share": float("nan")}
        },
    }
    assert metric_values(report) == {"accuracy": 0.9, "balanced_accuracy": 0.85, "pxap": 0.7, "dice": 0.6}
    results = {
        "name": "s",
        "seeds": [0, 1],
        "baseline": "cam",
        "presets": {
            "p": {
                "models": {
                    "cam": {
                        "seeds": {"0": {}, "1": {}},
                        "summary": {"pxap": {"mean": 0.5, "sd": 0.01, "n": 2}},
                    },
                    "acol": {
                        "seeds": {"0": {}},
                        "summary": {"pxap": {"mean": 0.625, "sd": None, "n": 1}},
                        "paired_pxap": {"diff": 0.125, "low": 0.1, "high": 0.15},
                    },
                }
            }
        },
    }
    table = results_markdown(results)
    assert "| cam | – | – | 0.500 ± 0.010 | – | – | – | (baseline) |" in table
    assert "| acol | – | – | 0.625 | – | – | – | +0.125 [+0.100, +0.150] |" in table
    assert 'Seeds finished per model: {"cam": 2, "acol": 1}' in table


def test_bad_study_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_study(models=[{"model": "resnet"}])))
    result = CliRunner().invoke(app, ["study", "--config", str(bad), "--storage", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "unknown model 'resnet'" in result.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_study()))
    result = CliRunner().invoke(
        app, ["study", "--config", str(good), "--storage", str(tmp_path / "s"), "--only", "cam,gradcam"]
    )
    assert result.exit_code == 2 and "--only: no model labelled gradcam" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    result = CliRunner().invoke(app, ["study", "--config", str(broken), "--storage", str(tmp_path / "s")])
    assert result.exit_code == 2 and "not valid YAML" in result.output


@pytest.mark.integration
def test_smoke_study_runs_resumes_and_writes_the_table(tmp_path: Path, local_ray: Any) -> None:
    storage, table = tmp_path / "studies", tmp_path / "docs" / "smoke.md"
    args = ["study", "--config", str(ROOT / "studies" / "smoke.yaml"), "--storage", str(storage)]
    # Two cells at a time, each driven from a Ray task.
    result = CliRunner().invoke(app, [*args, "--table", str(table), "--parallel", "2"])
    assert result.exit_code == 0, result.output
    results = json.loads((storage / "smoke" / "results.json").read_text())
    block = results["presets"]["tiny"]["models"]
    assert sorted(block) == ["acol", "cam", "cam+gate"]
    for seed in ("seed-0", "seed-1"):  # the twin waited for cam's model instead of training its own
        cell = storage / "smoke" / "tiny"
        twin = (cell / "cam+gate" / seed / "model.safetensors").read_bytes()
        assert twin == (cell / "cam" / seed / "model.safetensors").read_bytes()
        assert not (cell / "cam+gate" / seed / "train").exists()
    for label in ("cam", "acol"):
        assert sorted(block[label]["seeds"]) == ["0", "1"]
        pxap = block[label]["summary"]["pxap"]
        assert pxap["n"] == 2 and 0.0 <= pxap["mean"] <= 1.0 and pxap["sd"] >= 0.0
    paired = block["acol"]["paired_pxap"]
    assert paired["low"] <= paired["diff"] <= paired["high"]
    assert table.read_text() == (storage / "smoke" / "results.md").read_text()
    assert json.loads(table.with_suffix(".json").read_text()) == results
    assert "| acol |" in table.read_text()
    # --tables-only writes the tables of what finished and trains nothing.
    (storage / "smoke" / "tiny" / "acol" / "seed-1" / "evaluation.json").rename(storage / "held.json")
    partial = CliRunner().invoke(app, [*args, "--tables-only"])
    assert partial.exit_code == 0, partial.output
    assert 'Seeds finished per model: {"cam": 2, "cam+gate": 2, "acol": 1}' in partial.stdout
    (storage / "held.json").rename(storage / "smoke" / "tiny" / "acol" / "seed-1" / "evaluation.json")
    # A second run finds every cell finished: nothing is trained again.
    model = storage / "smoke" / "tiny" / "cam" / "seed-0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    (storage / "smoke" / "tiny" / "acol" / "seed-1" / "evaluation.json").unlink()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert model.stat().st_mtime_ns == before
    assert (storage / "smoke" / "tiny" / "acol" / "seed-1" / "evaluation.json").exists()
