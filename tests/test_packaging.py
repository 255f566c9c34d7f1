"""The wheel holds every module: an editable install would hide a package pyproject misses."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> where it installs (pyproject's package-dir).
INSTALLED_AS = {
    "carpool": "carpool",
    "orchestrator": "carpool/orchestrator",
    "workers": "carpool/workers",
}


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in out.stdout.split() if (ROOT / f).is_file()]


@pytest.mark.integration
def test_the_wheel_contains_every_module_and_the_console_script(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in tracked_files():  # a copy: building in the checkout would leave build/ behind
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("carpool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{INSTALLED_AS[folder]}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder in INSTALLED_AS
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert not expected - names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "carpool = carpool.orchestrator.cli.main:run" in (
        zipfile.ZipFile(wheel).read(entry_points).decode()
    )
