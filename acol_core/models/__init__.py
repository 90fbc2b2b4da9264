"""Backbones, class-map heads (CAM, ACoL, co-attention, ACoL + co-attention) and the registry.

Examples:
    >>> from acol_core.models import create_model, list_models
    >>> list_models()
    ['acol', 'acol_coatt', 'cam', 'coatt']
    >>> model = create_model("acol", num_classes=2, in_channels=1, backbone="tiny", delta=0.6)
    >>> model = create_model("coatt", num_classes=2, in_channels=1, backbone="tiny", pair_policy="same")
"""

from __future__ import annotations

from .backbones import Backbone, ResNet50Backbone, TinyBackbone, Vgg16Backbone
from .coattention import (
    INFER_MAPS,
    PAIR_POLICIES,
    AcolCoattModel,
    CoAttention,
    CoattModel,
    attend,
    coattention_efficient,
    coattention_naive,
    contrastive_features,
    pair_partners,
    pair_targets,
    sample_partners,
)
from .erase import (
    ANATOMY_MODES,
    FUSIONS,
    check_shared_anatomy,
    competition_masks,
    competitive_pool,
    erase_features,
    erase_mask,
    fuse_maps,
    fuse_max,
    normalize_maps,
    select_class_maps,
)
from .heads import AcolModel, CamModel, ClassMapHead, WsolModel, multi_hot_targets
from .pretrained import adapt_first_conv, load_pretrained
from .registry import (
    check_model_options,
    create_backbone,
    create_model,
    list_backbones,
    list_models,
    register_backbone,
    register_model,
)

__all__ = [
    "ANATOMY_MODES",
    "INFER_MAPS",
    "check_model_options",
    "check_shared_anatomy",
    "competition_masks",
    "competitive_pool",
    "PAIR_POLICIES",
    "AcolCoattModel",
    "AcolModel",
    "Backbone",
    "CamModel",
    "ClassMapHead",
    "CoAttention",
    "CoattModel",
    "ResNet50Backbone",
    "TinyBackbone",
    "Vgg16Backbone",
    "WsolModel",
    "adapt_first_conv",
    "attend",
    "coattention_efficient",
    "coattention_naive",
    "contrastive_features",
    "create_backbone",
    "create_model",
    "erase_features",
    "erase_mask",
    "FUSIONS",
    "fuse_maps",
    "fuse_max",
    "list_backbones",
    "list_models",
    "load_pretrained",
    "multi_hot_targets",
    "normalize_maps",
    "pair_partners",
    "pair_targets",
    "register_backbone",
    "register_model",
    "sample_partners",
    "select_class_maps",
]
