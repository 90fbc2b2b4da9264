"""ACoL's cost: train-step time of ACoL / CAM on one backbone, and a co-attention pair step vs CAM.

A train step is forward + ``compute_loss(out, labels)["loss"].backward()`` + an SGD step on one fixed
batch (random images, half of each class). Ratios:

- ``acol_over_cam``: ACoL step / CAM step, same backbone, batch and input (target <= 1.25).
- ``coatt_pair_over_two_cam``: one ``coatt`` step on a pair (batch of 2) / two CAM steps on one image
  each: what pairing two images costs over seeing them one at a time.
- ``coatt_over_cam_batch``: ``coatt`` step / CAM step on the same batch (every image gets a partner).
"""

from __future__ import annotations

from typing import Any

import torch

from acol_core.models import create_model

from .common import compare, ratio

__all__ = ["make_step", "run"]


def make_step(name: str, backbone: str, batch: int, size: int, device: torch.device, seed: int = 0):
    """A closure running one train step of model ``name`` on a fixed random batch."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=2, in_channels=1, backbone=backbone).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 1, size, size, device=device)
    labels = (torch.arange(batch, device=device) % 2).long()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(images, labels)
        model.compute_loss(out, labels)["loss"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def run(
    backbone: str, batch: int, size: int, device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """Returns ``{"ratios": {...}, "details": {...}}``."""
    cam = make_step("cam", backbone, batch, size, device)
    acol = make_step("acol", backbone, batch, size, device)
    main = compare(acol, cam, warmup, repeats)

    coatt_pair = make_step("coatt", backbone, 2, size, device)
    cam_single = make_step("cam", backbone, 1, size, device)
    pair = compare(coatt_pair, lambda: (cam_single(), cam_single()), warmup, repeats)

    coatt_batch = make_step("coatt", backbone, batch, size, device)
    same = compare(coatt_batch, cam, warmup, repeats)
    return {
        "ratios": {
            "acol_over_cam": main.ratio,
            "coatt_pair_over_two_cam": pair.ratio,
            "coatt_over_cam_batch": same.ratio,
        },
        "targets": {"acol_over_cam": "<= 1.25"},
        "details": {
            "backbone": backbone,
            "batch": batch,
            "input": size,
            "repeats": repeats,
            "acol_step_ms": 1000 * main.a_s,
            "cam_step_ms": 1000 * main.b_s,
            "coatt_pair_step_ms": 1000 * pair.a_s,
            "two_cam_single_steps_ms": 1000 * pair.b_s,
            "coatt_batch_step_ms": 1000 * same.a_s,
            "cam_images_per_s": ratio(batch, main.b_s),
            "acol_images_per_s": ratio(batch, main.a_s),
        },
    }
