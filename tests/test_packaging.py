"""Packaging: the wheel (`pip install .`, non-editable) holds every package of the source tree."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the import name it is installed under (pyproject.toml's [tool.setuptools.package-dir]).
ROOTS = {"lmc": "lmc", "core": "lmc.core", "compiler": "lmc.compiler", "passes": "lmc.passes", "targets": "lmc.targets",
         "models": "lmc.models"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")


def _source_packages() -> dict[str, Path]:
    found = {}
    for folder, name in ROOTS.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / folder)
            if "__pycache__" in rel.parts:
                continue
            found[".".join([name, *rel.parts])] = init.parent
    return found


@pytest.mark.packaging
def test_wheel_holds_every_source_package(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build without isolation)")
    # Build from a copy, so the test writes no build/ or *.egg-info into the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for folder in ROOTS:
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("lmc-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())

    packages = _source_packages()
    assert "lmc.passes.quantize" in packages and "lmc.passes.fuse" in packages
    missing = [pkg for pkg in packages if pkg.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    # Every module of every package, and the target descriptions (package data).
    for pkg, folder in packages.items():
        for module in folder.glob("*.py"):
            assert f"{pkg.replace('.', '/')}/{module.name}" in names, f"{pkg}.{module.stem} missing from the wheel"
    tomls = sorted(p.name for p in (REPO / "targets").glob("*.toml"))
    assert tomls and all(f"lmc/targets/{t}" in names for t in tomls)
