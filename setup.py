"""Package discovery for the lmc layout (the rest of the metadata is in pyproject.toml).

The repository's top-level folders are installed under one import name, as
``[tool.setuptools.package-dir]`` in pyproject.toml maps them (``compiler/`` → ``lmc.compiler``,
``passes/`` → ``lmc.passes``, …). Every folder below a mapped root that holds an ``__init__.py`` is a
package and is found here with ``setuptools.find_packages``, so a new sub-package (such as
``passes/quantize``) ships in the wheel without being listed by hand.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _package_dir() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def discover_packages(package_dir: dict[str, str]) -> list[str]:
    """Every mapped root package plus every package found below its folder, under its mapped name."""
    packages: set[str] = set()
    for name, folder in package_dir.items():
        if not name or not (ROOT / folder / "__init__.py").is_file():
            continue
        packages.add(name)
        packages.update(f"{name}.{sub}" for sub in find_packages(str(ROOT / folder)))
    return sorted(packages)


setup(packages=discover_packages(_package_dir()))
