"""`acol report`: a run built here without Ray (train, localize, evaluate in this process), its HTML page,
PNGs and summary, rendered in a real headless Chromium; the same report for a run stored on S3."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.evaluate import evaluate_predictions
from acol_core.export import export_model
from acol_core.jobs.localize_job import localize_plain
from acol_core.predictions import write_predictions
from acol_core.report import per_image_dice, pick_cases, read_summary, write_report
from acol_core.runs import ModelEntry, RunRecord, evaluation_uri, model_uri, predictions_uri, write_run
from acol_core.storage import join, resolve, write_bytes
from acol_core.train import fit, iterate_minibatches

CHROMIUM = "/usr/bin/chromium"
MODELS = {"cam": {}, "acol": {"delta": 0.9}}
ACOL = str(Path(sys.executable).parent / "acol")


def _build_run(run: str) -> RunRecord:
    """Phantom → two 1-epoch models → predictions (val, test) → evaluations → run.json, all in-process."""
    data = join(run, "data")
    prepare_dataset("phantom", data, num_subjects=12, slices_per_subject=4, size=32, fullsup_per_class=2)
    dataset = open_dataset(data)
    arrays = table_to_arrays(dataset.read_table("train"), 1, 32, with_masks=False)
    record = RunRecord(name="report-test", data_uri=data, stages={"train": 1.5, "localize": 0.5})
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
            model=label, options=options, epochs=1, model_uri=exported, predictions_uri=preds,
            evaluation_uri=evaluation_uri(run, label),
        )  # fmt: skip
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


def test_per_image_dice_and_case_picks_on_hand_built_maps() -> None:
    cam = np.array([[0.9, 0.8], [0.1, 0.0]])
    masks = [np.array([[1, 1], [0, 0]]), np.array([[0, 0], [1, 1]]), np.array([[1, 255], [0, 0]])]
    assert per_image_dice([cam] * 3, masks, 0.5).tolist() == [1.0, 0.0, 1.0]  # 255 is ignored
    assert per_image_dice([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5).tolist() == [0.0]
    assert pick_cases(np.array([0.3, 0.7, 0.1, 0.5, 0.9])) == {"best": 4, "median": 3, "worst": 2}
    assert pick_cases(np.array([])) == {}


def test_table_shows_the_evaluation_numbers_and_the_baseline(run: str, page: Path) -> None:
    html = page.read_text()
    summary = read_summary(run)
    assert set(summary) == {*MODELS, "centre-gaussian"}
    for label in MODELS:
        evaluation = json.loads(Path(evaluation_uri(run, label)).read_text())
        overall = evaluation["localization"]["overall"]
        assert summary[label]["PxAP"] == overall["pxap"]
        assert summary[label]["accuracy"] == evaluation["classification"]["accuracy"]
        row = re.search(rf"<tr><td>{label}</td>.*?</tr>", html).group(0)
        for value in (overall["pxap"], overall["max_box_acc_v2"], overall["off_target_share"]):
            assert f"<td>{value:.3f}</td>" in row
    assert 0.0 <= summary["centre-gaussian"]["PxAP"] <= 1.0
    assert "centre-gaussian" in html and "Stage timings" in html


def test_every_image_the_page_links_is_a_png_beside_it(page: Path) -> None:
    names = re.findall(r"<img src='([^']+)'", page.read_text())
    assert {"curves.png", "cases_0.png", "cases_1.png"} <= set(names)
    for name in names:
        assert "/" not in name
        with Image.open(page.parent / name) as image:
            assert image.format == "PNG" and image.width > 200
    assert not re.search(r"(src|href)=['\"](https?:)?//", page.read_text())  # nothing loaded from elsewhere


def test_page_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    def screenshot(target: Path, name: str) -> np.ndarray:
        shot = tmp_path / name
        command = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ]
        command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        command += [f"--user-data-dir={tmp_path / ('profile-' + name)}", f"--screenshot={shot}"]
        command += ["--window-size=1200,1400", target.as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert shot.is_file(), done.stderr[-2000:]
        return np.asarray(Image.open(shot).convert("L"), dtype=np.float32)

    assert Path(CHROMIUM).is_file(), (
        "Debian's chromium is missing: `make test` installs it (scripts/ensure-chromium)"
    )
    rendered = screenshot(page, "page.png")
    # The same page without its images: the rendered one differs where the plots are, so they loaded.
    bare = page.parent / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", page.read_text()))
    without = screenshot(bare, "bare.png")
    assert rendered.std() > 20  # not a blank page
    assert np.abs(rendered - without).mean() > 5


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
    assert set(read_summary(remote)) == {*MODELS, "centre-gaussian"}
    with s3.open_input_stream(f"{path}/report/curves.png") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_page_and_fails_in_one_line_without_a_run(
    run: str, page: Path, tmp_path: Path
) -> None:
    done = subprocess.run([ACOL, "report", "--run", run], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(page)
    missing = subprocess.run(
        [ACOL, "report", "--run", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"acol report: error: {tmp_path}: not a pipeline run (no run.json); run the pipeline or `make demo` first"
    ]
    shutil.rmtree(tmp_path, ignore_errors=True)
