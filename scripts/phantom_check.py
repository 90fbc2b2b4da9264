"""Does a phantom preset do what it claims? Plain CAM's accuracy, PxAP and off-target share on it, per seed.

    .venv/bin/python scripts/phantom_check.py --presets standard skull-shortcut --seeds 0 1 2 \\
        --out runs/phantom_check.json

Per (preset, seed): prepares the phantom preset with the demo's sizes (100 subjects × 8 slices, 96 px,
20 fullsup rows per class; the seed drives the phantom and the split, as in the pipeline) under
``--data`` (reused when there), trains the tiny-backbone ``cam`` in this process for the demo's 12 epochs at
lr 0.02, batch 16, and scores the test split: accuracy, balanced accuracy and per-class recall on every row;
PxAP, MaxBoxAccV2 and off-target share (CAM mass on scalp + skull) of the ground-truth class map on the
tumour rows. Also the preset's tumour share per split. One JSON line per run on stdout; ``--out`` writes
them all as a JSON list. ``--threads`` bounds torch's threads (1 on a shared machine). ``--option KEY=VALUE``
(repeatable) overrides one of the preset's phantom options, e.g. ``--option healthy_level_bias=0.3``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.train import fit, iterate_minibatches, localization_metrics, predict

__all__ = ["check", "main"]


def _options(pairs: list[str]) -> dict[str, float]:
    """``KEY=VALUE`` phantom overrides; integral values stay integers (sizes, counts)."""
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option wants KEY=VALUE, got {pair!r}")
        number = float(value)
        out[key] = int(number) if number.is_integer() and "." not in value else number
    return out


def _splits(data_uri: str, preset: str, seed: int, args: argparse.Namespace) -> dict[str, dict]:
    if not Path(data_uri, "_manifest.json").exists():
        prepare_dataset(
            "phantom",
            data_uri,
            seed=seed,
            fullsup_per_class=args.fullsup_per_class,
            preset=preset,
            num_subjects=args.subjects,
            slices_per_subject=args.slices,
            size=args.size,
            **_options(args.option),
        )
    dataset = open_dataset(data_uri)
    return {s: table_to_arrays(dataset.read_table(split=s), 1, args.size) for s in ("train", "val", "test")}


def _recalls(pred: np.ndarray, label: np.ndarray) -> list[float]:
    return [float((pred[label == c] == c).mean()) if (label == c).any() else 0.0 for c in (0, 1)]


def check(preset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train CAM on one (preset, seed) and score its test split."""
    tag = "".join(f"-{o}" for o in sorted(args.option))
    splits = _splits(str(Path(args.data, f"{preset}{tag}-s{seed}")), preset, seed, args)
    config = TrainConfig(
        model="cam",
        epochs=args.epochs,
        image_size=args.size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        num_threads=args.threads,
    )
    started = time.perf_counter()
    result = fit(
        config,
        train_batches=lambda epoch: iterate_minibatches(
            splits["train"], config.batch_size, np.random.default_rng([seed, epoch]), augment=config.augment
        ),
    )
    test = splits["test"]
    pred = predict(result.model, iterate_minibatches(test, 64, None, augment=False), torch.device("cpu"))
    metrics = localization_metrics(pred)
    recalls = _recalls(pred["pred"], pred["label"])
    row: dict[str, Any] = {
        "preset": preset,
        "options": _options(args.option),
        "seed": seed,
        "train_s": round(time.perf_counter() - started, 1),
        "tumour_share": {s: round(float(a["label"].mean()), 3) for s, a in splits.items()},
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": float(np.mean(recalls)),
        "recall_healthy": recalls[0],
        "recall_tumour": recalls[1],
        **{k: metrics[k] for k in ("pxap", "max_box_acc_v2", "off_target") if k in metrics},
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["standard", "skull-shortcut"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default="runs/phantom_check", help="datasets are prepared here once")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fullsup-per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="phantom option KEY=VALUE (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            rows.append(check(preset, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
