"""The built-in MRI phantom as a source: one input per slice, ids ``phantom/sub-0000/z003``.

Options are ``PhantomConfig``'s fields plus ``preset`` (a name of ``PHANTOM_PRESETS``: ``standard``,
``imbalanced``, ``skull-shortcut``), e.g. ``acol prepare --source phantom -o preset=skull-shortcut``;
explicit options override the preset's.

Tumour slices carry the lesion as mask and one box per connected component; healthy slices an all-zero
mask and no box. ``anatomy_mask`` is the scalp + skull, for the off-target metric.

Examples:
    >>> src = PhantomSource(num_subjects=2, slices_per_subject=2, size=64)
    >>> [(ref.key, ref.subject_id) for ref in src.list_inputs()][:2]
    [('0/0', 'sub-0000'), ('0/1', 'sub-0000')]
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

import numpy as np

from acol_core.data.phantom import (
    PHANTOM_CLASSES,
    PhantomConfig,
    SubjectParams,
    phantom_config,
    render_slice,
    sample_subject,
)
from acol_core.data.schema import Record, Reject
from acol_core.data.sources.base import InputRef, SourceBase
from acol_core.localize import boxes_from_mask

__all__ = ["PhantomSource"]


class PhantomSource(SourceBase):
    """Slices of ``acol_core.data.phantom``; options are ``PhantomConfig``'s fields and ``preset``."""

    name = "phantom"
    class_names = PHANTOM_CLASSES

    def __init__(self, preset: str = "standard", **config: Any) -> None:
        self.preset = preset
        self.config = phantom_config(preset, **config)
        self._subject = lru_cache(maxsize=4)(self._sample)

    @staticmethod
    def option_names() -> list[str]:
        return ["preset", *(f.name for f in dataclasses.fields(PhantomConfig))]

    def _sample(self, index: int) -> SubjectParams:
        return sample_subject(self.config, index)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "preset": self.preset, "config": dataclasses.asdict(self.config)}

    def list_inputs(self) -> list[InputRef]:
        refs = []
        for index in range(self.config.num_subjects):
            subject = self._subject(index).subject_id
            refs += [InputRef(f"{index}/{z}", subject) for z in range(self.config.slices_per_subject)]
        return refs

    def read_input(self, key: str) -> list[Record] | Reject:
        index, _, z = key.partition("/")
        sl = render_slice(self._subject(int(index)), int(z), self.config)
        tumour = sl.label == 1
        mask = sl.tumour_mask.astype(np.uint8) if tumour else np.zeros_like(sl.tumour_mask, np.uint8)
        return [
            Record(
                image_id=f"phantom/{sl.subject_id}/z{sl.slice_index:03d}",
                image=sl.image,
                label=int(sl.label),
                mask=mask,
                boxes=boxes_from_mask(mask, order="raster") if tumour else [],
                subject_id=sl.subject_id,
                slice_index=sl.slice_index,
                source=f"phantom:{sl.subject_id}/{sl.slice_index}",
                anatomy_mask=(sl.anatomy_mask > 0).astype(np.uint8),
            )
        ]
