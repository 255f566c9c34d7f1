"""The layering of DESIGN.md, checked.

Each subsystem folder's `__init__.py` docstring ends with a `May import:` line, the one
place its allowed carpool imports are written: entries are folders (`workers.bank`) or
single modules (`workers.bank.adapter_math`); a folder always imports itself. These
tests read those lines and hold every module of the folder to them, at any depth
(imports inside functions count). Besides: the data plane never imports the control
plane or Ray, Ray stays in the runtime folder, no module import cycle exists anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("workers", "orchestrator")
# The control plane's edge to Ray: actors and metrics, the client, the auth token; and the
# serving application (Ray Serve).
RAY_FOLDERS = {"orchestrator/runtime", "orchestrator/serving"}
# Third-party packages with one home each: a command imports them only where they run.
ONE_HOME = {"deepspeed": "workers/distributed", "bitsandbytes": "workers/base"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth (`from a import b`: a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level names a module imports (`carpool.` stripped: `carpool.workers.x` -> workers)."""
    found = set()
    for name in imported_modules(path):
        parts = name.split(".")
        found.add(parts[1] if parts[0] == "carpool" and len(parts) > 1 else parts[0])
    return found


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def subsystem_folders() -> list[Path]:
    return sorted(
        p for layer in LAYERS for p in (ROOT / layer).iterdir() if (p / "__init__.py").is_file()
    )


def module_name(path: Path) -> str:
    """`workers/bank/adapter_bank.py` -> `carpool.workers.bank.adapter_bank`."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("carpool", *parts)).removesuffix(".__init__")


def may_import(folder: Path) -> set[str]:
    """The entries of the folder's `May import:` line, without `carpool.`."""
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    lines = [line for line in doc.splitlines() if line.startswith("May import:")]
    assert len(lines) == 1, f"{folder.name}/__init__.py: no single 'May import:' line"
    entries = lines[0].removeprefix("May import:").strip()
    if entries == "nothing else of carpool":
        return set()
    return {entry.strip() for entry in entries.split(",")}


def carpool_imports(path: Path) -> set[str]:
    """The carpool modules a file imports, without `carpool.` (packages' own names kept)."""
    return {
        m.removeprefix("carpool.")
        for m in imported_modules(path)
        if m.startswith("carpool.") and m.split(".")[1] in LAYERS
    }


def allowed(name: str, own: str, entries: set[str]) -> bool:
    """`name` (say `workers.bank.adapter_math`) is the folder's own, a layer's package itself,
    or within an allowed entry (a folder or a module)."""
    if name in LAYERS or name == own or name.startswith(own + "."):
        return True
    return any(name == e or name.startswith(e + ".") for e in entries)


@pytest.mark.parametrize("folder", subsystem_folders(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_folder_imports_only_what_its_docstring_allows(folder: Path) -> None:
    own = f"{folder.parent.name}.{folder.name}"
    entries = may_import(folder)
    unknown = {e for e in entries if not (ROOT / Path(*e.split("."))).exists()} - {
        e for e in entries if (ROOT / Path(*e.split("."))).with_suffix(".py").exists()
    }
    assert not unknown, f"{own}: 'May import' names what does not exist: {sorted(unknown)}"
    wrong = {
        f"{p.relative_to(ROOT)} imports {name}"
        for p in modules(str(folder.relative_to(ROOT)))
        for name in carpool_imports(p)
        # `carpool.workers.bank` named by `from carpool.workers.bank.x import y` is fine
        if not allowed(name, own, entries)
        and not any(
            allowed(n, own, entries) for n in carpool_imports(p) if n.startswith(name + ".")
        )
    }
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_lives_in_a_subsystem_folder() -> None:
    loose = [
        p.name for layer in LAYERS for p in (ROOT / layer).glob("*.py") if p.name != "__init__.py"
    ]
    assert not loose


def test_the_cli_reaches_the_engine_only_through_local_train() -> None:
    """`carpool train` runs the engine in this process (`local_train`); every other CLI
    command reaches training through the client."""
    engine = {"workers.training.engine", "workers.training.rounds"}
    reaching = [p.name for p in modules("orchestrator/cli") if carpool_imports(p) & engine]
    assert reaching == ["local_train.py"]


@pytest.mark.parametrize("path", modules("workers"), ids=lambda p: str(p.relative_to(ROOT)))
def test_workers_import_neither_orchestrator_nor_ray(path: Path) -> None:
    assert not imported_packages(path) & {"orchestrator", "ray"}


@pytest.mark.parametrize("path", modules("orchestrator"), ids=lambda p: str(p.relative_to(ROOT)))
def test_ray_stays_at_the_control_planes_edge(path: Path) -> None:
    if str(path.parent.relative_to(ROOT)) not in RAY_FOLDERS:
        assert "ray" not in imported_packages(path)


@pytest.mark.parametrize("package", sorted(ONE_HOME))
def test_heavy_packages_are_imported_only_in_their_home(package: str) -> None:
    importers = {
        str(p.parent.relative_to(ROOT))
        for layer in LAYERS
        for p in modules(layer)
        if package in imported_packages(p)
    }
    assert importers <= {ONE_HOME[package]}


def test_no_module_import_cycle() -> None:
    """Imports inside functions count too: a cycle there still ties two modules together."""
    paths = {module_name(p): p for layer in LAYERS for p in modules(layer)}
    graph = {
        name: {f"carpool.{m}" for m in carpool_imports(p)} & paths.keys() - {name}
        for name, p in paths.items()
    }
    # A package's `__init__` imports nothing; its submodules are what matter.
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = stack[stack.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize(
    "path",
    [p for d in ("carpool", *LAYERS, "tests", "benchmarks") for p in modules(d)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_project_code_is_imported_through_the_carpool_namespace(path: Path) -> None:
    """From the repository root `import workers` would also work, as a second copy of every
    module (two `Engine` classes, two registries): only `carpool.workers` is the package."""
    bare = {m for m in imported_modules(path) if m.split(".")[0] in LAYERS}
    assert not bare


@pytest.mark.parametrize("path", modules("tests"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tests_share_helpers_not_test_files(path: Path) -> None:
    """Shared builders live in helpers modules and fixtures in conftest.py: importing a test
    file runs its module-level code (marks, fixtures) in another test's module."""
    shared = {
        m
        for m in imported_modules(path)
        if m.startswith("tests.") and m.split(".")[-1].startswith(("test_", "conftest"))
    }
    assert not shared


def test_the_check_sees_imports_at_any_depth(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from carpool.orchestrator.cli.main import main\n    import ray.util\n"
    )
    assert imported_packages(module) >= {"orchestrator", "ray"}


def test_the_folder_check_refuses_an_import_its_docstring_does_not_allow() -> None:
    assert allowed("workers.bank.adapter_math", "workers.training", {"workers.bank"})
    assert allowed("workers.bank.adapter_math", "orchestrator.cli", {"workers.bank.adapter_math"})
    assert not allowed(
        "workers.bank.adapter_bank", "orchestrator.cli", {"workers.bank.adapter_math"}
    )
    assert not allowed("workers.training.engine", "workers.peft_files", {"workers.variants"})
