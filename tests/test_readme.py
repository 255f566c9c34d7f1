"""The README's Python examples name modules and objects that exist where it says."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def carpool_imports(block: str) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("carpool"):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_the_readme_has_python_examples_that_import_carpool() -> None:
    assert sum(len(carpool_imports(b)) for b in python_blocks()) >= 4


@pytest.mark.parametrize(
    ("module", "name"), [pair for block in python_blocks() for pair in carpool_imports(block)]
)
def test_each_name_a_readme_example_imports_exists(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"
