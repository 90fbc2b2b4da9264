"""ACoL on the MRI phantom: test PxAP of branch A, branch B and every fusion, per erase threshold δ and seed.

    .venv/bin/python scripts/acol_fusion_study.py --deltas 0.6 0.75 0.85 0.9 0.95 --seeds 0 1 2

Trains one `acol` model (tiny backbone, in this process) per (δ, seed) on the demo's phantom (100
subjects × 8 slices, 96 px, split by subject) and scores the tumour-class maps of the test tumour slices.
Fusion is inference-only, so one trained model gives every fusion's figure. Prints one JSON line per model
and a table of median PxAP over seeds; ``--out`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from acol_core.config import TrainConfig
from acol_core.data.prepare import prepare_dataset
from acol_core.data.shards import open_dataset
from acol_core.data.transforms import table_to_arrays
from acol_core.localize import normalize_cam, resize_map
from acol_core.models import FUSIONS, fuse_maps, normalize_maps, select_class_maps
from acol_core.train import fit, iterate_minibatches, localization_metrics

__all__ = ["main", "study"]


def _maps(model: torch.nn.Module, test: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Normalised test maps at image size: branch A, branch B, and each fusion of the two."""
    parts: dict[str, list[np.ndarray]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(test["label"]), 64):
            images = torch.as_tensor(test["image"][start : start + 64]).float()
            labels = torch.as_tensor(test["label"][start : start + 64]).long()
            out = model(images, labels)
            a, b = (select_class_maps(out["maps"][k].float(), labels) for k in ("a", "b"))
            maps = {"A": normalize_maps(a), "B": normalize_maps(b)}
            maps |= {f"fused_{fusion}": fuse_maps(a, b, fusion) for fusion in FUSIONS if fusion != "a"}
            for key, value in maps.items():
                parts.setdefault(key, []).append(normalize_cam(resize_map(value.numpy(), (size, size))))
    return {k: np.concatenate(v) for k, v in parts.items()}


def study(
    data_uri: str, deltas: list[float], seeds: list[int], epochs: int, size: int, subjects: int, slices: int
) -> list[dict]:
    if not Path(data_uri, "_manifest.json").exists():
        prepare_dataset(
            "phantom", data_uri, seed=0, num_subjects=subjects, slices_per_subject=slices, size=size
        )
    dataset = open_dataset(data_uri)
    splits = {s: table_to_arrays(dataset.read_table(split=s), 1, size) for s in ("train", "val", "test")}
    test = splits["test"]
    rows = []
    for delta in deltas:
        for seed in seeds:
            config = TrainConfig(
                model="acol", model_options={"delta": delta}, epochs=epochs, image_size=size, seed=seed
            )
            started = time.perf_counter()
            result = fit(
                config,
                train_batches=lambda epoch, c=config: iterate_minibatches(
                    splits["train"], c.batch_size, np.random.default_rng([c.seed, epoch]), augment=c.augment
                ),
                val_batches=lambda: iterate_minibatches(splits["val"], 64, None, augment=False),
            )
            row: dict = {"delta": delta, "seed": seed, "train_s": round(time.perf_counter() - started, 1)}
            for name, cams in _maps(result.model, test, size).items():
                pred = {
                    "cam": cams,
                    "pred": test["label"],
                    **{k: test[k] for k in ("label", "mask", "anatomy_mask")},
                }
                metrics = localization_metrics(pred)
                row[name] = {k: round(metrics[k], 3) for k in ("pxap", "max_box_acc_v2", "off_target")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    columns = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    lines = [f"{'delta':>6} {'seeds':>5} " + " ".join(f"{c:>12}" for c in columns) + "   (median test PxAP)"]
    for delta in sorted({r["delta"] for r in rows}):
        group = [r for r in rows if r["delta"] == delta]
        cells = " ".join(f"{statistics.median(r[c]['pxap'] for r in group):>12.3f}" for c in columns)
        lines.append(f"{delta:>6.2f} {len(group):>5} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="runs/study/data", help="phantom dataset (generated if missing)")
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.6, 0.75, 0.85, 0.9, 0.95])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args(argv)
    rows = study(args.data, args.deltas, args.seeds, args.epochs, args.size, args.subjects, args.slices)
    print(_table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
