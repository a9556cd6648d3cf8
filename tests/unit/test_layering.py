"""Who may import whom, one exception root reported once by the CLI, and one list of deployment targets.

Packages import only those below them: backends (copied alone into every rendered repository) <- builder <-
sidecar <- edgestack (the CLI); loadtests uses edgestack and backends. No product code and no test imports
benchmarks/.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAY_IMPORT = {
    "backends": {"backends"},
    "builder": {"backends", "builder"},
    "sidecar": {"backends", "builder", "sidecar"},
    "edgestack": {"backends", "builder", "sidecar", "ensembles", "edgestack"},
    "loadtests": {"backends", "edgestack", "loadtests"},
    "ensembles": {"backends", "builder", "ensembles"},
}
PROJECT = {*MAY_IMPORT, "benchmarks", "tests"}


def imported_packages(folder: Path) -> dict[str, set[str]]:
    """file -> the project's top-level packages its import statements name (at any depth of the file)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & PROJECT
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_those_below_it(package):
    wrong = {path: sorted(names - MAY_IMPORT[package])
             for path, names in imported_packages(ROOT / package).items() if names - MAY_IMPORT[package]}
    assert wrong == {}


def test_no_test_imports_benchmarks():
    assert [path for path, names in imported_packages(ROOT / "tests").items() if "benchmarks" in names] == []


def test_the_cli_loads_no_load_test_or_benchmark_code():
    script = ("import sys, edgestack.cli; edgestack.cli.make_parser(); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'loadtests', 'benchmarks', 'locust', 'gevent'}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_error_derives_from_the_one_root():
    from backends.errors import BackendError, EdgestackError
    from builder.device_class import DeviceClassError
    from builder.errors import BuilderError
    from edgestack import errors
    from edgestack.load import LoadTestError
    from sidecar.errors import SidecarError

    assert errors.EdgestackError is EdgestackError
    for error in (BackendError, BuilderError, DeviceClassError, SidecarError, errors.ServerError, errors.ClientError,
                  LoadTestError):
        assert issubclass(error, EdgestackError), error


def test_the_cli_reports_an_error_once_with_the_command_typed(tmp_path, capsys):
    from edgestack.cli import main

    assert main(["bench", "--url", "127.0.0.1:1", "--images", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"edgestack bench: error: image folder {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "keys" / "old.pem").parent.mkdir()
    (tmp_path / "keys" / "old.pem").write_text("")
    assert main(["keys", "init", "--dir", str(tmp_path / "keys")]) == 2
    assert capsys.readouterr().err.startswith("edgestack keys init: error: ")


def _subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_every_list_of_targets_is_the_one_tuple():
    from builder.device_class import TARGET_CLASSES
    from builder.targets import GPU_TARGETS, ONNX_TARGETS, OPENVINO_TARGETS, TARGET_PROFILES, TARGETS
    from edgestack.cli import make_parser

    assert TARGETS == tuple(TARGET_PROFILES) == ("cpu", "intel", "nvidia-gpu", "jetson")
    assert (GPU_TARGETS, ONNX_TARGETS, OPENVINO_TARGETS) == (("nvidia-gpu", "jetson"), ("cpu", "nvidia-gpu", "jetson"),
                                                             ("intel",))
    assert tuple(TARGET_CLASSES) == TARGETS
    parser = make_parser()
    for command in (("build",), ("bundle", "create"), ("sidecar", "run")):
        target = next(a for a in _subcommand(parser, *command)._actions if a.dest == "target")
        assert tuple(target.choices) == TARGETS, command
