"""Sweeps: the search-space schema, define-by-run sampling, the outputs, and (integration) a real sweep
whose driver is SIGKILLed and restarted, with one trial that raises."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.export import export_model, load_exported
from acol_core.models import FUSIONS, create_model
from acol_core.storage import list_dir, read_bytes, write_bytes
from acol_core.sweep.results import evaluate_model_on_split, experiment_trial_status, write_sweep_outputs
from acol_core.sweep.space import SpaceError, SweepSpace, check_trial_config, load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {
    "backbone": "tiny",
    "image_size": 32,
    "epochs": 1,
    "batch_size": 16,
    "augment": False,
    "num_threads": 1,
}
BASE = {
    "metric": "val_pxap",
    "mode": "max",
    "fixed": dict(TINY),
    "params": {
        "model": {"type": "categorical", "choices": ["cam", "acol"]},
        "delta": {"type": "float", "low": 0.3, "high": 0.95, "when": {"model": ["acol"]}},
        "lr": {"type": "loguniform", "low": 1.0e-3, "high": 5.0e-2},
    },
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(**changes: object) -> dict:
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _with_param(name: str, spec: object) -> dict:
    doc = _space()
    doc["params"][name] = spec
    doc["fixed"].pop(name, None)
    return doc


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # seed 3: tumour slices in both val (all fullsup) and test, so both are scored
    uri = str(tmp_path_factory.mktemp("sweep-data") / "data")
    prepare_dataset("phantom", uri, seed=3, num_subjects=8, slices_per_subject=4, size=32, rows_per_shard=16)
    return uri


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("path", sorted((REPO / "tune" / "spaces").glob("*.yaml")))
def test_shipped_spaces_load(path: Path) -> None:
    space = load_space(str(path))
    assert space.metric in ("val_pxap", "val_max_box_acc_v2") and space.mode == "max"
    assert set(space.models()) <= {"cam", "acol", "coatt", "acol_coatt"}
    assert 0.0 < space.params["delta"].low < space.params["delta"].high < 1.0


def test_mri_space_covers_the_issue_options() -> None:
    space = load_space(str(REPO / "tune" / "spaces" / "acol_mri.yaml"))
    assert space.models() == ["cam", "acol", "coatt", "acol_coatt"]
    assert space.params["delta"].when == {"model": ("acol", "acol_coatt")}
    assert space.params["pair_policy"].when == {"model": ("coatt", "acol_coatt")}
    assert space.params["fusion"].when == {"model": ("acol", "acol_coatt")}
    assert set(space.params["fusion"].choices) == set(FUSIONS)
    for name in ("backbone", "head_width", "head_depth", "shared_anatomy", "lr", "weight_decay", "epochs"):
        assert name in space.params
    assert space.params["lr"].kind == "loguniform" and space.max_epochs() == 20


@pytest.mark.parametrize(
    "doc, message",
    [
        (_space(metrik="val_pxap"), "unknown key(s) metrik"),
        (_space(metric="test_pxap"), "metric must be one of val_pxap, val_max_box_acc_v2"),
        (_space(mode="maximize"), "mode must be max or min"),
        (_space(params=None), "params must be a non-empty mapping"),
        (_with_param("lr", {"low": 0.1, "high": 0.2}), "params.lr: expected a mapping with a 'type'"),
        (_with_param("lr", {"type": "gaussian", "low": 0, "high": 1}), "params.lr.type must be one of"),
        (
            _with_param("lr", {"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}),
            "unknown key(s) choices",
        ),
        (_with_param("delta", {"type": "float", "low": 0.9, "high": 0.3}), "low (0.9) must be < high (0.3)"),
        (_with_param("lr", {"type": "loguniform", "low": 0.0, "high": 0.1}), "needs low > 0"),
        (_with_param("lr", {"type": "float", "low": "x", "high": 0.1}), "params.lr.low must be a number"),
        (_with_param("epochs", {"type": "int", "low": 1.5, "high": 4}), "integer low/high"),
        (
            _with_param("epochs", {"type": "float", "low": 1, "high": 4}),
            "epochs must be an int or categorical",
        ),
        (_with_param("lr", {"type": "float", "low": 0.1, "high": 0.2, "step": 0.5}), "step must be in"),
        (
            _with_param("head_width", {"type": "categorical", "choices": []}),
            "choices must be a non-empty list",
        ),
        (_with_param("head_width", {"type": "categorical", "choices": [64, 64]}), "duplicates"),
        (_with_param("head_width", {"type": "categorical", "choices": [[64]]}), "plain values"),
        (
            _with_param("head_width", {"type": "categorical", "choices": [64], "when": {"depth": [1]}}),
            "'depth' must be a parameter listed before 'head_width'",
        ),
        (
            _with_param("head_width", {"type": "categorical", "choices": [64], "when": {"model": ["acoll"]}}),
            "['acoll'] not among model's choices",
        ),
        (_space(fixed={**TINY, "lerning_rate": 0.1}), "unknown TrainConfig field(s) lerning_rate"),
        (_space(fixed={**TINY, "epochs": 0}), "epochs must be >= 1"),
        (_space(fixed={**TINY, "lr": 0.1}), "'lr' is both fixed and searched"),
        (
            _with_param("model", {"type": "categorical", "choices": ["cam", "acol", "vit"]}),
            "model must be categorical",
        ),
        (_with_param("backbone", {"type": "categorical", "choices": ["alexnet"]}), "backbone must be"),
        # δ without `when` reaches cam, which has no such option
        (
            _with_param("delta", {"type": "float", "low": 0.3, "high": 0.9}),
            "model 'cam' got unknown option(s) delta",
        ),
        # no backbone exposes a feature-stride option (see tune/spaces/acol_mri.yaml)
        (_with_param("stride", {"type": "categorical", "choices": [8, 16]}), "unknown option(s) stride"),
        (_with_param("model_options", {"type": "categorical", "choices": [1]}), "by their own names"),
        (_space(asha={"grace_period": 0}), "asha.grace_period must be an integer >= 1"),
        (_space(asha={"brackets": 2}), "asha: unknown key(s) brackets"),
        ([1, 2], "expected a mapping at the top level"),
    ],
)
def test_bad_spaces_are_rejected_with_the_key_named(doc: object, message: str) -> None:
    with pytest.raises(SpaceError) as info:
        parse_space(doc, source="space.yaml")
    assert message in str(info.value) and str(info.value).startswith("space.yaml")


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path: Path) -> None:
    # YAML 1.1 loads 1e-3 as the string "1e-3"
    text = yaml.safe_dump(BASE, sort_keys=False).replace("0.001", "1e-3")
    assert "1e-3" in text
    (tmp_path / "s.yaml").write_text(text)
    assert load_space(str(tmp_path / "s.yaml")).params["lr"].low == pytest.approx(1e-3)


def test_broken_yaml_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("params: {model: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(tmp_path / "s.yaml"))


# --------------------------------------------------------------------------- sampling and configs


def _sample(space: SweepSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize")
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.5)
    return out


def test_define_by_run_keeps_conditional_params_to_their_models() -> None:
    space = load_space(str(REPO / "tune" / "spaces" / "acol_mri.yaml"))
    samples = _sample(space, 40)
    assert {s["model"] for s in samples} == {"cam", "acol", "coatt", "acol_coatt"}
    for s in samples:
        assert ("delta" in s) == (s["model"] in ("acol", "acol_coatt"))
        assert ("pair_policy" in s) == (s["model"] in ("coatt", "acol_coatt"))
        if "delta" in s:
            assert 0.3 <= s["delta"] <= 0.95
        assert 1e-3 <= s["lr"] <= 5e-2 and isinstance(s["head_depth"], int) and 1 <= s["head_depth"] <= 3
        assert s["head_width"] in (256, 512, 1024) and 6 <= s["epochs"] <= 20


def test_sampled_values_become_config_fields_or_model_options() -> None:
    space = parse_space(_space(fixed={**TINY, "model_options": {"head_depth": 2}}))
    config = space.train_config({"model": "acol", "delta": 0.7, "lr": 0.01})
    assert isinstance(config, TrainConfig)
    assert (config.model, config.lr, config.image_size) == ("acol", 0.01, 32)
    assert config.model_options == {"head_depth": 2, "delta": 0.7}
    # the fixed mapping is not shared with (or changed by) a trial's config
    assert space.fixed["model_options"] == {"head_depth": 2}


def test_when_can_refer_to_a_fixed_value() -> None:
    doc = _space(fixed={**TINY, "model": "acol"})
    doc["params"] = {
        "delta": {"type": "float", "low": 0.3, "high": 0.95, "when": {"model": ["acol"]}},
        "head_depth": {"type": "int", "low": 1, "high": 2, "when": {"model": ["cam"]}},
    }
    samples = _sample(parse_space(doc), 5)
    assert all(set(s) == {"delta"} for s in samples)


def test_trial_config_check_fails_fast_on_bad_option_values() -> None:
    check_trial_config(TrainConfig(model="coatt", model_options={"pair_policy": "same"}))
    with pytest.raises(ValueError, match="pair_policy"):
        check_trial_config(TrainConfig(model="coatt", model_options={"pair_policy": "bogus"}))
    with pytest.raises(TypeError, match="delta"):
        check_trial_config(TrainConfig(model="cam", model_options={"delta": 0.5}))


# --------------------------------------------------------------------------- outputs (no Ray)


def _rows(model_uri: str) -> list[dict]:
    def row(trial_id: str, status: str, model: str, delta: float | None, best: float | None) -> dict:
        return {
            "trial_id": trial_id, "trial_name": f"{model}-{trial_id}", "status": status,
            "error": "ValueError: pair_policy must be one of" if status == "error" else None,
            "model": model, "delta": delta, "lr": 0.01, "epochs_run": 0 if best is None else 1,
            "val_pxap": best, "best_val_pxap": best, "best_epoch": None if best is None else 0,
            "model_uri": None if best is None else model_uri, "completions": int(status == "completed"),
        }  # fmt: skip

    return [
        row("a1", "completed", "acol", 0.4, 0.30),
        row("a2", "stopped", "acol", 0.8, 0.55),
        row("c1", "completed", "cam", None, 0.50),
        row("e1", "error", "coatt", None, None),
    ]


def test_best_epoch_follows_the_shared_selection_rule() -> None:
    """An early spike of the noisy val metric does not pick a half-trained model (the demo's sweep did)."""
    from acol_core.sweep.results import best_epoch, best_row

    space = parse_space({**BASE, "fixed": {**TINY, "model": "acol", "epochs": 8},
                         "params": {"delta": {"type": "float", "low": 0.5, "high": 0.9}}})  # fmt: skip
    pxaps = [0.2, 0.6, 0.3, 0.3, 0.4, 0.45, 0.3, 0.35]
    bal = [0.55, 0.70, 0.85, 0.90, 0.91, 0.93, 0.94, 0.92]
    history = [
        {"epoch": e, "val_pxap": p, "val_balanced_accuracy": b, "val_rows_0": 30, "val_rows_1": 30}
        for e, (p, b) in enumerate(zip(pxaps, bal, strict=True))
    ]
    best, settled = best_epoch(history, space, 8)
    assert (best["epoch"], best["val_pxap"], settled) == (5, 0.45, True)  # within 0.03 of 0.94, best PxAP
    best, settled = best_epoch(history[:3], space, 8)  # stopped by ASHA after 3 epochs
    assert (best["epoch"], settled) == (2, False)
    small = [{**h, "val_rows_1": 4} for h in history]
    assert best_epoch(small, space, 8)[0]["epoch"] == 7  # too few val rows: the last epoch
    rows = [
        {"trial_id": "early", "status": "stopped", "best_val_pxap": 0.6, "best_settled": False},
        {"trial_id": "full", "status": "completed", "best_val_pxap": 0.45, "best_settled": True},
    ]
    assert best_row(rows, space)["trial_id"] == "full"
    assert best_row(rows[:1], space)["trial_id"] == "early"  # nothing settled: the best there is
    # across trials too, classification gates localisation when val has enough rows of every class
    rows = [
        {"trial_id": "collapsed", "status": "completed", "best_val_pxap": 0.7, "best_settled": True,
         "best_val_balanced_accuracy": 0.5, "val_min_class_rows": 30},
        {"trial_id": "classifies", "status": "completed", "best_val_pxap": 0.5, "best_settled": True,
         "best_val_balanced_accuracy": 0.9, "val_min_class_rows": 30},
    ]  # fmt: skip
    assert best_row(rows, space)["trial_id"] == "classifies"
    small = [{**r, "val_min_class_rows": 4} for r in rows]
    assert best_row(small, space)["trial_id"] == "collapsed"  # too few val rows: localisation alone


@pytest.fixture()
def model_uri(tmp_path: Path) -> str:
    config = TrainConfig.from_dict({**TINY, "model": "acol", "model_options": {"delta": 0.8}})
    model = create_model("acol", num_classes=2, backbone="tiny", delta=0.8)
    return export_model(model, config, ["healthy", "tumour"], str(tmp_path / "trial" / "model.safetensors"))


def test_outputs_table_best_model_and_plots(tmp_path: Path, data_uri: str, model_uri: str) -> None:
    space = parse_space(_space())
    sweep = str(tmp_path / "sweep")

    result = write_sweep_outputs(_rows(model_uri), space, sweep, data_uri)

    table = pq.read_table(result.table_uri).to_pylist()
    assert [r["trial_id"] for r in table] == ["a1", "a2", "c1", "e1"]
    assert table[3]["status"] == "error" and "pair_policy" in table[3]["error"]
    assert table[2]["delta"] is None and table[1]["delta"] == 0.8
    assert pacsv.read_csv(result.csv_uri).num_rows == 4
    # the best is the highest best-epoch objective among trials that did not fail (a stopped one may win)
    assert result.best["trial_id"] == "a2" and result.best["value"] == 0.55
    assert result.counts == {"completed": 2, "stopped": 1, "error": 1}
    best = yaml.safe_load(Path(result.best_config_uri).read_text())
    assert best["params"] == {"model": "acol", "delta": 0.8, "lr": 0.01}
    assert TrainConfig.from_dict(best["config"]).model_options == {"delta": 0.8}
    assert Path(result.best_model_uri).read_bytes() == Path(model_uri).read_bytes()
    assert load_exported(result.best_model_uri)[1].config.model_options == {"delta": 0.8}
    assert set(result.test_metrics) >= {"test_pxap", "test_max_box_acc_v2", "test_accuracy"}
    assert result.test_metrics["test_localized_rows"] == 3.0  # the tumour slices of the test split
    assert 0.0 <= result.test_metrics["test_pxap"] <= 1.0
    assert [Path(p).name for p in result.plots] == ["metric_vs_delta.png", "history.png"]
    for plot in result.plots:
        assert Path(plot).read_bytes()[:8] == PNG_MAGIC
    summary = json.loads(Path(result.summary_uri).read_text())
    assert summary["best"]["trial_id"] == "a2" and summary["test_metrics"] == result.test_metrics


def test_outputs_when_every_trial_failed(tmp_path: Path, data_uri: str) -> None:
    rows = [r for r in _rows("unused") if r["status"] == "error"]
    result = write_sweep_outputs(rows, parse_space(_space()), str(tmp_path / "sweep"), data_uri)
    assert result.best is None and result.best_model_uri is None and result.test_metrics == {}
    assert pq.read_table(result.table_uri).num_rows == 1
    assert all(Path(p).read_bytes()[:8] == PNG_MAGIC for p in result.plots)


def test_min_mode_picks_the_lowest(tmp_path: Path, data_uri: str, model_uri: str) -> None:
    space = parse_space(_space(mode="min"))
    result = write_sweep_outputs(
        _rows(model_uri), space, str(tmp_path / "sweep"), data_uri, evaluate_test=False
    )
    assert result.best["trial_id"] == "a1" and result.test_metrics == {}


def test_evaluate_on_an_empty_split_is_empty(tmp_path: Path) -> None:
    uri = str(tmp_path / "data")
    # one subject: everything lands in one split
    prepare_dataset("phantom", uri, num_subjects=1, slices_per_subject=2, size=32, split_fractions=(1, 0, 0))
    config = TrainConfig.from_dict({**TINY, "model": "cam"})
    model_uri = export_model(
        create_model("cam", 2), config, ["healthy", "tumour"], str(tmp_path / "m.safetensors")
    )
    assert evaluate_model_on_split(model_uri, uri, "test") == {}


def test_outputs_go_to_s3(s3_server: str, data_uri: str, model_uri: str) -> None:
    sweep = f"{s3_server}/sweeps/s3-outputs"
    result = write_sweep_outputs(_rows(model_uri), parse_space(_space()), sweep, data_uri)
    assert result.table_uri == f"{sweep}/results/sweep.parquet"
    assert set(list_dir(f"{sweep}/results")) == {
        "sweep.parquet", "sweep.csv", "best_config.yaml", "best_model.safetensors", "summary.json",
        "metric_vs_delta.png", "history.png",
    }  # fmt: skip
    assert pq.read_table(io.BytesIO(read_bytes(result.table_uri))).num_rows == 4
    assert read_bytes(result.best_model_uri) == Path(model_uri).read_bytes()
    state = {"trial_data": [[json.dumps({"trial_id": "a1", "status": "TERMINATED"}), "{}"]]}
    write_bytes(f"{sweep}/experiment_state-2026-01-01_00-00-00.json", json.dumps(state).encode())
    assert experiment_trial_status(sweep) == {"a1": "TERMINATED"}


def test_experiment_trial_status_reads_the_newest_state(tmp_path: Path) -> None:
    def state(statuses: dict[str, str]) -> str:
        data = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, s in statuses.items()]
        return json.dumps({"trial_data": data, "runner_data": {}})

    assert experiment_trial_status(str(tmp_path)) == {}
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(state({"a": "RUNNING"}))
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text(
        state({"a": "TERMINATED", "b": "ERROR"})
    )
    assert experiment_trial_status(str(tmp_path)) == {"a": "TERMINATED", "b": "ERROR"}


