"""The installed `edgestack` command can import every package of the project: pyproject's package list names each
top-level package (the tests import from the checkout, pythonpath ".", so they would not notice one missing)."""
from fnmatch import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_top_level_package_is_installed():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages, "no packages found"
    missing = sorted(name for name in packages if not any(fnmatch(name, pattern) for pattern in include))
    assert not missing, f"pyproject.toml [tool.setuptools.packages.find] include lacks {missing}"
