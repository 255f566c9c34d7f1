"""YAML for the files users write: safe types, and no key given twice.

PyYAML keeps the last value of a repeated key without a word, so a job file
with `name:` twice trains under a name its author may not have meant. The
loader records every repeated key (with both lines) so callers can refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class DuplicateKey:
    key: str
    line: int  # 1-based, of the repeat
    first_line: int

    @property
    def message(self) -> str:
        return f"duplicate key {self.key!r} (first on line {self.first_line})"

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that records keys repeated within one mapping in `duplicates`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[DuplicateKey] = []

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked before the merge keys (`<<: *base`) are flattened in: overriding
        # a merged key is what merging is for, not a repeat.
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                self.duplicates.append(DuplicateKey(str(key), line, first[key]))
            else:
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> tuple[Any, list[DuplicateKey]]:
    """One YAML document, safe types only, and every key repeated in it.

    Raises yaml.YAMLError for text that is not YAML.
    """
    loader = UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
        # Outer mappings are checked before nested ones; report in file order.
        return data, sorted(loader.duplicates, key=lambda d: d.line)
    finally:
        loader.dispose()
