"""Sources: readers that turn an input (folder, metadata files, volumes, the phantom) into Records.

``get_source(name, **options)`` is the one way the CLI, the flow and tests build a source by name.

Examples:
    >>> src = get_source("phantom", num_subjects=1, slices_per_subject=2, size=64)
    >>> src.class_names
    ('healthy', 'tumour')
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from acol_core.data.sources.base import (
    DataSourceError,
    InputError,
    InputRef,
    InputRoot,
    Source,
    SourceBase,
    binarize_mask,
)

__all__ = [
    "SOURCES",
    "DataSourceError",
    "InputError",
    "InputRef",
    "InputRoot",
    "Source",
    "SourceBase",
    "binarize_mask",
    "get_source",
    "source_names",
    "source_option_names",
]

# name -> "module:Class", imported on use so that e.g. the phantom never imports nibabel.
SOURCES: dict[str, str] = {
    "phantom": "acol_core.data.sources.phantom:PhantomSource",
    "imagefolder": "acol_core.data.sources.imagefolder:ImageFolderSource",
    "wsol-metadata": "acol_core.data.sources.wsol_metadata:WsolMetadataSource",
    "nifti": "acol_core.data.sources.nifti:NiftiSource",
}


def source_names() -> list[str]:
    return sorted(SOURCES)


def _source_class(name: str) -> type:
    if name not in SOURCES:
        raise DataSourceError(f"unknown source {name!r}; choose from {', '.join(source_names())}")
    module, _, cls = SOURCES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _accepted_options(cls: type) -> set[str] | None:
    """Keyword names the source accepts; None when it takes **kwargs (checked by the source)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        fields = getattr(cls, "option_names", None)
        return set(fields()) if callable(fields) else None
    return {p.name for p in params if p.name != "self"}


def source_option_names(name: str) -> set[str] | None:
    """The options ``get_source(name, ...)`` accepts (None: not known up front)."""
    return _accepted_options(_source_class(name))


def get_source(name: str, **options: Any) -> Source:
    """Build the source registered as ``name`` with its options (None values are dropped).

    Raises:
        DataSourceError: unknown name, unknown option, or an input that cannot be used at all.
    """
    cls = _source_class(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = _accepted_options(cls)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise DataSourceError(
            f"source {name!r} has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"source {name!r}: {exc}") from exc
