"""Measure the class-balance recipe on the phantom's ``imbalanced`` preset, in one process (one thread).

    .venv/bin/python scripts/imbalanced_recipe.py --mode sampler --size 64 --epochs 12 --seed 0

Prints one line per epoch and a final JSON line: the last and the selected epoch's val tumour recall,
balanced accuracy and PxAP, and the final model's test tumour recall and balanced accuracy (the test
split: 13 tumour slices, never used for a choice). The dataset is prepared once (seed 1) under ``--data``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from acol_core.balance import apply_class_balance, train_class_counts
from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.selection import select_epoch
from acol_core.train import classification_metrics, fit, iterate_minibatches, predict

KEYS = ("val_recall_1", "val_balanced_accuracy", "val_pxap")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/tmp/imb_data")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--augment", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order-seed", type=int, default=5)
    parser.add_argument("--model", default="cam")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not os.path.exists(os.path.join(args.data, "_manifest.json")):
        prepare_dataset("phantom", args.data, seed=1, preset="imbalanced")
    dataset = open_dataset(args.data)
    counts = train_class_counts(dataset.manifest.counts["split_class"], dataset.class_names)
    train = table_to_arrays(dataset.read_table("train"), 1, args.size)
    val = table_to_arrays(dataset.read_table("val"), 1, args.size)
    test = table_to_arrays(dataset.read_table("test"), 1, args.size)
    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        image_size=args.size,
        augment=bool(args.augment),
        seed=args.seed,
        class_balance=args.mode,
    )
    config, decision = apply_class_balance(config, counts)
    started = time.perf_counter()

    def train_batches(epoch: int):
        rng = np.random.default_rng([args.order_seed, epoch] if args.seed == 0 else [args.seed, 5, epoch])
        return iterate_minibatches(
            train, config.batch_size, rng, config.augment, sampling_factors=config.sampling_factors
        )

    def hook(epoch, metrics, state):
        print({k: round(v, 3) for k, v in metrics.items() if k in ("epoch", "train_loss", *KEYS)}, flush=True)

    result = fit(
        config,
        train_batches=train_batches,
        val_batches=lambda: iterate_minibatches(val, 64, None, False),
        hooks=[hook],
    )
    chosen = select_epoch(result.history)
    last, kept = result.history[-1], result.history[chosen.index]
    pred = predict(result.model, iterate_minibatches(test, 64, None, False), torch.device("cpu"))
    tested = classification_metrics(pred["pred"], pred["label"], 2)
    print(
        json.dumps(
            {
                "args": vars(args),
                "method": decision.method,
                "seconds": round(time.perf_counter() - started),
                "last": {k: round(last[k], 3) for k in KEYS},
                "selected_epoch": chosen.epoch,
                "selected": {k: round(kept[k], 3) for k in KEYS},
                "test_last": {k: round(tested[k], 3) for k in ("recall_1", "balanced_accuracy")},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
