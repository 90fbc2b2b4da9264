"""Backbones, class-map heads (CAM, ACoL) and the registry: `create_model(name, num_classes, ...)`.

Examples:
    >>> from acol_core.models import create_model, list_models
    >>> list_models()
    ['acol', 'cam']
    >>> model = create_model("acol", num_classes=2, in_channels=1, backbone="tiny", delta=0.6)
"""

from __future__ import annotations

from .backbones import Backbone, ResNet50Backbone, TinyBackbone, Vgg16Backbone
from .erase import erase_features, erase_mask, fuse_max, normalize_maps, select_class_maps
from .heads import AcolModel, CamModel, ClassMapHead, WsolModel
from .pretrained import adapt_first_conv, load_pretrained
from .registry import (
    create_backbone,
    create_model,
    list_backbones,
    list_models,
    register_backbone,
    register_model,
)

__all__ = [
    "AcolModel",
    "Backbone",
    "CamModel",
    "ClassMapHead",
    "ResNet50Backbone",
    "TinyBackbone",
    "Vgg16Backbone",
    "WsolModel",
    "adapt_first_conv",
    "create_backbone",
    "create_model",
    "erase_features",
    "erase_mask",
    "fuse_max",
    "list_backbones",
    "list_models",
    "load_pretrained",
    "normalize_maps",
    "register_backbone",
    "register_model",
    "select_class_maps",
]
