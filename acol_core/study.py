"""Studies: models × seeds × data presets, every cell trained, localised and evaluated the same way.

A study answers "does method X beat CAM here?" with the project's rule for such claims: a mean over at
least 3 seeds with its sd, thresholds and checkpoints chosen on val rows only, and a paired interval
of the difference against a baseline on the same test rows. ``acol study`` runs one
(``acol_core.jobs.study_run``); this module is the Ray-free part: the config, the folder layout, the
aggregation of the cells' evaluations and the generated Markdown table.

A study config is YAML::

    name: demo                       # the study's folder under --storage
    seeds: [0, 1, 2]                 # training seeds (initialisation and row order)
    baseline: cam                    # paired differences are taken against this label
    presets:                         # datasets: one prepared per preset (its own data seed), or given
      standard:
        source: phantom
        source_options: {num_subjects: 100, slices_per_subject: 8, size: 96}
        fullsup_per_class: 20
      mine:
        data: s3://bucket/datasets/brats-2d   # an existing dataset
    models:
      - {label: cam, model: cam}
      - {label: acol, model: acol, options: {delta: 0.9}}
      - {label: cam+mri-aug, model: cam, train: {intensity_augment: 0.5}}   # TrainConfig overrides
      - {label: cam+gate, model: cam, localize: {gate: anatomy}}            # localize options
    train: {epochs: 12, image_size: 96, batch_size: 16, lr: 0.02}   # TrainConfig fields for every cell

The layout under ``<storage>/<name>/``::

    <preset>/data/                              the prepared dataset (unless the preset names one)
    <preset>/<label>/seed-<s>/train/            Ray Train storage of that cell
    <preset>/<label>/seed-<s>/model.safetensors its export (the checkpoint selection's pick)
    <preset>/<label>/seed-<s>/predictions/      val + test predictions
    <preset>/<label>/seed-<s>/evaluation.json   ``acol evaluate`` of the test split
    results.json                                per preset and label: each seed's metrics, mean ± sd,
                                                the paired difference against the baseline
    results.md                                  the table generated from results.json

Every cell's outputs are committed files, so running the same command again skips what is done.

Examples:
    >>> cfg = parse_study({"name": "s", "seeds": [0, 1, 2], "presets": {"p": {"data": "runs/d"}},
    ...                    "models": [{"model": "cam"}, {"label": "acol", "model": "acol"}]})
    >>> [c.key for c in cfg.cells()][:3]
    ['p/cam/seed-0', 'p/acol/seed-0', 'p/cam/seed-1']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from acol_core.config import ConfigError, TrainConfig
from acol_core.runs import check_label
from acol_core.storage import join

__all__ = [
    "METRICS",
    "StudyCell",
    "StudyConfig",
    "StudyPreset",
    "load_study",
    "metric_values",
    "parse_study",
    "results_markdown",
]

# (key in results.json, column title, where it lives in an evaluation report)
METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("accuracy", "accuracy", ("classification", "accuracy")),
    ("balanced_accuracy", "balanced acc.", ("classification", "balanced_accuracy")),
    ("pxap", "PxAP", ("localization", "overall", "pxap")),
    ("max_box_acc_v2", "MaxBoxAccV2", ("localization", "overall", "max_box_acc_v2")),
    ("dice", "Dice (val τ)", ("localization", "overall", "dice_iou", "dice")),
    ("off_target_share", "off-target", ("localization", "overall", "off_target_share")),
)
_PRESET_KEYS = {"source", "input", "source_options", "fullsup_per_class", "seed", "data", "split_fractions"}
_MODEL_KEYS = {"label", "model", "options", "train", "localize"}
_LOCALIZE_KEYS = {"gate"}
_TOP_KEYS = {"name", "description", "seeds", "baseline", "presets", "models", "train", "workers"}


@dataclass(frozen=True)
class StudyPreset:
    """One dataset of the study: prepared from a source, or an existing dataset (``data``)."""

    name: str
    source: str = "phantom"
    input: str | None = None
    source_options: dict[str, Any] = field(default_factory=dict)
    fullsup_per_class: int | None = None
    seed: int = 0
    data: str | None = None
    split_fractions: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class StudyCell:
    """One training run of the study: a preset, a model label and a seed."""

    preset: str
    label: str
    model: str
    options: dict[str, Any]
    seed: int
    train: dict[str, Any] = field(default_factory=dict)
    localize: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.preset}/{self.label}/seed-{self.seed}"

    @property
    def training(self) -> str:
        """What its training depends on: cells equal here (e.g. a model localized with and without a
        gate) share one trained model."""
        return json.dumps([self.preset, self.model, self.options, self.train, self.seed], sort_keys=True)


@dataclass
class StudyConfig:
    name: str
    seeds: list[int]
    presets: dict[str, StudyPreset]
    models: list[dict[str, Any]]
    train: dict[str, Any]
    baseline: str | None = None
    description: str = ""
    workers: int = 1

    def cells(self) -> list[StudyCell]:
        """Every (seed, preset, model), in that nesting order: a study stopped half-way has whole seeds of
        every preset."""
        return [
            StudyCell(preset, m["label"], m["model"], dict(m["options"]), seed, m["train"], m["localize"])
            for seed in self.seeds
            for preset in self.presets
            for m in self.models
        ]

    def twin(self, cell: StudyCell) -> StudyCell:
        """The first cell with the same training as ``cell`` (itself when none comes before it)."""
        return next(c for c in self.cells() if c.training == cell.training)

    def train_config(self, cell: StudyCell) -> TrainConfig:
        return TrainConfig.from_dict(
            {
                **self.train,
                **cell.train,
                "model": cell.model,
                "model_options": cell.options,
                "seed": cell.seed,
            }
        )

    # ------------------------------------------------------------ layout

    def root(self, storage: str) -> str:
        return join(storage, self.name)

    def data_uri(self, storage: str, preset: str) -> str:
        given = self.presets[preset].data
        return given if given else join(self.root(storage), preset, "data")

    def cell_uri(self, storage: str, cell: StudyCell) -> str:
        return join(self.root(storage), cell.preset, cell.label, f"seed-{cell.seed}")


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _known_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise _fail(
            where, f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(allowed))})"
        )


def _parse_preset(name: str, raw: Any, where: str) -> StudyPreset:
    if not isinstance(raw, Mapping):
        raise _fail(where, "a preset is a mapping (source/source_options/... or data)")
    _known_keys(raw, _PRESET_KEYS, where)
    fractions = raw.get("split_fractions")
    if fractions is not None:
        from acol_core.data.splits import check_fractions

        try:
            fractions = check_fractions([float(f) for f in fractions])
        except (TypeError, ValueError) as exc:
            raise _fail(where, str(exc)) from None
    fullsup = raw.get("fullsup_per_class")
    if fullsup is not None and int(fullsup) < 0:
        raise _fail(where, f"fullsup_per_class must be >= 0, got {fullsup}")
    return StudyPreset(
        name=check_label(name),
        source=str(raw.get("source", "phantom")),
        input=raw.get("input"),
        source_options=dict(raw.get("source_options") or {}),
        fullsup_per_class=None if fullsup is None else int(fullsup),
        seed=int(raw.get("seed", 0)),
        data=raw.get("data"),
        split_fractions=fractions,
    )


def _parse_models(raw: Any) -> list[dict[str, Any]]:
    from acol_core.models import list_models

    if not isinstance(raw, list) or not raw:
        raise _fail("models", "give a non-empty list of {label?, model, options?}")
    models, seen = [], set()
    for i, spec in enumerate(raw):
        where = f"models[{i}]"
        if not isinstance(spec, Mapping):
            raise _fail(where, "each model is a mapping {label?, model, options?}")
        _known_keys(spec, _MODEL_KEYS, where)
        name = spec.get("model")
        if name not in list_models():
            raise _fail(where, f"unknown model {name!r} (known: {', '.join(list_models())})")
        try:
            label = check_label(str(spec.get("label") or name))
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
        if label in seen:
            raise _fail(where, f"label {label!r} used twice")
        seen.add(label)
        train = dict(spec.get("train") or {})
        for key in ("model", "model_options", "seed"):
            if key in train:
                raise _fail(f"{where}.train.{key}", "set by the model entry and the seeds, not here")
        localize = dict(spec.get("localize") or {})
        _known_keys(localize, _LOCALIZE_KEYS, f"{where}.localize")
        if "gate" in localize:
            from acol_core.gating import check_gate

            try:
                check_gate(localize["gate"])
            except ValueError as exc:
                raise _fail(f"{where}.localize.gate", str(exc)) from None
        models.append(
            {
                "label": label,
                "model": name,
                "options": dict(spec.get("options") or {}),
                "train": train,
                "localize": localize,
            }
        )
    return models


def parse_study(data: Any, source: str = "<study>") -> StudyConfig:
    """Validate a study config (see the module docstring); every error names the offending key."""
    if not isinstance(data, Mapping):
        raise _fail(source, "a study config is a mapping")
    _known_keys(data, _TOP_KEYS, source)
    try:
        name = check_label(str(data.get("name") or ""))
    except ValueError as exc:
        raise _fail(f"{source}: name", str(exc)) from None
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise _fail(f"{source}: seeds", f"give a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _fail(f"{source}: seeds", f"repeated seed in {seeds}")
    presets_raw = data.get("presets")
    if not isinstance(presets_raw, Mapping) or not presets_raw:
        raise _fail(f"{source}: presets", "give at least one preset (name: {source: ...} or {data: URI})")
    presets = {str(k): _parse_preset(str(k), v, f"{source}: presets.{k}") for k, v in presets_raw.items()}
    models = _parse_models(data.get("models"))
    labels = [m["label"] for m in models]
    baseline = data.get("baseline", "cam" if "cam" in labels else None)
    if baseline is not None and baseline not in labels:
        raise _fail(f"{source}: baseline", f"{baseline!r} is not a model label ({', '.join(labels)})")
    train = dict(data.get("train") or {})
    for key in ("model", "model_options", "seed"):
        if key in train:
            raise _fail(f"{source}: train.{key}", "set per model (models) or per cell (seeds), not in train")
    workers = int(data.get("workers", 1))
    if workers < 1:
        raise _fail(f"{source}: workers", f"must be >= 1, got {workers}")
    config = StudyConfig(
        name=name, seeds=list(seeds), presets=presets, models=models, train=train,
        baseline=baseline, description=str(data.get("description") or ""), workers=workers,
    )  # fmt: skip
    from acol_core.models import check_model_options

    for cell in config.cells()[: len(models)]:
        try:  # every model's options and the shared train fields, before any work
            check_model_options(cell.model, config.train_config(cell).model_options)
        except (ConfigError, TypeError, ValueError) as exc:
            raise _fail(f"{source}: models/{cell.label}", str(exc)) from None
    return config


def load_study(uri: str) -> StudyConfig:
    """Read and validate a study YAML from a path or URI."""
    from acol_core.config import read_yaml

    return parse_study(read_yaml(uri), source=uri)


# ------------------------------------------------------------ aggregation


def metric_values(report: Mapping[str, Any]) -> dict[str, float]:
    """The study's metrics (``METRICS``) read from one evaluation report; absent ones are left out."""
    out: dict[str, float] = {}
    for key, _, path in METRICS:
        value: Any = report
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def _cell(value: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not value or value.get("mean") is None:
        return "–"
    if value.get("n", 0) < 2 or value.get("sd") is None:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"


def _diff(value: Mapping[str, Any] | None) -> str:
    if not value:
        return "–"
    return f"{value['diff']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The study's table (mean ± sd over seeds per metric, ΔPxAP vs the baseline with its 95 % interval),
    generated from ``results.json``: never edit the output by hand."""
    lines = [
        f"# Study `{results['name']}`",
        "",
        f"Generated by `acol study` from `{results.get('results_uri', 'results.json')}`; do not edit.",
        f"Seeds {', '.join(str(s) for s in results['seeds'])}; mean ± sd over seeds (sample sd); test split, "
        "thresholds and checkpoints chosen on val rows only; box metrics use wsolevaluation's protocol.",
    ]
    if results.get("description"):
        lines += ["", str(results["description"]).strip()]
    baseline = results.get("baseline")
    for preset, block in results["presets"].items():
        header = ["model", *[title for _, title, _ in METRICS]]
        if baseline:
            header.append(f"ΔPxAP vs {baseline} [95 % CI]")
        lines += ["", f"## {preset}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, entry in block["models"].items():
            row = [label, *[_cell(entry["summary"].get(key)) for key, _, _ in METRICS]]
            if baseline:
                row.append("(baseline)" if label == baseline else _diff(entry.get("paired_pxap")))
            lines.append("| " + " | ".join(row) + " |")
        seeds_done = {label: len(e["seeds"]) for label, e in block["models"].items()}
        if any(n < len(results["seeds"]) for n in seeds_done.values()):
            lines += ["", f"Seeds finished per model: {json.dumps(seeds_done)}"]
    lines += [
        "",
        "ΔPxAP: PxAP of the model's maps minus the baseline's on the same test images, the seeds pooled "
        "(seed s of one paired with seed s of the other); 95 % interval: paired bootstrap over "
        "(seed, image) pairs.",
    ]
    return "\n".join(lines) + "\n"


def seed_sequences(values: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """Per metric, the values of every seed that has it."""
    out: dict[str, list[float]] = {}
    for v in values:
        for key, x in v.items():
            out.setdefault(key, []).append(float(x))
    return out


def aggregate(config: StudyConfig, storage: str, n_boot: int = 2000) -> dict[str, Any]:
    """Read every finished cell's evaluation and predictions into the study's results (``results.json``).

    Per preset and label: each seed's metrics, their mean ± sd (``acol_core.stats.summarize_seeds``),
    and, against the baseline, the paired PxAP difference on the test rows with a 95 % bootstrap
    interval (``acol_core.stats.paired_bootstrap_histograms``) over (seed, image) pairs, using the seeds
    where both cells finished.
    """
    import numpy as np

    from acol_core.evaluate import object_histograms
    from acol_core.stats import paired_bootstrap_histograms, summarize_seeds
    from acol_core.storage import exists, read_bytes

    presets: dict[str, Any] = {}
    for preset in config.presets:
        data = config.data_uri(storage, preset)
        block: dict[str, Any] = {"data": data, "models": {}}
        for m in config.models:
            seeds: dict[str, Any] = {}
            for seed in config.seeds:
                cell = StudyCell(preset, m["label"], m["model"], m["options"], seed)
                uri = join(config.cell_uri(storage, cell), "evaluation.json")
                if exists(uri):
                    seeds[str(seed)] = metric_values(json.loads(read_bytes(uri)))
            block["models"][m["label"]] = {
                "model": m["model"],
                "options": m["options"],
                "seeds": seeds,
                "summary": summarize_seeds(list(seeds.values())),
            }
        hists: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

        def hist(label: str, seed: int, preset: str = preset, data: str = data, hists: dict = hists) -> Any:
            if (label, seed) not in hists:
                cell = StudyCell(preset, label, "", {}, seed)
                predictions = join(config.cell_uri(storage, cell), "predictions")
                hists[(label, seed)] = object_histograms(predictions, data, "test")
            return hists[(label, seed)]

        baseline = config.baseline
        for m in config.models if baseline else []:
            label = m["label"]
            both = [
                s
                for s in config.seeds
                if label != baseline
                and str(s) in block["models"][label]["seeds"]
                and str(s) in block["models"][baseline]["seeds"]
            ]
            if not both or hist(label, both[0])[0].shape[0] == 0:
                continue
            a = tuple(np.concatenate([hist(label, s)[k] for s in both]) for k in (0, 1))
            b = tuple(np.concatenate([hist(baseline, s)[k] for s in both]) for k in (0, 1))
            paired = paired_bootstrap_histograms(a, b, n_boot=n_boot, seed=0)
            block["models"][label]["paired_pxap"] = {**paired, "seeds": both}
        presets[preset] = block
    return {
        "name": config.name,
        "description": config.description,
        "seeds": config.seeds,
        "baseline": config.baseline,
        "train": config.train,
        "presets": presets,
    }