def test_cli_reports_a_bad_space_in_one_line(tmp_path: Path, data_uri: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_space(metric="test_pxap")))
    args = ["tune", "--space", str(bad), "--data", data_uri, "--trials", "2"]
    result = CliRunner().invoke(app, [*args, "--storage", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "acol tune: error:" in result.output and "metric must be one of" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()


def test_entry_point_docstring_starts_with_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tune.sweep", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "python -m tune.sweep --space tune/spaces/smoke.yaml" in done.stdout
    assert "ray job submit" in done.stdout and "--trials" in done.stdout


# --------------------------------------------------------------------------- a real sweep (integration)

# Seed 0 draws coatt, acol, acol: the coatt trial fails at once (a pair policy no model knows), the
# driver is killed once the experiment state records the first acol trial as finished (the second one
# is running then), and the restarted driver runs what is left.
RESUME_SPACE = {
    "metric": "val_pxap",
    "mode": "max",
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "fixed": TINY,
    "params": {
        "model": {"type": "categorical", "choices": ["acol", "coatt"]},
        "delta": {"type": "float", "low": 0.3, "high": 0.95, "when": {"model": ["acol"]}},
        "pair_policy": {"type": "categorical", "choices": ["bogus"], "when": {"model": ["coatt"]}},
    },
}
DRIVER_TIMEOUT_S = 240


@pytest.fixture()
def driver_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The sweep driver's environment: own HOME (Ray's auth token goes there), own short Ray temp dir."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay < 107 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    # Save the experiment state every 2 s (default: >= 10 s), so the kill follows the first finished trial.
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "2"
    yield env
    for _ in range(10):  # Ray workers may still be writing logs for a moment after their driver exited
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not os.path.exists(ray_tmp):
            break
        time.sleep(0.5)


def _wait_for_a_finished_trial(proc: subprocess.Popen, sweep: str, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + DRIVER_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the driver exited ({proc.returncode}) before a trial finished:\n{log.read_text()[-3000:]}"
            )
        statuses = experiment_trial_status(sweep)
        if "TERMINATED" in statuses.values():
            return statuses
        time.sleep(1.0)
    pytest.fail(f"no trial finished within {DRIVER_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.mark.integration
def test_sweep_resumes_after_the_driver_is_killed(tmp_path: Path, data_uri: str, driver_env: dict) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(RESUME_SPACE, sort_keys=False))
    storage = tmp_path / "sweeps"
    sweep = str(storage / "resume")
    command = [str(Path(sys.executable).parent / "acol"), "tune", "--space", str(space), "--data", data_uri]
    # One trial at a time: the second acol trial is surely running when the first one is recorded.
    command += ["--trials", "3", "--max-concurrent-trials", "1", "--seed", "0"]
    command += ["--storage", str(storage), "--name", "resume"]
    log = tmp_path / "driver1.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=driver_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            before = _wait_for_a_finished_trial(proc, sweep, log)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            proc.wait(timeout=30)
    assert not (storage / "resume" / "results").exists()

    second = subprocess.run(command, env=driver_env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    # Ray may still print worker log lines after the JSON: decode just the JSON document.
    summary, _ = json.JSONDecoder().raw_decode(second.stdout, second.stdout.index('{\n  "sweep_uri"'))

    rows = pq.read_table(summary["table_uri"]).to_pylist()
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert set(before) <= {r["trial_id"] for r in rows}  # the restored experiment, not a new one
    for row in rows:
        if row["model"] == "coatt":
            assert row["status"] == "error" and "pair_policy must be one of" in row["error"], row
            assert row["completions"] == 0
        else:
            assert row["status"] == "completed" and row["error"] is None, row
            assert row["completions"] == 1  # trained to the end exactly once, across both drivers
            assert 0.0 <= row["best_val_pxap"] <= 1.0 and row["epochs_run"] == 1
    assert {r["status"] for r in rows} == {"error", "completed"}
    markers = {
        t: os.listdir(os.path.join(sweep, "completed", t))
        for t in os.listdir(os.path.join(sweep, "completed"))
    }
    assert {t for t, files in markers.items() if len(files) == 1} == {
        r["trial_id"] for r in rows if r["model"] == "acol"
    }

    best = summary["best"]
    assert best["params"]["model"] == "acol" and best["value"] == max(
        r["best_val_pxap"] for r in rows if r["best_val_pxap"] is not None
    )
    model, info = load_exported(summary["best_model_uri"])
    assert info.config.model_options == {"delta": best["params"]["delta"]}
    assert 0.0 <= summary["test_metrics"]["test_pxap"] <= 1.0
    assert yaml.safe_load(Path(summary["best_config_uri"]).read_text())["trial_id"] == best["trial_id"]
    # TensorBoard event files in the trial folders (Tune's TBX logger)
    assert list(Path(sweep).glob("acol-*/events.out.tfevents.*"))
