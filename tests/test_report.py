"""`acol report`: a run built here without Ray (train, localize, evaluate in this process, a sweep's outputs
written by the sweep's own writer), its HTML page, PNGs, summary and curves, rendered in a real headless
Chromium; the same report for a run stored on S3; the CLI's errors; scripts/ensure-chromium."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from acol_core.batch_localize import localize_plain
from acol_core.cli import app
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.evaluate import evaluate_predictions
from acol_core.export import export_model
from acol_core.metrics import center_gaussian_baseline, pxap
from acol_core.predictions import decode_mask, quantize_cam, write_predictions
from acol_core.report import COLUMNS, per_image_dice, pick_cases, read_summary, top_trials, write_report
from acol_core.runs import (
    ModelEntry,
    RunRecord,
    evaluation_uri,
    model_uri,
    predictions_uri,
    sweep_uri,
    write_run,
)
from acol_core.storage import join, resolve, write_bytes
from acol_core.train import fit, iterate_minibatches

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
MODELS = {"cam": {}, "acol": {"delta": 0.9}}
RUN_NAME = "report <test> & 'run'"  # every string on the page is escaped
ACOL = str(Path(sys.executable).parent / "acol")


def _write_sweep(run: str, data: str) -> str:
    """A finished sweep's outputs, written by the sweep's own writer from hand-made trial rows."""
    from acol_core.sweep.results import write_sweep_outputs
    from acol_core.sweep.space import parse_space

    space = parse_space(
        {
            "metric": "val_pxap",
            "fixed": {"model": "acol"},
            "params": {"delta": {"type": "float", "low": 0.5, "high": 0.95}},
        }
    )
    rows = [
        {"trial": i, "trial_id": f"t{i}", "trial_name": f"trial-t{i}", "status": status, "error": error,
         "delta": delta, "epochs_run": 1, "val_pxap": score, "best_val_pxap": score, "best_epoch": 0,
         "model_uri": None, "time_total_s": 1.0, "completions": 1}
        for i, (status, error, delta, score) in enumerate([
            ("completed", None, 0.6, 0.41), ("completed", None, 0.9, 0.73), ("error", "<boom>", 0.7, None),
            ("stopped", None, 0.8, 0.55),
        ])
    ]  # fmt: skip
    uri = sweep_uri(run)
    write_sweep_outputs(rows, space, uri, data, evaluate_test=False)
    return uri


def _build_run(run: str) -> RunRecord:
    """Phantom → two 1-epoch models → predictions (val, test) → evaluations → sweep → run.json."""
    data = join(run, "data")
    prepare_dataset("phantom", data, num_subjects=12, slices_per_subject=4, size=32, fullsup_per_class=2)
    dataset = open_dataset(data)
    arrays = table_to_arrays(dataset.read_table("train"), 1, 32, with_masks=False)
    record = RunRecord(name=RUN_NAME, data_uri=data, stages={"train": 1.5, "localize": 0.5})
    for label, options in MODELS.items():
        config = TrainConfig(
            model=label, model_options=options, image_size=32, epochs=1, batch_size=8, augment=False
        )
        model = fit(
            config, lambda epoch: iterate_minibatches(arrays, 8, np.random.default_rng(epoch), False)
        ).model
        exported = export_model(model, config, dataset.class_names, model_uri(run, label))
        preds = predictions_uri(run, label)
        meta = {"model": label, "checkpoint": "-", "data": data, "splits": ["val", "test"], "threshold": 0.5}
        table = localize_plain(exported, data, "val,test")
        write_predictions([table], preds, class_names=dataset.class_names, extra={"gt_maps": True}, **meta)
        evaluation = evaluate_predictions(preds, data, split="test")
        write_bytes(evaluation_uri(run, label), json.dumps(evaluation).encode())
        record.models[label] = ModelEntry(
            model=label, options={**options, "note": "<i>x</i>"}, epochs=1, model_uri=exported, predictions_uri=preds,
            evaluation_uri=evaluation_uri(run, label), seconds=2.0,
        )  # fmt: skip
    record.models["coatt"] = ModelEntry(model="coatt", options={})  # not evaluated yet
    record.sweep_uri = _write_sweep(run, data)
    write_run(run, record)
    return record


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("report") / "run")
    _build_run(root)
    return root


@pytest.fixture(scope="module")
def page(run: str) -> Path:
    return Path(write_report(run))


def _evaluation(run: str, label: str) -> dict:
    return json.loads(Path(evaluation_uri(run, label)).read_text())


def test_per_image_dice_case_picks_and_trial_order_on_hand_built_inputs() -> None:
    cam = np.array([[0.9, 0.8], [0.1, 0.0]])
    masks = [np.array([[1, 1], [0, 0]]), np.array([[0, 0], [1, 1]]), np.array([[1, 255], [0, 0]])]
    assert per_image_dice([cam] * 3, masks, 0.5).tolist() == [1.0, 0.0, 1.0]  # 255 is ignored
    assert per_image_dice([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5).tolist() == [0.0]
    assert per_image_dice([np.full((2, 2), np.nan)], [masks[0]], 0.5).tolist() == [0.0]  # NaN map: no crash
    assert pick_cases(np.array([0.3, 0.7, 0.1, 0.5, 0.9])) == {"best": 4, "median": 3, "worst": 2}
    assert pick_cases(np.array([0.5])) == {"best": 0, "median": 0, "worst": 0}
    assert pick_cases(np.array([])) == {}
    rows = [
        {"id": "a", "m": 0.3},
        {"id": "b", "m": 0.1},
        {"id": "c", "m": "0.2"},
        {"id": "d", "m": float("nan")},
    ]
    rows.append({"id": "e", "m": 0.9, "status": "error"})
    assert [r["id"] for r in top_trials(rows, "m", 0.3, 5)] == ["a", "c", "b"]  # max: errors and NaN out
    assert [r["id"] for r in top_trials(rows, "m", 0.1, 2)] == ["b", "c"]  # the best value is the minimum
    assert top_trials([], "m", None, 5) == []


def test_table_shows_the_evaluation_numbers_and_the_baseline(run: str, page: Path) -> None:
    text = page.read_text()
    summary = read_summary(run)
    assert set(summary) == {*MODELS, "centre-gaussian"}
    for label in MODELS:
        evaluation = _evaluation(run, label)
        row = re.search(rf"<tr><td>{label}</td>.*?</tr>", text).group(0)
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)[3:]
        assert len(cells) == len(COLUMNS)
        for (title, path), cell in zip(COLUMNS, cells, strict=True):
            value = evaluation
            for key in path:
                value = value[key]
            assert summary[label][title] == value  # the evaluation JSON's number, not a recomputation
            assert cell == f"{value:.3f}", title
    # The baseline, computed here independently: one centre Gaussian per test object row, stored as
    # every CAM is (uint8).
    dataset = open_dataset(join(run, "data"))
    masks = [decode_mask(m) for m in dataset.read_table("test", ["mask"]).column("mask").to_pylist() if m]
    masks = [m for m in masks if (m == 1).any()]
    gaussians = [quantize_cam(center_gaussian_baseline(1, *m.shape)[0]) / np.float32(255) for m in masks]
    expected = pxap(gaussians, masks)
    assert summary["centre-gaussian"]["PxAP"] == pytest.approx(expected, abs=1e-12)
    assert set(summary["centre-gaussian"]) >= {
        "PxAP",
        "MaxBoxAccV2",
        "MaxBoxAcc",
        "Dice (best τ)",
        "off-target",
    }
    assert f"<td>{summary['centre-gaussian']['PxAP']:.3f}</td>" in text
    assert "Not in the table (no evaluation yet): coatt." in text
    assert "Stage timings" in text and "<td>train acol</td><td>2.0 s</td>" in text


def test_curves_are_the_ones_behind_the_evaluation_metrics(run: str, page: Path) -> None:
    curves = json.loads((page.parent / "curves.json").read_text())
    assert curves["box_iou"] == 0.5 and set(curves["models"]) == set(MODELS)
    for label, curve in curves["models"].items():
        overall = _evaluation(run, label)["localization"]["overall"]
        assert max(curve["box"]["accuracy"]) == pytest.approx(overall["max_box_acc"])
        recall, precision = np.array(curve["pr"]["recall"]), np.array(curve["pr"]["precision"])
        area = float(np.sum(precision * (recall - np.append(recall[1:], 0.0))))
        assert area == pytest.approx(overall["pxap"])


def test_overlays_name_their_rows_and_the_ranking(run: str, page: Path) -> None:
    text = page.read_text()
    assert "ranked by per-image Dice" in text
    for label in MODELS:
        threshold = _evaluation(run, label)["thresholds"]["dice"]
        section = text[text.index(f"<h3>{label}</h3>") :]
        scores = [float(s) for s in re.findall(r"\(Dice (\d\.\d+)\)", section.split("<img", 1)[0])]
        assert len(scores) == 3 and scores[0] >= scores[1] >= scores[2]
        assert f"at τ = {threshold:.2f}" in section


def test_sweep_section_shows_its_plots_and_best_trials(page: Path) -> None:
    text = page.read_text()
    assert "sweep_metric_vs_delta.png" in text and "sweep_history.png" in text
    assert "Best trial <code>t1</code>: val_pxap = 0.730" in text
    section = text[text.index("<h2>Sweep</h2>") :]
    trials = re.findall(r"<tr><td>(t\d)</td>", section)
    assert trials == ["t1", "t3", "t0"]  # by best_val_pxap, the errored trial left out
    assert "The 3 best of 4 trials" in section and "trial_name" not in section


def test_every_string_is_escaped(page: Path) -> None:
    text = page.read_text()
    assert html.escape(RUN_NAME) in text and RUN_NAME not in text
    assert "<i>" not in text and "cam / tiny (note=&lt;i&gt;x&lt;/i&gt;)" in text


def test_every_image_the_page_links_is_a_png_beside_it(page: Path) -> None:
    text = page.read_text()
    names = re.findall(r"<img src='([^']+)'", text)
    assert {"curves.png", "cases_0.png", "cases_1.png", "sweep_metric_vs_delta.png"} <= set(names)
    for name in names:
        assert "/" not in name
        with Image.open(page.parent / name) as image:
            assert image.format == "PNG" and image.width > 200
            assert np.asarray(image.convert("L")).std() > 10  # something is drawn
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text)  # nothing loaded from elsewhere
    assert "<script" not in text


def _chromium(target: Path, profile: Path, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page, with its own profile and nothing reaching the network."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    command += [f"--user-data-dir={profile}", *options, target.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _screenshot(target: Path, shot: Path, profile: Path) -> np.ndarray:
    done = _chromium(target, profile, f"--screenshot={shot}", "--window-size=1200,2000")
    assert shot.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)


def test_page_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    assert Path(CHROMIUM).is_file(), (
        "Debian's chromium is missing: `make test` installs it (scripts/ensure-chromium)"
    )
    rendered = _screenshot(page, tmp_path / "page.png", tmp_path / "profile-page")
    # The same page without its images: the text and tables alone.
    bare = page.parent / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    without = _screenshot(bare, tmp_path / "bare.png", tmp_path / "profile-bare")
    bare.unlink()
    assert rendered.shape == (2000, 1200, 3)
    assert rendered.mean(axis=-1).std() > 20  # not a blank page
    assert np.abs(rendered - without).mean() > 5
    # Only the images bring colour (the curves' lines, the jet overlays): text and tables are grey.
    colour = lambda shot: (shot.max(axis=-1) - shot.min(axis=-1) > 80).mean()  # noqa: E731
    assert colour(without) < 0.001 < 0.02 < colour(rendered)


@pytest.mark.parametrize("width", [1280, 390])
def test_page_fits_a_laptop_and_a_phone(page: Path, tmp_path: Path, width: int) -> None:
    """No page-wide horizontal scrolling: wide tables scroll inside themselves (headless Chromium's
    narrowest window is 500 px, so the phone case is measured at that width)."""
    probe = page.parent / f"probe-{width}.html"
    script = (
        "<script>document.body.setAttribute('data-fit', "
        "document.documentElement.scrollWidth + 'x' + window.innerWidth)</script></body>"
    )
    probe.write_text(page.read_text().replace("</body>", script))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    command += [
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={width},900",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    probe.unlink()
    found = re.search(r'data-fit="(\d+)x(\d+)"', done.stdout)
    assert found, done.stderr[-2000:]
    content, viewport = int(found.group(1)), int(found.group(2))
    assert content <= viewport, f"the page is {content} px wide in a {viewport} px window"


def test_report_of_a_run_on_s3(run: str, s3_server: str) -> None:
    remote = f"{s3_server}/report-run"
    s3, path = resolve(remote)  # the moto endpoint and keys come from the environment (conftest)
    local = Path(run)
    for file in local.rglob("*"):
        if file.is_file() and "report" not in file.parts:
            with s3.open_output_stream(f"{path}/{file.relative_to(local).as_posix()}") as out:
                out.write(file.read_bytes())
    # run.json's URIs point at the local copy: rewrite them onto the bucket.
    text = (local / "run.json").read_text().replace(str(local), remote)
    with s3.open_output_stream(f"{path}/run.json") as out:
        out.write(text.encode())
    index = write_report(remote)
    assert index == f"{remote}/report/index.html"
    assert read_summary(remote) == read_summary(run)
    with s3.open_input_stream(f"{path}/report/index.html") as stream:
        names = re.findall(r"<img src='([^']+)'", stream.read().decode())
    assert "sweep_history.png" in names
    for name in names:
        with s3.open_input_stream(f"{path}/report/{name}") as stream:
            assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_page_and_fails_in_one_line(run: str, page: Path, tmp_path: Path) -> None:
    done = subprocess.run([ACOL, "report", "--run", run], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(page)
    missing = subprocess.run(
        [ACOL, "report", "--run", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"acol report: error: {tmp_path}: not a pipeline run (no run.json); run the pipeline or `make demo` first"
    ]
    # A run whose models have no evaluation yet: nothing to report, one line, exit 2.
    empty = str(tmp_path / "empty")
    write_run(
        empty, RunRecord(name="empty", data_uri=join(run, "data"), models={"cam": ModelEntry("cam", {})})
    )
    result = CliRunner().invoke(app, ["report", "--run", empty])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"acol report: error: {empty}: no model of the run has an evaluation yet; nothing to report"
    ]


def test_ensure_chromium_is_idempotent() -> None:
    script = REPO / "scripts" / "ensure-chromium"
    for _ in range(2):  # chromium is there (the render test needs it): nothing to do, nothing said
        done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_per_subject_summary_and_seed_statistics(run: str, page: Path, tmp_path: Path) -> None:
    """The phantom's subjects have 4 slices: the page shows their summary. A run whose evaluation holds
    two seeds (the same predictions under two folders: sd 0) shows mean ± sd in the metrics table."""
    import shutil

    from acol_core.evaluate import evaluate_runs
    from acol_core.runs import read_run

    text = page.read_text()
    assert "<h2>Per subject (volumes)</h2>" in text
    for label in MODELS:
        summary = _evaluation(run, label)["subjects"]["summary"]
        row = re.findall(rf"<tr><td>{label}</td>.*?</tr>", text)[2]  # metrics, thresholds, subjects
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row)
        d = summary["detection"]
        assert cells[1] == str(summary["subjects"]) and cells[4] == f"{summary['dice']['median']:.3f}"
        assert cells[7] == f"{d['tp']}/{d['fp']}/{d['fn']}/{d['tn']}"
    record = read_run(run)
    entry = record.models["acol"]
    copy = str(tmp_path / "pred-copy")
    shutil.copytree(entry.predictions_uri, copy)
    seeds = evaluate_runs([entry.predictions_uri, copy], record.data_uri, split="test")
    seeded = str(tmp_path / "seeds.json")
    Path(seeded).write_text(json.dumps(seeds))
    record.models = {"acol": ModelEntry(**{**entry.__dict__, "evaluation_uri": seeded})}
    record.sweep_uri = None
    other = str(tmp_path / "run")
    write_run(other, record)
    seeded_page = Path(write_report(other)).read_text()
    pxap_stats = seeds["seeds"]["localization.overall.pxap"]
    assert pxap_stats["n"] == 2 and pxap_stats["sd"] == 0.0
    assert f"title='mean ± sd over 2 seeds'>{pxap_stats['mean']:.3f} ± 0.000</span>" in seeded_page
