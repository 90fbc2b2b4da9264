"""ACoL's cost: train-step time of ACoL / CAM on one backbone, and a co-attention pair step vs CAM.

A train step is forward + ``compute_loss(out, labels)["loss"].backward()`` + an SGD step on one fixed
batch (random images, half of each class). Ratios:

- ``acol_over_cam``: ACoL step / CAM step, same backbone, batch and input (target <= 1.25).
- ``coatt_pair_over_two_cam``: one ``coatt`` step on a pair (batch of 2) / two CAM steps on one image
  each: what pairing two images costs over seeing them one at a time.
- ``coatt_over_cam_batch``: ``coatt`` step / CAM step on the same batch (every image gets a partner).
- ``acol_over_cam_flops``: the same ratio in floating-point operations (forward + backward, counted by
  ``torch.utils.flop_counter``): what the architecture alone costs, whatever the hardware. ACoL runs two
  heads where CAM runs one; with VGG16's heads (two 3×3 convs at 1,024 channels each, the paper's) a head
  costs more than half the backbone, so the FLOP ratio is ~1.36 and no implementation meets 1.25.
  ``head_depth`` runs both models with lighter heads (1: one 3×3 conv, as wsolevaluation's CAM) to show
  the cost of that choice.
"""

from __future__ import annotations

from typing import Any

import torch

from acol_core.models import create_model

from .common import compare, ratio

__all__ = ["make_step", "run"]


def make_step(
    name: str,
    backbone: str,
    batch: int,
    size: int,
    device: torch.device,
    seed: int = 0,
    head_depth: int | None = None,
):
    """A closure running one train step of model ``name`` on a fixed random batch."""
    torch.manual_seed(seed)
    options = {} if head_depth is None else {"head_depth": head_depth}
    model = create_model(name, num_classes=2, in_channels=1, backbone=backbone, **options)
    model = model.to(device).train()
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


def step_flops(step) -> int:
    """Floating-point operations of one call of ``step`` (convolutions and matmuls, both passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run(
    backbone: str,
    batch: int,
    size: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    head_depth: int | None = None,
) -> dict[str, Any]:
    """Returns ``{"ratios": {...}, "details": {...}}``; with ``head_depth``, ACoL / CAM only."""
    cam = make_step("cam", backbone, batch, size, device, head_depth=head_depth)
    acol = make_step("acol", backbone, batch, size, device, head_depth=head_depth)
    flops = {"acol": step_flops(acol), "cam": step_flops(cam)}
    main = compare(acol, cam, warmup, repeats)
    details = {
        "backbone": backbone,
        "head_depth": head_depth if head_depth is not None else "default",
        "batch": batch,
        "input": size,
        "repeats": repeats,
        "acol_step_ms": 1000 * main.a_s,
        "cam_step_ms": 1000 * main.b_s,
        "acol_step_gflop": flops["acol"] / 1e9,
        "cam_step_gflop": flops["cam"] / 1e9,
        "cam_images_per_s": ratio(batch, main.b_s),
        "acol_images_per_s": ratio(batch, main.a_s),
    }
    ratios = {"acol_over_cam": main.ratio, "acol_over_cam_flops": ratio(flops["acol"], flops["cam"])}
    targets = {"acol_over_cam": "<= 1.25"}
    if head_depth is not None:
        return {"ratios": ratios, "targets": targets, "details": details}

    coatt_pair = make_step("coatt", backbone, 2, size, device)
    cam_single = make_step("cam", backbone, 1, size, device)
    pair = compare(coatt_pair, lambda: (cam_single(), cam_single()), warmup, repeats)

    coatt_batch = make_step("coatt", backbone, batch, size, device)
    same = compare(coatt_batch, cam, warmup, repeats)
    return {
        "ratios": {
            **ratios,
            "coatt_pair_over_two_cam": pair.ratio,
            "coatt_over_cam_batch": same.ratio,
        },
        "targets": targets,
        "details": {
            **details,
            "coatt_pair_step_ms": 1000 * pair.a_s,
            "two_cam_single_steps_ms": 1000 * pair.b_s,
            "coatt_batch_step_ms": 1000 * same.a_s,
        },
    }
