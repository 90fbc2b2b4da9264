"""Load local torchvision-format weights into a backbone. Never downloads.

The file is a plain state dict (`torch.save(model.state_dict(), path)`, e.g. torchvision's
`vgg16-397923af.pth` or `resnet50-0676ba61.pth`) or a `.safetensors` file with the same keys. Classifier
keys (`classifier.*` for VGG, `fc.*` for ResNet) are dropped; every other key must match the backbone
exactly, name and shape, or a ValueError names the culprits.

Examples:
    >>> net = load_pretrained(Vgg16Backbone(in_channels=1), "weights/vgg16-397923af.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from .backbones import Backbone

__all__ = ["adapt_first_conv", "load_pretrained", "map_state_dict", "read_state_dict"]

# BatchNorm fills this counter itself when a checkpoint (older torchvision) lacks it.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a `.pt`/`.pth` (torch.load, weights only) or `.safetensors` file on CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pretrained weights file at {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader error means the file is not usable weights
        raise ValueError(f"cannot read weights from {path!r}: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path!r} does not hold a flat state dict of name -> tensor")
    return dict(state)


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Turn an RGB first-conv kernel (out×3×k×k) into one for `in_channels` inputs.

    The RGB kernels are averaged and repeated over the new channels, scaled by 3 / in_channels, so an
    input whose channels are all equal to a grey image gives exactly the response the RGB network gives
    to that grey image replicated to RGB: activation magnitudes stay where the pretrained layers expect.
    """
    if weight.dim() != 4:
        raise ValueError(f"first conv weight must be 4-D, got shape {tuple(weight.shape)}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, int(in_channels), 1, 1) * (weight.shape[1] / int(in_channels))


def map_state_dict(backbone: Backbone, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a torchvision-format state dict onto `backbone`'s keys; strict about everything kept.

    Drops the backbone's `ignored_prefixes` (classifier keys), adapts the first conv when the input
    channel counts differ, and raises ValueError listing missing, unexpected or mis-shaped keys.
    """
    kept = {k: v for k, v in state.items() if not k.startswith(backbone.ignored_prefixes)}
    own = backbone.state_dict()
    first = backbone.first_conv_key
    if first in kept and first in own and kept[first].dim() == 4:
        if kept[first].shape[1] != own[first].shape[1]:
            kept[first] = adapt_first_conv(kept[first], own[first].shape[1])
    missing = sorted(k for k in own if k not in kept and not k.endswith(_OPTIONAL_SUFFIXES))
    unexpected = sorted(k for k in kept if k not in own)
    mis_shaped = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if k in own and v.shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches {_preview(mis_shaped)}")
    if problems:
        raise ValueError(f"weights do not fit backbone {type(backbone).__name__}: " + "; ".join(problems))
    return kept


def load_pretrained(backbone: Backbone, path: str | os.PathLike[str]) -> Backbone:
    """Load the local weights file at `path` into `backbone` (in place) and return it.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: unreadable file, or keys/shapes that do not fit (nothing is loaded then).
    """
    mapped = map_state_dict(backbone, read_state_dict(path))
    backbone.load_state_dict(mapped, strict=True)
    return backbone


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"
