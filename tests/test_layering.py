"""The layering of DESIGN.md, checked: the data plane never imports the control plane or Ray,
and Ray stays in the few control-plane modules named here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The control plane's edges to Ray: actors and metrics, the client, the auth token.
RAY_EDGES = {"ray_runtime.py", "client.py", "ray_auth.py"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports (`carpool.` stripped: `carpool.workers.x` -> workers)."""
    found = set()
    for name in imported_modules(path):
        parts = name.split(".")
        found.add(parts[1] if parts[0] == "carpool" and len(parts) > 1 else parts[0])
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules("workers"), ids=lambda p: p.name)
def test_workers_import_neither_orchestrator_nor_ray(path: Path) -> None:
    assert not imported_packages(path) & {"orchestrator", "ray"}


@pytest.mark.parametrize("path", modules("orchestrator"), ids=lambda p: p.name)
def test_ray_stays_at_the_control_planes_edges(path: Path) -> None:
    if path.name not in RAY_EDGES:
        assert "ray" not in imported_packages(path)


@pytest.mark.parametrize(
    "path",
    [p for d in ("carpool", "orchestrator", "workers", "tests", "benchmarks") for p in modules(d)],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_project_code_is_imported_through_the_carpool_namespace(path: Path) -> None:
    """From the repository root `import workers` would also work, as a second copy of every
    module (two `Engine` classes, two registries): only `carpool.workers` is the package."""
    bare = {m for m in imported_modules(path) if m.split(".")[0] in ("orchestrator", "workers")}
    assert not bare


@pytest.mark.parametrize("path", modules("tests"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_tests_share_helpers_not_test_files(path: Path) -> None:
    """Shared builders live in tests/helpers/ and fixtures in conftest.py: importing a test
    file runs its module-level code (marks, fixtures) in another test's module."""
    shared = {m for m in imported_modules(path) if m.startswith(("tests.test_", "tests.conftest"))}
    assert not shared


def test_the_check_sees_imports_at_any_depth(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from carpool.orchestrator.cli import main\n    import ray.util\n"
    )
    assert imported_packages(module) >= {"orchestrator", "ray"}
