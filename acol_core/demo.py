"""`make demo`: the built-in MRI phantom end to end on this machine, no server needed.

    python -m acol_core.demo [--out runs/demo] [--epochs 15] [--subjects 100] [--size 96]

Generates the phantom into a Parquet dataset, trains each model (cam, acol, coatt, acol_coatt, and cam
with the shared-anatomy label) on the ``tiny`` backbone, scores it on the test split against the
centre-Gaussian baseline, and writes ``metrics.json`` and ``overlays.png`` under the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.metrics import center_gaussian_baseline
from acol_core.train import fit, iterate_minibatches, localization_metrics, predict, select_device
from acol_core.viz import save_overlay_grid

__all__ = ["main", "run_demo"]

# (row label, registered model, options): the four model families, and CAM with the shared-anatomy
# label, which asks whether explaining the skull by a class of its own takes the tumour map off it.
MODELS: tuple[tuple[str, str, dict], ...] = (
    ("cam", "cam", {}),
    ("acol", "acol", {"delta": 0.6}),
    ("coatt", "coatt", {"pair_policy": "different"}),
    ("acol_coatt", "acol_coatt", {"delta": 0.6, "pair_policy": "different"}),
    ("cam+anatomy", "cam", {"shared_anatomy": True}),
)
COLUMNS = ("accuracy", "pxap", "max_box_acc_v2", "dice", "off_target")


def _load(uri: str, size: int) -> dict[str, dict[str, np.ndarray]]:
    dataset = open_dataset(uri)
    return {
        split: table_to_arrays(dataset.read_table(split=split), 1, size) for split in ("train", "val", "test")
    }


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'model':<18}" + "".join(f"{c:>16}" for c in COLUMNS)]
    for name, metrics in rows.items():
        cells = "".join(f"{metrics[c]:>16.3f}" if c in metrics else f"{'-':>16}" for c in COLUMNS)
        lines.append(f"{name:<18}{cells}")
    return "\n".join(lines)


def run_demo(out: Path, epochs: int, subjects: int, slices: int = 8, size: int = 96, seed: int = 0) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_uri = str(out / "data")
    prepare_dataset(
        "phantom", data_uri, seed=seed, num_subjects=subjects, slices_per_subject=slices, size=size
    )
    splits = _load(data_uri, size)
    sizes = ", ".join(f"{k}={len(v['label'])}" for k, v in splits.items())
    print(f"dataset: {data_uri} ({sizes})", flush=True)

    device = select_device()
    results: dict[str, dict[str, float]] = {}
    test_cams: dict[str, np.ndarray] = {}
    for name, model_name, options in MODELS:
        config = TrainConfig(
            model=model_name, model_options=options, epochs=epochs, image_size=size, seed=seed
        )
        t0 = time.perf_counter()
        result = fit(
            config,
            train_batches=lambda epoch, c=config: iterate_minibatches(
                splits["train"], c.batch_size, np.random.default_rng([c.seed, epoch]), augment=c.augment
            ),
            val_batches=lambda c=config: iterate_minibatches(splits["val"], 64, None, augment=False),
        )
        pred = predict(result.model, iterate_minibatches(splits["test"], 64, None, augment=False), device)
        metrics = localization_metrics(pred)
        metrics["train_seconds"] = time.perf_counter() - t0
        results[name] = metrics
        test_cams[name] = pred["cam"]
        print(
            f"trained {name}: {metrics['train_seconds']:.0f}s, test accuracy {metrics['accuracy']:.3f}",
            flush=True,
        )

    test = splits["test"]
    baseline = {"cam": center_gaussian_baseline(len(test["label"]), size, size), "pred": test["label"]}
    baseline.update({k: test[k] for k in ("label", "mask", "anatomy_mask")})
    results["centre-gaussian"] = {k: v for k, v in localization_metrics(baseline).items() if k != "accuracy"}

    tumour = np.flatnonzero((test["mask"] == 1).reshape(len(test["mask"]), -1).any(1))
    pick = tumour[np.linspace(0, len(tumour) - 1, num=min(8, len(tumour))).astype(int)]
    grid = save_overlay_grid(
        out / "overlays.png",
        test["image"][pick][:, 0],
        test["mask"][pick],
        {name: cams[pick] for name, cams in test_cams.items()},
        titles=[str(test["image_id"][i]) for i in pick],
    )
    summary = {
        "dataset": data_uri,
        "epochs": epochs,
        "models": results,
        "seconds": time.perf_counter() - started,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print()
    print(_table(results))
    print(f"\nmetrics: {out / 'metrics.json'}\noverlays: {grid}\ntotal: {summary['seconds']:.0f}s")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    run_demo(args.out, args.epochs, args.subjects, args.slices, args.size)


if __name__ == "__main__":
    main()
