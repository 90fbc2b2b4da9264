"""Load torchvision-format weights into a backbone, from a local path or a storage URI (s3://).

A URI is fetched once per node into a cache (``fetch_pretrained``): every Ray Train worker builds its
model from the file, and on a cluster no node shares another's disk. Nothing is ever downloaded from
the internet: the weights are where the user put them.

The file is a plain state dict (`torch.save(model.state_dict(), path)`, e.g. torchvision's
`vgg16-397923af.pth` or `resnet50-0676ba61.pth`) or a `.safetensors` file with the same keys. Classifier
keys (`classifier.*` for VGG, `fc.*` for ResNet) are dropped; every other key must match the backbone
exactly, name and shape, or a ValueError names the culprits.

Examples:
    >>> net = load_pretrained(Vgg16Backbone(in_channels=1), "weights/vgg16-397923af.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .backbones import Backbone

__all__ = [
    "CACHE_ENV",
    "adapt_first_conv",
    "check_pretrained",
    "fetch_pretrained",
    "load_pretrained",
    "map_state_dict",
    "pretrained_cache_dir",
    "read_state_dict",
]

# Where fetched weights are cached on each node (default ~/.cache/acol-flow/pretrained).
CACHE_ENV = "ACOL_PRETRAINED_CACHE"
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# BatchNorm fills this counter itself when a checkpoint (older torchvision) lacks it.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def pretrained_cache_dir() -> Path:
    """The node-local cache folder: ``$ACOL_PRETRAINED_CACHE``, else ``~/.cache/acol-flow/pretrained``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "acol-flow" / "pretrained"


def _is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def check_pretrained(location: str | os.PathLike[str]) -> None:
    """Raise FileNotFoundError (one line) when the weights are not where the config says.

    The driver calls this before starting workers, so a typo fails at once and not in every worker.
    """
    from acol_core import storage

    location = os.fspath(location)
    if _is_uri(location):
        if not storage.exists(location):
            raise FileNotFoundError(f"no pretrained weights at {location!r}")
    elif not os.path.isfile(location.removeprefix("file://")):
        raise FileNotFoundError(f"no pretrained weights file at {location!r}")


def fetch_pretrained(
    location: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """A local path holding the weights at ``location`` (a path, or a URI fetched once into the cache).

    The cache file is named by the SHA-256 of the URI and keeps its suffix (which decides the reader);
    it is written to a temporary sibling and renamed, so workers on one node racing for it never read
    half a file. A cached copy whose size differs from the stored object's (the object was replaced) is
    fetched again.
    """
    from acol_core import storage

    location = os.fspath(location)
    if not _is_uri(location):
        return location.removeprefix("file://")
    folder = Path(cache_dir) if cache_dir is not None else pretrained_cache_dir()
    suffix = next((s for s in _SUFFIXES if location.endswith(s)), ".pt")
    target = folder / (hashlib.sha256(location.encode()).hexdigest() + suffix)
    fs, path = storage.resolve(location)
    try:
        size = fs.get_file_info(path).size
    except OSError as exc:
        raise FileNotFoundError(f"cannot look up pretrained weights at {location!r}: {exc}") from exc
    if size is None:
        raise FileNotFoundError(f"no pretrained weights at {location!r}")
    if target.is_file() and target.stat().st_size == size:
        return str(target)
    data = storage.read_bytes(location)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)


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
    """Load the weights at `path` (a local file or a URI, see ``fetch_pretrained``) into `backbone`
    (in place) and return it.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: unreadable file, or keys/shapes that do not fit (nothing is loaded then).
    """
    mapped = map_state_dict(backbone, read_state_dict(fetch_pretrained(path)))
    backbone.load_state_dict(mapped, strict=True)
    return backbone


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"
