"""The exported model: one self-describing ``.safetensors`` file.

Weights are safetensors tensors; the header's metadata carries one JSON document with everything
``localize`` needs (model name and options, backbone, class names, input size, channel count,
normalisation). Loading parses JSON and raw tensors only: nothing is ever unpickled.

Examples:
    >>> path = export_model(model, config, ["healthy", "tumour"], "runs/x/model.safetensors")  # doctest: +SKIP
    >>> model, info = load_exported("runs/x/model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from acol_core.config import TrainConfig
from acol_core.data.transforms import describe_norm
from acol_core.errors import UserError

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_FILE",
    "ExportError",
    "ExportedInfo",
    "export_bytes",
    "export_model",
    "load_exported",
    "read_export_info",
]

EXPORT_FORMAT = "acol-flow/model/v1"
MODEL_FILE = "model.safetensors"  # the export's name inside a training checkpoint and a study cell
_KEY = "acol_flow"


class ExportError(UserError, ValueError):
    """The file is not an acol-flow model export (or is damaged)."""


@dataclass(frozen=True)
class ExportedInfo:
    config: TrainConfig
    class_names: list[str]
    normalization: str
    extra: dict[str, Any]
    # The name ``standardize`` takes; exports written before it was recorded used the phantom's.
    input_norm: str = "phantom"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def export_bytes(model: nn.Module, config: TrainConfig, class_names: list[str], **extra: Any) -> bytes:
    if len(class_names) != config.num_classes:
        raise ExportError(f"{len(class_names)} class names for a model with {config.num_classes} classes")
    info = {
        "format": EXPORT_FORMAT,
        "config": config.to_dict(),
        "class_names": list(class_names),
        "input_size": config.image_size,
        "in_channels": config.channels,
        "normalization": describe_norm(config.effective_input_norm),
        "input_norm": config.effective_input_norm,
        "extra": extra,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    return st_save(tensors, metadata={_KEY: json.dumps(info)})


def export_model(
    model: nn.Module, config: TrainConfig, class_names: list[str], uri: str, **extra: Any
) -> str:
    """Write the export to ``uri`` (local path or s3://) atomically; returns the URI."""
    from acol_core.storage import write_bytes

    write_bytes(uri, export_bytes(model, config, class_names, **extra))
    return uri


def _parse_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ExportError("file too short to be a safetensors model export")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or 8 + size > len(data):
        raise ExportError("not a safetensors file (bad header length) or truncated")
    try:
        header = json.loads(data[8 : 8 + size])
        info = json.loads(header["__metadata__"][_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError("not an acol-flow model export (no acol_flow metadata)") from exc
    if info.get("format") != EXPORT_FORMAT:
        raise ExportError(f"unsupported export format {info.get('format')!r}, expected {EXPORT_FORMAT}")
    _check_length(header, len(data) - 8 - size)
    return info


def _check_length(header: dict[str, Any], body: int) -> None:
    """The tensors' byte ranges must cover the rest of the file exactly: a cut file fails here, where
    the header alone is read (the driver's checks), not later in every worker that loads it."""
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ExportError("not a safetensors file (bad tensor entry in the header)") from exc
    if end != body:
        what = "is truncated" if end > body else "has trailing bytes"
        raise ExportError(f"damaged model export: the file {what} ({body} data bytes, tensors need {end})")


def read_export_info(data: bytes) -> ExportedInfo:
    info = _parse_header(data)
    return ExportedInfo(
        config=TrainConfig.from_dict(info["config"]),
        class_names=list(info["class_names"]),
        normalization=info["normalization"],
        extra=dict(info.get("extra", {})),
        input_norm=str(info.get("input_norm", "phantom")),
    )


def load_exported(
    uri_or_bytes: str | bytes, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ExportedInfo]:
    """Build the model the file describes and load its weights (strict)."""
    from acol_core.models import create_model
    from acol_core.storage import read_bytes

    data = uri_or_bytes if isinstance(uri_or_bytes, bytes) else read_bytes(uri_or_bytes)
    info = read_export_info(data)
    cfg = info.config
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise ExportError(f"damaged model export: {exc}") from exc
    model = create_model(
        cfg.model,
        num_classes=cfg.num_classes,
        in_channels=cfg.channels,
        backbone=cfg.backbone,
        **cfg.model_options,
    )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"weights do not match the described model: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval(), info
