"""The YAML loader for user files: a key given twice is found, with both lines."""

from __future__ import annotations

import pytest
import yaml
from carpool.orchestrator.spec_check.yaml_loader import DuplicateKey, load_yaml


def test_repeated_keys_are_found_at_every_level() -> None:
    text = "name: a\nadapter:\n  r: 4\n  r: 8\nname: b\n"
    data, duplicates = load_yaml(text)
    assert data == {"name": "b", "adapter": {"r": 8}}
    assert [str(d) for d in duplicates] == [
        "line 4: duplicate key 'r' (first on line 3)",
        "line 5: duplicate key 'name' (first on line 1)",
    ]


def test_same_key_in_different_mappings_is_no_repeat() -> None:
    text = "dataset:\n  path: a.jsonl\neval_dataset:\n  path: b.jsonl\nlist:\n- {x: 1}\n- {x: 2}\n"
    assert load_yaml(text)[1] == []


def test_keys_that_mean_the_same_value_are_repeats() -> None:
    # "r" and r are one key once parsed, so the second silently replaced the first.
    assert load_yaml('r: 4\n"r": 8\n')[1] == [DuplicateKey("r", 2, 1)]


def test_overriding_a_merged_key_is_no_repeat() -> None:
    text = "base: &b {r: 4, lora_alpha: 8}\nadapter:\n  <<: *b\n  r: 16\n"
    data, duplicates = load_yaml(text)
    assert data["adapter"] == {"r": 16, "lora_alpha": 8} and duplicates == []


def test_only_safe_types() -> None:
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']\n")
