"""Model and backbone registries with timm-style factories: flows, sweeps and the CLI name models by string.

A model builder takes the built backbone, the class count and keyword-only options, and returns a
`WsolModel`; `create_model` checks the options against the builder's signature before building.

Examples:
    >>> model = create_model("acol", num_classes=2, in_channels=1, backbone="tiny", delta=0.7)
    >>> model.config["delta"]
    0.7
    >>> create_model("coatt", num_classes=2, pair_policy="same", shared_anatomy=True).num_outputs
    3
    >>> @register_model("my_head")  # doctest: +SKIP
    ... def my_head(backbone, num_classes, *, width=64): ...
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .backbones import Backbone, ResNet50Backbone, TinyBackbone, Vgg16Backbone
from .pretrained import load_pretrained

if TYPE_CHECKING:
    from .heads import WsolModel

__all__ = [
    "check_model_options",
    "create_backbone",
    "create_model",
    "list_backbones",
    "list_models",
    "register_backbone",
    "register_model",
]

ModelBuilder = Callable[..., "WsolModel"]
BackboneBuilder = Callable[[int], Backbone]
_F = TypeVar("_F", bound=Callable[..., Any])

_MODELS: dict[str, ModelBuilder] = {}
_BACKBONES: dict[str, BackboneBuilder] = {
    "resnet50": ResNet50Backbone,
    "tiny": TinyBackbone,
    "vgg16": Vgg16Backbone,
}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator: register `builder(backbone, num_classes, **options) -> WsolModel` under `name`."""
    return _register(_MODELS, "model", name)


def register_backbone(name: str) -> Callable[[_F], _F]:
    """Decorator: register `builder(in_channels) -> Backbone` under `name`."""
    return _register(_BACKBONES, "backbone", name)


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_BACKBONES)


def create_backbone(
    name: str, in_channels: int = 1, pretrained: str | os.PathLike[str] | None = None
) -> Backbone:
    """Build backbone `name` for `in_channels` inputs, optionally loading local torchvision weights."""
    backbone = _lookup(_BACKBONES, "backbone", name)(int(in_channels))
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    backbone: str = "tiny",
    *,
    pretrained: str | os.PathLike[str] | None = None,
    **options: Any,
) -> WsolModel:
    """Build model `name` on backbone `backbone`.

    Args:
        name: a name from `list_models()`.
        num_classes: number of image-level classes.
        in_channels: input channel count.
        backbone: a name from `list_backbones()`.
        pretrained: optional local torchvision-format weights file for the backbone.
        options: model options (e.g. `delta`, `head_width`, `head_depth`, `shared_anatomy`, and for the
            co-attention models `pair_policy`, `w_common`, ...); unknown ones raise TypeError.

    The returned model carries `model.config`, a plain dict with which `create_model(**model.config)`
    rebuilds the same architecture (the weights file is not part of it).
    """
    builder = _lookup(_MODELS, "model", name)
    _check_options(name, builder, options)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    net = create_backbone(backbone, in_channels, pretrained)
    model = builder(net, int(num_classes), **options)
    model.config = {
        "name": name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "backbone": backbone,
        **options,
    }
    return model


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Raise as ``create_model`` would for an unknown model or option, without building anything."""
    _check_options(name, _lookup(_MODELS, "model", name), options)


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[_F], _F]:
    def decorator(builder: _F) -> _F:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = builder
        return builder

    return decorator


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(table))}")
    return table[name]


def _check_options(name: str, builder: ModelBuilder, options: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
