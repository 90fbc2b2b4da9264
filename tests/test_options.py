"""``key=value`` options: one parser for the CLI's ``--option`` and the preprocess flow's ``-o``."""

from __future__ import annotations

import pytest

from acol_core.config import ConfigError, parse_key_values


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("num_subjects=8", {"num_subjects": 8}),
        ("num-subjects=8", {"num_subjects": 8}),
        ("size=6.5e1", {"size": "6.5e1"}),  # YAML 1.1: no dot before the exponent, no float
        ("delta=0.5", {"delta": 0.5}),
        ("flag=true", {"flag": True}),
        ("modalities=[t1c, flair]", {"modalities": ["t1c", "flair"]}),
        ("modalities=[t1c]", {"modalities": ["t1c"]}),
        ('params={"a": 1}', {"params": {"a": 1}}),
        ("name=x=y", {"name": "x=y"}),
        ("empty=", {"empty": None}),
    ],
)
def test_values_are_yaml(pair: str, expected: dict) -> None:
    assert parse_key_values([pair]) == expected


@pytest.mark.parametrize("pair", ["novalue", "=3", "bad=[unclosed"])
def test_bad_pairs_are_one_config_error(pair: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_key_values([pair])
    assert "\n" not in str(info.value)
