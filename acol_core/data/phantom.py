"""The built-in MRI phantom: simulated axial T1 post-contrast head slices, with and without a tumour.

It reproduces our users' problem: every slice of both classes shows a bright scalp and a skull ring, so a
classifier trained on image-level labels can score well while its class map fires on the skull. The
ground-truth ``tumour_mask`` and ``anatomy_mask`` (scalp + skull) let the metrics measure exactly that.

Geometry is drawn in normalised image coordinates (the image spans [-1, 1] on both axes), so one
``SubjectParams`` renders at any size. A subject is a 3-D head: the slice level z in [0, 1] (lower to upper)
shrinks the cross-section and sets the ventricle size; a tumour subject carries one 3-D lesion (an
ellipsoid with an irregular, twisting cross-section) over a contiguous range of its slices.

Options beyond the standard phantom reproduce two failures seen on real data; each has a strength, and at
its default (0, or 0.5 for ``site_purity``) the standard phantom is drawn unchanged, byte for byte:

- ``stack_extent`` (0..1), **near-empty slices**: a volume prepared slice-wise covers the whole field of
  view, so the stack reaches past the brain towards the vertex and the bottom of the head, where slices
  hold little or no head. At 1 the outermost levels are air: with a low ``tumour_subject_fraction`` this
  gives the class imbalance of a BraTS-style cohort (preset ``imbalanced``).
- ``site_purity`` (0.5..1) and ``site_shift`` (0..1), **cohort / acquisition shift**: every subject is
  scanned at site A or B; a tumour subject is from site B and a healthy one from site A with probability
  ``site_purity``, as in the public 2-D tumour datasets assembled from a tumour archive and a separate
  source of normal scans. ``site_shift`` scales how much the sites differ: site A's post-contrast T1 is
  fat-suppressed (darker scalp fat and skull marrow), site B scans a population with thicker scalp and
  skull on a scanner with a many-element receive coil whose sensitivity is highest next to the coil, so
  the head's periphery (scalp, skull, outer cortex) is brighter than its centre when intensities are not
  normalised; it also has a stronger bias field (3 T B1 inhomogeneity) and less noise, and its slices are
  published each cropped to the head's bounding box and resized to a square (the extreme-points crop
  common in 2-D tumour datasets), so the head fills the image, stretched left-right, where site A's keep
  the scanner's field of view with air around the head. The site differs most on the skull and scalp; the brain
  differs through smooth gain fields, noise and the crop, and the lesion is drawn the same at both sites.
- ``lesion_subtlety`` (0..1), **faint lesions**: not every tumour is a ring-enhancing glioblastoma with a
  necrotic core and marked oedema; low-grade and partly treated tumours enhance faintly. The lesion's
  departures from white matter (rim enhancement, oedema, necrotic core) are scaled by ``1 - 0.6 s``, so
  at 1 they keep 40 % of their contrast: visible, but less conspicuous than the site's scalp and skull.
- ``lesion_level_focus`` (0..1), **tumour slices from the lesion's levels**: 2-D datasets keep the slices
  that show the tumour, so a tumour subject's stack narrows onto its lesion (at 1 every level is in the
  lesion's central part).
- ``healthy_level_bias`` (0..1), **healthy slices from skull-dominated levels**: normal scans are sampled
  more often at high and low axial levels, where the skull and scalp make up much of the head section;
  healthy subjects' stacks reach further out and crowd towards both ends.

``PHANTOM_PRESETS`` names option sets (``standard``, ``imbalanced``, ``skull-shortcut``);
``phantom_config(preset, **options)`` builds a config from one, explicit options winning. The
``skull-shortcut`` preset sets the mechanisms and the class mix, no sizes, so it combines with any size.
``anatomy_mask`` is always the scalp + skull actually drawn (thickness, crop and level included).

Examples:
    >>> cfg = PhantomConfig(num_subjects=2, slices_per_subject=4, size=64)
    >>> slices = list(generate_phantom(cfg))
    >>> len(slices), slices[0].image.shape, slices[0].subject_id
    (8, (64, 64), 'sub-0000')
    >>> phantom_config("skull-shortcut", num_subjects=4).site_purity
    0.97
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "PHANTOM_CLASSES",
    "PHANTOM_PRESETS",
    "SITES",
    "LesionParams",
    "PhantomConfig",
    "PhantomSlice",
    "SubjectParams",
    "TissueIntensities",
    "generate_phantom",
    "phantom_config",
    "render_slice",
    "sample_subject",
    "scaled_min_tumour_pixels",
    "slice_levels",
]

PHANTOM_CLASSES: tuple[str, str] = ("healthy", "tumour")
SITES: tuple[str, str] = ("A", "B")

Harmonic = tuple[float, float, float]  # (order, relative amplitude, phase) of a radius perturbation
Wave = tuple[float, float, float, float]  # (k_u, k_v, k_z, phase) of one plane wave of a smooth field

_GOLDEN = 0.6180339887498949
_EPS = 1e-9


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate; the defaults give about half tumour slices.

    ``min_tumour_pixels`` is given at size 128 and scales with ``(size / 128) ** 2``: a slice is "tumour"
    iff its lesion covers at least that many pixels, and a smaller lesion section is not drawn at all.
    The last six options are the failure mechanisms of the module docstring.
    """

    num_subjects: int = 40
    slices_per_subject: int = 16
    size: int = 128
    tumour_subject_fraction: float = 0.75
    min_tumour_pixels: int = 30
    noise: float = 0.03
    seed: int = 0
    stack_extent: float = 0.0
    site_purity: float = 0.5
    site_shift: float = 0.0
    lesion_level_focus: float = 0.0
    healthy_level_bias: float = 0.0
    lesion_subtlety: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            wanted = (int,) if f.type == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "an integer" if f.type == "int" else "a number"
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        if self.num_subjects < 0:
            raise ValueError(f"num_subjects must be >= 0, got {self.num_subjects}")
        if self.slices_per_subject < 1:
            raise ValueError(f"slices_per_subject must be >= 1, got {self.slices_per_subject}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        if self.min_tumour_pixels < 1:
            raise ValueError(f"min_tumour_pixels must be >= 1, got {self.min_tumour_pixels}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        ranges = {
            "tumour_subject_fraction": (0.0, 1.0),
            "stack_extent": (0.0, 1.0),
            "site_purity": (0.5, 1.0),
            "site_shift": (0.0, 1.0),
            "lesion_level_focus": (0.0, 1.0),
            "healthy_level_bias": (0.0, 1.0),
            "lesion_subtlety": (0.0, 1.0),
        }
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {getattr(self, name)}")


# Named option sets; explicit options override them (``phantom_config``).
PHANTOM_PRESETS: dict[str, dict[str, float | int]] = {
    "standard": {},
    # A BraTS-style cohort prepared slice-wise: lesions in about a quarter of the subjects and in part of their
    # slices, the stack reaching past the head at both ends: 7-10 % tumour slices (tested).
    "imbalanced": {
        "num_subjects": 40,
        "slices_per_subject": 24,
        "size": 64,
        "tumour_subject_fraction": 0.28,
        "stack_extent": 1.0,
    },
    # Right for the wrong reason: the site's scalp and skull tell the class more easily than the faint lesion.
    "skull-shortcut": {
        "tumour_subject_fraction": 0.5,
        "site_purity": 0.97,
        "site_shift": 1.0,
        "lesion_level_focus": 1.0,
        "healthy_level_bias": 1.0,
        "lesion_subtlety": 1.0,
    },
}


def phantom_config(preset: str = "standard", **options: Any) -> PhantomConfig:
    """The config of a named preset with ``options`` on top.

    Raises:
        ValueError: unknown preset, unknown option or a bad value.
    """
    if preset not in PHANTOM_PRESETS:
        raise ValueError(f"unknown phantom preset {preset!r}; choose from {', '.join(PHANTOM_PRESETS)}")
    known = {f.name for f in fields(PhantomConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown phantom option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return PhantomConfig(**{**PHANTOM_PRESETS[preset], **options})


@dataclass(frozen=True)
class TissueIntensities:
    """Mean T1 post-contrast intensities in [0, 1] before bias field and noise."""

    scalp: float
    bone: float
    marrow: float
    csf: float
    grey: float
    white: float


@dataclass(frozen=True)
class LesionParams:
    """One 3-D lesion in the head frame; lengths in normalised image units, z in slice-level units."""

    center: tuple[float, float]  # at z_center
    drift: tuple[float, float]  # centre shift per unit z: the lesion's axis is tilted
    z_center: float
    z_half: float  # half extent along z; the cross-section shrinks as an ellipsoid's
    radius: float  # outer radius of the enhancing rim at z_center
    aspect: float
    angle: float
    rim_harmonics: tuple[Harmonic, ...]
    oedema_scale: float  # oedema radius / rim radius
    oedema_harmonics: tuple[Harmonic, ...]
    twist: float  # harmonic phase change per unit z, so neighbouring sections differ
    rim_thickness: float
    rim_contrast: float  # rim = white * (1 + contrast); small values give subtle lesions
    rim_patchiness: float
    rim_phase: float
    core: float
    oedema_drop: float  # relative intensity change under the oedema (negative: brighter, FLAIR-like)


@dataclass(frozen=True)
class SubjectParams:
    """Everything needed to render any slice of one subject deterministically."""

    index: int
    subject_id: str
    noise_seed: int
    head_axes: tuple[float, float]  # left-right, anterior-posterior semi-axes at the widest level
    head_angle: float
    head_center: tuple[float, float]
    outline_harmonics: tuple[Harmonic, ...]
    scalp_thickness: float
    skull_thickness: float
    csf_thickness: float
    cortex_thickness: float
    sulcus_depth: float
    gyri: int
    marrow_harmonics: tuple[Harmonic, ...]
    ventricle_scale: float
    ventricle_level: float
    tissue: TissueIntensities
    texture_waves: tuple[Wave, ...]
    fold_waves: tuple[Wave, ...]
    sulcus_waves: tuple[Wave, ...]
    bias: tuple[float, ...]  # coefficients of x, y, x^2, y^2, xy, z in the log bias field
    noise_scale: float
    lesion: LesionParams | None
    site: str = "A"
    zoom: float = 1.0  # field of view: > 1 draws the head larger in the image
    stretch: float = 1.0  # further left-right zoom
    crop: float = 0.0  # how far each slice is cropped to its head's box and resized to a square (0..1)
    coil_shading: float = 0.0  # log gain at the head's outline over its centre (receive-coil proximity)
    levels: tuple[float, ...] = ()  # slice level of each slice; empty: evenly over [0, 1]


@dataclass(frozen=True)
class PhantomSlice:
    """One rendered slice; all arrays are uint8 H×W."""

    image: np.ndarray
    label: int  # 0 healthy, 1 tumour
    tumour_mask: np.ndarray  # whole lesion: rim + core + oedema
    anatomy_mask: np.ndarray  # scalp + skull
    brain_mask: np.ndarray  # intracranial: inside the skull's inner surface (CSF rim + parenchyma)
    subject_id: str
    slice_index: int


def scaled_min_tumour_pixels(config: PhantomConfig) -> int:
    """The lesion area (pixels) from which a slice of ``config.size`` counts as tumour."""
    return max(1, round(config.min_tumour_pixels * (config.size / 128) ** 2))


# ---------------------------------------------------------------- sampling


def _harmonics(rng: np.random.Generator, orders: range, scale: float) -> tuple[Harmonic, ...]:
    return tuple(
        (float(m), float(scale * rng.uniform(0.3, 1.0) / m), float(rng.uniform(0, 2 * math.pi)))
        for m in orders
    )


def _waves(rng: np.random.Generator, count: int, k_min: float, k_max: float) -> tuple[Wave, ...]:
    k = rng.uniform(k_min, k_max, count)
    phi = rng.uniform(0, 2 * math.pi, count)
    kz = rng.normal(0.0, 2.0, count)
    phase = rng.uniform(0, 2 * math.pi, count)
    return tuple(
        (float(a * math.cos(p)), float(a * math.sin(p)), float(c), float(q))
        for a, p, c, q in zip(k, phi, kz, phase, strict=True)
    )


def _has_tumour(config: PhantomConfig, index: int) -> bool:
    # A Weyl sequence keeps the share of tumour subjects close to the fraction for any count, and subject i's
    # draw does not depend on how many subjects there are.
    offset = np.random.default_rng([config.seed, 1, 0]).random()
    return (offset + index * _GOLDEN) % 1.0 < config.tumour_subject_fraction


def _sample_tissue(rng: np.random.Generator) -> TissueIntensities:
    gain = rng.uniform(0.9, 1.06)
    return TissueIntensities(
        scalp=gain * rng.uniform(0.72, 0.88),
        bone=gain * rng.uniform(0.04, 0.09),
        marrow=gain * rng.uniform(0.35, 0.6),
        csf=gain * rng.uniform(0.08, 0.15),
        grey=gain * rng.uniform(0.4, 0.47),
        white=gain * rng.uniform(0.58, 0.68),
    )


def _sample_lesion(rng: np.random.Generator, head_axes: tuple[float, float], depth: float) -> LesionParams:
    z_center = rng.uniform(0.2, 0.8)
    z_half = rng.uniform(0.28, 0.6)
    radius = math.exp(rng.uniform(math.log(0.1), math.log(0.26)))
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    rim_h = _harmonics(rng, range(2, 6), rng.uniform(0.1, 0.35))
    oedema_h = _harmonics(rng, range(2, 7), rng.uniform(0.1, 0.45))
    oedema_scale = rng.uniform(1.15, 1.9)
    drift = (float(rng.normal(0, 0.08)), float(rng.normal(0, 0.08)))

    # Fit the rim and half the oedema inside the parenchyma at the lesion's widest section; the cortex
    # surface may cut off the rest of the oedema, as it does in real brains, and the shrinking sections
    # of the upper slices may cut off a lesion's ends.
    f_mid = _head_scale(z_center)
    reach = max(aspect, 1 / aspect) * (1 + 0.5 * (oedema_scale - 1)) * (1 + sum(h[1] for h in rim_h))
    room = np.array(head_axes) * f_mid - depth - 0.03 - 0.5 * z_half * math.hypot(*drift)
    radius = min(radius, 0.8 * float(room.min()) / reach)
    free = np.maximum(room - radius * reach, 0.0)
    r, phi = math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
    center = (float(free[0] * r * math.cos(phi)), float(free[1] * r * math.sin(phi)))

    return LesionParams(
        center=center,
        drift=drift,
        z_center=float(z_center),
        z_half=float(z_half),
        radius=float(radius),
        aspect=float(aspect),
        angle=float(rng.uniform(0, math.pi)),
        rim_harmonics=rim_h,
        oedema_scale=float(oedema_scale),
        oedema_harmonics=oedema_h,
        twist=float(rng.normal(0, 3.0)),
        rim_thickness=float(rng.uniform(0.022, 0.045)),
        rim_contrast=float(0.2 + 0.5 * rng.random() ** 1.3),
        rim_patchiness=float(rng.uniform(0.0, 0.35)),
        rim_phase=float(rng.uniform(0, 2 * math.pi)),
        core=float(rng.uniform(0.15, 0.32)),
        oedema_drop=float(rng.uniform(-0.55, -0.3)),  # negative: hyperintense oedema, as on FLAIR
    )


def _site(config: PhantomConfig, index: int, has_tumour: bool) -> str:
    # Its own stream, so that the other draws (and the standard phantom) do not change with the site.
    same = np.random.default_rng([config.seed, 2, index]).random() < config.site_purity
    return ("B" if same else "A") if has_tumour else ("A" if same else "B")


def _site_tissue(tissue: TissueIntensities, site: str, shift: float) -> TissueIntensities:
    """Site A's fat suppression darkens the fatty tissues: scalp fat and skull marrow."""
    if site == "B" or shift == 0:
        return tissue
    keep = 1.0 - 0.7 * shift
    return dataclasses.replace(tissue, scalp=tissue.scalp * keep, marrow=tissue.marrow * keep)


def _subtle_lesion(lesion: LesionParams, white: float, subtlety: float) -> LesionParams:
    """Fainter enhancement, oedema and necrosis: every departure from white matter scaled down."""
    if subtlety == 0:
        return lesion
    keep = 1.0 - 0.6 * subtlety
    return dataclasses.replace(
        lesion,
        rim_contrast=lesion.rim_contrast * keep,
        oedema_drop=lesion.oedema_drop * keep,
        core=white + (lesion.core - white) * keep,
    )


def slice_levels(config: PhantomConfig, healthy: bool, lesion: LesionParams | None) -> tuple[float, ...]:
    """Slice levels of one subject's stack (0 lowest brain level, 1 highest; the head spans -0.75..1.35).

    ``stack_extent`` widens every stack towards the head's ends, ``healthy_level_bias`` pushes a healthy
    subject's levels further out and towards both ends, ``lesion_level_focus`` narrows a tumour subject's
    stack onto the central part of its lesion.
    """
    n = config.slices_per_subject
    e = config.stack_extent
    low, high = -0.9 * e, 1.0 + 0.5 * e
    # Position in the stack, 0..1; with every option at 0 the levels are exactly the standard k / (n - 1).
    position = [_slice_level(k, n) for k in range(n)]
    if healthy and config.healthy_level_bias > 0:
        b = config.healthy_level_bias
        low, high = min(low, -0.6 * b), max(high, 1.0 + 0.25 * b)
        power = 1.0 / (1.0 + 2.0 * b)  # < 1: crowds the levels towards both ends
        position = [0.5 + 0.5 * math.copysign(abs(2 * p - 1) ** power, 2 * p - 1) for p in position]
    if lesion is not None and config.lesion_level_focus > 0:
        f = config.lesion_level_focus
        core_low = max(low, lesion.z_center - 0.6 * lesion.z_half)
        core_high = min(high, lesion.z_center + 0.6 * lesion.z_half)
        low, high = low + f * (core_low - low), high + f * (core_high - high)
    return tuple(float(low + (high - low) * p) for p in position)


def _head_crop(sp: SubjectParams, z: float) -> SubjectParams:
    """The subject as drawn on a slice at level z cropped to its head's box, resized to a square (``sp.crop``).

    The box of the tilted outline ellipse at that level, with a 3 % margin for its bumps, fills the image: rows
    by the zoom, columns by the zoom times the left-right stretch. The crop also centres the head.
    """
    f = _head_scale(z)
    if sp.crop == 0 or f == 0:
        return sp
    a, b = sp.head_axes
    c, s = math.cos(sp.head_angle), math.sin(sp.head_angle)
    half_x, half_y = math.hypot(a * c, b * s), math.hypot(a * s, b * c)
    return dataclasses.replace(
        sp,
        head_center=(sp.head_center[0] * (1.0 - sp.crop), sp.head_center[1] * (1.0 - sp.crop)),
        zoom=sp.zoom + sp.crop * (1.0 / (1.03 * half_y * f) - sp.zoom),
        stretch=sp.stretch + sp.crop * (half_y / half_x - sp.stretch),
    )


def sample_subject(config: PhantomConfig, index: int) -> SubjectParams:
    """Draw subject ``index``; it depends on the config and ``index`` only, not on the subject count."""
    if index < 0:
        raise ValueError(f"subject index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, 0, index])
    a = rng.uniform(0.6, 0.72)
    head_axes = (float(a), float(min(a * rng.uniform(1.12, 1.3), 0.86)))
    scalp, skull, csf = rng.uniform(0.03, 0.05), rng.uniform(0.06, 0.09), rng.uniform(0.015, 0.03)
    tissue = _sample_tissue(rng)
    has_tumour = _has_tumour(config, index)
    site = _site(config, index, has_tumour)
    shift = config.site_shift if site == "B" else 0.0  # site B's departures from site A
    # Keyword arguments are evaluated in order: the draws below keep the standard phantom's sequence.
    drawn = SubjectParams(
        index=index,
        subject_id=f"sub-{index:04d}",
        noise_seed=int(rng.integers(2**63)),
        head_axes=head_axes,
        head_angle=float(np.clip(rng.normal(0, 0.12), -0.3, 0.3)),
        head_center=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))),
        outline_harmonics=_harmonics(rng, range(2, 5), 0.02),
        scalp_thickness=float(scalp * (1.0 + 0.8 * shift)),
        skull_thickness=float(skull * (1.0 + 0.4 * shift)),
        csf_thickness=float(csf),
        cortex_thickness=float(rng.uniform(0.04, 0.06)),
        sulcus_depth=float(rng.uniform(0.05, 0.09)),
        gyri=int(rng.integers(24, 36)),
        marrow_harmonics=_harmonics(rng, range(1, 5), 1.0),
        ventricle_scale=float(rng.uniform(0.7, 1.35)),
        ventricle_level=float(rng.uniform(0.4, 0.55)),
        tissue=_site_tissue(tissue, site, config.site_shift),
        texture_waves=_waves(rng, 6, 3.0, 9.0),
        fold_waves=_waves(rng, 5, 4.0, 10.0),
        sulcus_waves=_waves(rng, 4, 4.0, 9.0),
        bias=tuple(float(c * (1.0 + 0.5 * shift)) for c in rng.normal(0, 0.1, 6)),
        noise_scale=float(rng.uniform(0.75, 1.25) * (1.0 - 0.2 * shift)),
        lesion=_sample_lesion(rng, head_axes, scalp + skull + csf) if has_tumour else None,
        site=site,
        coil_shading=0.8 * shift,
        crop=shift,
    )
    lesion = drawn.lesion
    if lesion is not None and config.lesion_subtlety > 0:
        lesion = _subtle_lesion(lesion, drawn.tissue.white, config.lesion_subtlety)
    return dataclasses.replace(drawn, lesion=lesion, levels=slice_levels(config, not has_tumour, lesion))


# ---------------------------------------------------------------- geometry helpers


@dataclass(frozen=True)
class _Frame:
    """The head frame of one subject on one image grid: u left-right, v anterior-posterior (anterior < 0)."""

    coords: np.ndarray  # 1-D pixel-centre coordinates of the rows (y)
    coords_x: np.ndarray  # of the columns (x): the same array unless the image is stretched
    cos_a: float
    sin_a: float
    center: tuple[float, float]
    u: np.ndarray
    v: np.ndarray


@lru_cache(maxsize=8)
def _coords(size: int) -> np.ndarray:
    c = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    c.setflags(write=False)
    return c


def _frame(sp: SubjectParams, size: int) -> _Frame:
    c = _coords(size) if sp.zoom == 1.0 else _coords(size) / np.float32(sp.zoom)
    cx = c if sp.stretch == 1.0 else c / np.float32(sp.stretch)
    cos_a, sin_a = math.cos(sp.head_angle), math.sin(sp.head_angle)
    dx, dy = cx[None, :] - sp.head_center[0], c[:, None] - sp.head_center[1]
    u, v = cos_a * dx + sin_a * dy, -sin_a * dx + cos_a * dy
    return _Frame(c, cx, cos_a, sin_a, sp.head_center, u, v)


def _slice_level(slice_index: int, slices: int) -> float:
    return slice_index / (slices - 1) if slices > 1 else 0.5


def _head_scale(z: float) -> float:
    """Cross-section scale of the head at level z: widest a little below the middle of the stack."""
    return math.sqrt(max(0.0, 1.0 - ((z - 0.3) / 1.05) ** 2))


def _harmonic_sum(
    cos_t: np.ndarray, sin_t: np.ndarray, harmonics: tuple[Harmonic, ...], twist: float = 0.0
) -> np.ndarray | float:
    """Sum of amp * cos(m t + phase + twist) from cos t and sin t, by the angle-addition recurrence."""
    if not harmonics:
        return 0.0
    total: np.ndarray | float = 0.0
    cm, sm = cos_t, sin_t
    for m in range(1, int(max(h[0] for h in harmonics)) + 1):
        if m > 1:
            cm, sm = cm * cos_t - sm * sin_t, sm * cos_t + cm * sin_t
        for order, amp, phase in harmonics:
            if int(order) == m:
                total = total + amp * (cm * math.cos(phase + twist) - sm * math.sin(phase + twist))
    return total


def _signed_distance(
    u: np.ndarray,
    v: np.ndarray,
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float = 0.0,
    harmonics: tuple[Harmonic, ...] = (),
    twist: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial signed distance to a rotated ellipse perturbed by radial harmonics (negative inside).

    Also returns cos and sin of each pixel's direction from the centre, relative to the ellipse's axis.
    """
    du, dv = u - center[0], v - center[1]
    r = np.hypot(du, dv)
    ca, sa = math.cos(angle), math.sin(angle)
    # The centre pixel gets an arbitrary direction, so its distance is -radius rather than 0/0.
    safe = np.where(r > 0, r, 1.0)
    cos_t = np.where(r > 0, (ca * du + sa * dv) / safe, 1.0)
    sin_t = (ca * dv - sa * du) / safe
    rad = 1.0 / np.sqrt((cos_t / axes[0]) ** 2 + (sin_t / axes[1]) ** 2)
    if harmonics:
        rad = rad * (1.0 + _harmonic_sum(cos_t, sin_t, harmonics, twist))
    return r - rad, cos_t, sin_t


def _inside(sd: np.ndarray, pw: float) -> np.ndarray:
    """Partial-volume weight of a region given its signed distance, over one pixel width."""
    return np.clip(0.5 - sd / pw, 0.0, 1.0)


def _blend(img: np.ndarray, value: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    return img + alpha * (value - img)


def _field(waves: tuple[Wave, ...], frame: _Frame, z: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance 3-D random field (sum of plane waves in u, v, z) on one slice.

    A plane wave separates into row and column factors (cos(a + b) = cos a cos b - sin a sin b), so the
    field costs a few outer products instead of one cosine per wave and pixel. einsum rather than a matrix
    product keeps BLAS threads out of it; they thrash when data loaders run in parallel.
    """
    w = np.asarray(waves, dtype=np.float64)
    ku, kv = w[:, 0], w[:, 1]
    alpha = ku * frame.cos_a - kv * frame.sin_a  # phase per unit x
    beta = ku * frame.sin_a + kv * frame.cos_a  # phase per unit y
    gamma = w[:, 2] * z + w[:, 3] - alpha * frame.center[0] - beta * frame.center[1]
    c, cx = frame.coords.astype(np.float64), frame.coords_x.astype(np.float64)
    row_phase = beta[:, None] * c[None, :]  # (waves, H)
    col_phase = alpha[:, None] * cx[None, :] + gamma[:, None]  # (waves, W)
    rows = np.concatenate([np.cos(row_phase), -np.sin(row_phase)]).astype(np.float32)
    cols = np.concatenate([np.cos(col_phase), np.sin(col_phase)]).astype(np.float32)
    return np.einsum("nh,nw->hw", rows, cols) * np.float32(math.sqrt(2.0 / len(waves)))


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Anatomy:
    image: np.ndarray
    anatomy: np.ndarray
    brain: np.ndarray
    parenchyma: np.ndarray
    texture: np.ndarray


def _skull(
    sp: SubjectParams, d: np.ndarray, cos_t: np.ndarray, sin_t: np.ndarray, scalp: float, skull: float
) -> np.ndarray:
    """Dark inner and outer tables with marrow (diploe) between them, thicker in some directions."""
    across = (-d - scalp) / skull
    diploe = np.clip((0.38 - np.abs(across - 0.5)) / 0.15, 0.0, 1.0)
    amount = np.clip(0.6 + 0.5 * _harmonic_sum(cos_t, sin_t, sp.marrow_harmonics), 0.0, 1.0)
    t = sp.tissue
    return t.bone + (t.marrow - t.bone) * diploe * amount


def _cortex(
    sp: SubjectParams,
    img: np.ndarray,
    frame: _Frame,
    z: float,
    depth: np.ndarray,
    cos_t: np.ndarray,
    sin_t: np.ndarray,
    texture: np.ndarray,
    pw: float,
) -> np.ndarray:
    """Grey-matter ribbon folded into gyri: narrow CSF sulci of varying depth, white matter fingers."""
    t = sp.tissue
    theta = np.arctan2(sin_t, cos_t)
    c = np.cos(sp.gyri * theta + 3.0 * _field(sp.fold_waves, frame, z))
    deep = sp.sulcus_depth * (0.65 + 0.35 * np.tanh(_field(sp.sulcus_waves, frame, z)))
    positive = np.maximum(c, 0.0)
    sulcus = deep * positive**4
    white_top = sp.cortex_thickness + deep * positive
    img = _blend(img, t.grey * (1 + 0.05 * texture), _inside(sulcus - depth, pw))
    return _blend(img, t.white * (1 + 0.04 * texture), _inside(white_top - depth, pw))


def _deep_structures(
    sp: SubjectParams,
    img: np.ndarray,
    frame: _Frame,
    z: float,
    f: float,
    depth: np.ndarray,
    texture: np.ndarray,
    pw: float,
) -> np.ndarray:
    """Midline fissure, deep grey nuclei and ventricles, in a frame that shrinks with the head section."""
    t = sp.tissue
    u, v = frame.u, frame.v
    # The fissure reaches the ventricles' roof in mid slices and cuts right through above them.
    reach = f * (0.3 + 0.6 * min(1.0, max(0.0, z - sp.ventricle_level - 0.15) / 0.2))
    fissure = _inside(np.abs(u) - 0.006 - 0.5 * pw, pw) * _inside(depth - reach, pw) * _inside(-depth, pw)
    img = _blend(img, t.csf, fissure)

    us, vs = u / f, v / f
    nuclei = max(0.0, 1.0 - ((z - sp.ventricle_level + 0.12) / 0.22) ** 2)
    if nuclei > 0:
        for side in (-1.0, 1.0):
            sd, _, _ = _signed_distance(us, vs, (side * 0.17, 0.0), (0.07, 0.12), side * 0.3)
            img = _blend(img, t.grey * (1 + 0.05 * texture), 0.6 * nuclei * _inside(sd * f, pw))

    size = sp.ventricle_scale * math.sqrt(max(0.0, 1.0 - ((z - sp.ventricle_level) / 0.3) ** 2))
    if size > 0.1:
        # Frontal horns diverge forwards and the atria backwards: the butterfly of an axial cut.
        spread = 0.6 + 0.4 * size
        for side in (-1.0, 1.0):
            horns = (
                ((side * 0.08 * spread, -0.09), (0.17, 0.06), -math.pi / 2 + side * 0.3),
                ((side * 0.1 * spread, 0.11), (0.13, 0.045), math.pi / 2 - side * 0.35),
            )
            for center, (major, minor), angle in horns:
                sd, _, _ = _signed_distance(us, vs, center, (major * size, minor * size), angle)
                img = _blend(img, t.csf, _inside(sd * f, pw))
    third = max(0.0, 1.0 - ((z - sp.ventricle_level + 0.2) / 0.15) ** 2)
    if third > 0:
        sd, _, _ = _signed_distance(us, vs, (0.0, 0.03), (0.012 + 0.5 * pw, 0.07 * sp.ventricle_scale))
        img = _blend(img, t.csf, third * _inside(sd * f, pw))
    return img


def _render_anatomy(sp: SubjectParams, frame: _Frame, z: float, pw: float) -> _Anatomy:
    f = _head_scale(z)
    if f == 0.0:  # past the vertex or below the head: air only
        empty = np.zeros(frame.u.shape, dtype=bool)
        return _Anatomy(np.zeros(frame.u.shape), empty, empty, empty, np.zeros(frame.u.shape))
    axes = (sp.head_axes[0] * f, sp.head_axes[1] * f)
    d, cos_t, sin_t = _signed_distance(frame.u, frame.v, (0.0, 0.0), axes, 0.0, sp.outline_harmonics)
    # At small sizes the layers stay at least about a pixel thick so that the skull is always visible.
    scalp = max(sp.scalp_thickness, pw)
    skull = max(sp.skull_thickness, 1.5 * pw)
    inner = scalp + skull
    surface = inner + max(sp.csf_thickness, 0.5 * pw)
    depth = -(d + surface)  # below the brain surface
    texture = _field(sp.texture_waves, frame, z)
    t = sp.tissue

    img = _blend(np.zeros_like(d), t.scalp * (1 + 0.05 * texture), _inside(d, pw))
    img = _blend(img, _skull(sp, d, cos_t, sin_t, scalp, skull), _inside(d + scalp, pw))
    img = _blend(img, t.csf, _inside(d + inner, pw))
    img = _cortex(sp, img, frame, z, depth, cos_t, sin_t, texture, pw)
    img = _deep_structures(sp, img, frame, z, f, depth, texture, pw)
    return _Anatomy(
        image=img,
        anatomy=(d < 0) & (d >= -inner),
        brain=d < -inner,
        parenchyma=depth > 0,
        texture=texture,
    )


@dataclass(frozen=True)
class _Lesion:
    mask: np.ndarray
    oedema: np.ndarray
    rim: np.ndarray
    core: np.ndarray
    cos_t: np.ndarray
    sin_t: np.ndarray


def _lesion_layers(
    les: LesionParams, frame: _Frame, z: float, parenchyma: np.ndarray, pw: float
) -> _Lesion | None:
    """Soft weights of the lesion's layers on one slice; every weight is exactly 0 outside ``mask``."""
    s2 = 1.0 - ((z - les.z_center) / les.z_half) ** 2
    if s2 <= 0:
        return None
    dz = z - les.z_center
    center = (les.center[0] + les.drift[0] * dz, les.center[1] + les.drift[1] * dz)
    r = les.radius * math.sqrt(s2)
    axes = (r * les.aspect, r / les.aspect)
    twist = les.twist * dz
    u, v = frame.u, frame.v
    rim_sd, cos_t, sin_t = _signed_distance(u, v, center, axes, les.angle, les.rim_harmonics, twist)
    oed_axes = (axes[0] * les.oedema_scale, axes[1] * les.oedema_scale)
    oed_sd, _, _ = _signed_distance(u, v, center, oed_axes, les.angle, les.oedema_harmonics, -twist)
    inside = parenchyma.astype(np.float32)
    # Ramps run inwards from each boundary so that nothing leaks past the mask.
    return _Lesion(
        mask=((rim_sd < 0) | (oed_sd < 0)) & parenchyma,
        oedema=np.clip(-oed_sd / pw, 0.0, 1.0) * inside,
        rim=np.clip(-rim_sd / pw, 0.0, 1.0) * inside,
        core=np.clip(-(rim_sd + les.rim_thickness) / pw, 0.0, 1.0) * inside,
        cos_t=cos_t,
        sin_t=sin_t,
    )


def _paint_lesion(
    img: np.ndarray, les: LesionParams, layers: _Lesion, white: float, texture: np.ndarray
) -> np.ndarray:
    img = img * (1.0 - les.oedema_drop * layers.oedema)
    patches = 1.0 - les.rim_patchiness * (
        0.5 + 0.5 * _harmonic_sum(layers.cos_t, layers.sin_t, ((2.0, 1.0, les.rim_phase),))
    )
    img = _blend(img, white * (1 + les.rim_contrast) * patches * (1 + 0.03 * texture), layers.rim)
    return _blend(img, les.core * (1 + 0.08 * texture), layers.core)


def _acquire(
    img: np.ndarray, sp: SubjectParams, slice_index: int, z: float, frame: _Frame, noise: float
) -> np.ndarray:
    """Multiplicative bias field, Rician noise and 8-bit quantisation; pointwise, so a lesion stays local."""
    c = sp.bias
    x, y = frame.coords_x[None, :], frame.coords[:, None]
    log_bias = (c[0] * x + c[2] * x * x) + (c[1] * y + c[3] * y * y) + c[4] * x * y + c[5] * (z - 0.5)
    img = img * np.exp(log_bias)
    sigma = noise * sp.noise_scale
    if sigma > 0:
        # Seeded per (subject, slice) only, so the draw is the same with and without the lesion.
        rng = np.random.default_rng([sp.noise_seed, slice_index])
        n = rng.standard_normal((2, *img.shape), dtype=np.float32)
        img = np.hypot(img + sigma * n[0], sigma * n[1])
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _coil_gain(sp: SubjectParams, frame: _Frame, z: float) -> np.ndarray:
    """Receive-coil proximity: gain rising steeply towards the head's edge (radius 1 at the outline)."""
    f = max(_head_scale(z), 0.05)
    rho2 = (frame.u / (sp.head_axes[0] * f)) ** 2 + (frame.v / (sp.head_axes[1] * f)) ** 2
    return np.exp(sp.coil_shading * np.minimum(rho2, 1.2) ** 4)


def render_slice(
    subject: SubjectParams, slice_index: int, config: PhantomConfig, with_tumour: bool = True
) -> PhantomSlice:
    """Render one slice at ``config.size``; ``with_tumour=False`` gives the same slice without its lesion.

    Examples:
        >>> cfg = PhantomConfig(num_subjects=1, size=64)
        >>> s = render_slice(sample_subject(cfg, 0), 3, cfg)
        >>> s.image.dtype, bool(s.anatomy_mask.any())
        (dtype('uint8'), True)
    """
    if not 0 <= slice_index < config.slices_per_subject:
        raise ValueError(f"slice_index must be in [0, {config.slices_per_subject}), got {slice_index}")
    levels = subject.levels or tuple(
        _slice_level(k, config.slices_per_subject) for k in range(slice_index + 1)
    )
    z = levels[slice_index]
    if subject.crop:
        subject = _head_crop(subject, z)
    frame = _frame(subject, config.size)
    pw = 2.0 / config.size / subject.zoom  # one pixel in head units

    anatomy = _render_anatomy(subject, frame, z, pw)
    img = anatomy.image
    tumour = np.zeros(img.shape, dtype=bool)
    if with_tumour and subject.lesion is not None:
        layers = _lesion_layers(subject.lesion, frame, z, anatomy.parenchyma, pw)
        if layers is not None and layers.mask.sum() >= scaled_min_tumour_pixels(config):
            img = _paint_lesion(img, subject.lesion, layers, subject.tissue.white, anatomy.texture)
            tumour = layers.mask
    if subject.coil_shading:
        img = img * _coil_gain(subject, frame, z)
    return PhantomSlice(
        image=_acquire(img, subject, slice_index, z, frame, config.noise),
        label=int(tumour.any()),
        tumour_mask=tumour.astype(np.uint8),
        anatomy_mask=anatomy.anatomy.astype(np.uint8),
        brain_mask=anatomy.brain.astype(np.uint8),
        subject_id=subject.subject_id,
        slice_index=slice_index,
    )


def generate_phantom(config: PhantomConfig = PhantomConfig()) -> Iterator[PhantomSlice]:  # noqa: B008
    """Yield every slice: subjects in order, slices in order within a subject."""
    for index in range(config.num_subjects):
        subject = sample_subject(config, index)
        for slice_index in range(config.slices_per_subject):
            yield render_slice(subject, slice_index, config)
