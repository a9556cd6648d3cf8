"""The fleet's deployment files, checked without a container engine: the compose profile `fleet` (NATS, the
registry, the controller), the sidecar's fleet options, and the registry and fleet Dockerfiles."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
FLEET_DOCKERFILES = {name: ROOT / "docker" / f"Dockerfile.{name}" for name in ("registry", "fleet")}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _interpolate(command: list[str], values: dict[str, str]) -> list[str]:
    """Compose's ${NAME:-default} with `values` set, the defaults elsewhere."""
    def one(match: re.Match) -> str:
        return values.get(match.group(1), match.group(2) or "")
    return [re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", one, part) for part in command]


def test_the_fleet_profile_has_nats_the_registry_and_the_controller(services):
    fleet = {name for name, s in services.items() if "fleet" in s.get("profiles", [])}
    assert fleet == {"nats", "registry", "controller"}
    assert "-js" in services["nats"]["command"], "NATS runs with JetStream"
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"]), "JetStream's store is on a volume"
    depends = services["controller"]["depends_on"]
    assert depends["nats"]["condition"] == depends["registry"]["condition"] == "service_healthy"


def test_the_controller_command_is_one_the_cli_accepts(services):
    from edgestack.cli import make_parser

    args = make_parser().parse_args(services["controller"]["command"])
    assert (args.command, args.fleet_command) == ("fleet", "controller")
    assert args.nats == "nats://nats:4222"
    assert services["controller"]["environment"]["EDGESTACK_REGISTRY"].startswith("http://registry:")


def test_the_sidecar_joins_the_fleet_only_when_given_a_nats_url(services):
    from sidecar.daemon_cli import add_options

    command = services["sidecar"]["command"]
    alone = add_options(argparse.ArgumentParser()).parse_args(_interpolate(command, {}))
    assert not alone.nats, "without EDGESTACK_NATS the sidecar is not in a fleet"
    joined = add_options(argparse.ArgumentParser()).parse_args(
        _interpolate(command, {"EDGESTACK_NATS": "nats://fleet:4222", "EDGESTACK_DEVICE_ID": "gw-17"}))
    assert (joined.nats, joined.device_id) == ("nats://fleet:4222", "gw-17")
    assert joined.triton_metrics == "triton:8002", "latency and errors come from Triton's metrics port"


def test_the_registry_serves_artifacts_with_options_mlflow_server_has(services):
    command = services["registry"]["command"]
    assert "--serve-artifacts" in command
    result = subprocess.run([str(BIN / "mlflow"), "server", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in (c for c in command if c.startswith("--")):
        assert option in result.stdout, f"mlflow server has no {option}"


@pytest.mark.parametrize("name", sorted(FLEET_DOCKERFILES))
def test_fleet_dockerfiles_are_hadolint_clean_and_install_pinned_requirements(name):
    path = FLEET_DOCKERFILES[name]
    result = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    grep = re.search(r"grep -E '\^\(([^)]*)\)==", path.read_text())
    assert grep, f"{path.name} installs the requirements.txt pins through one grep"
    packages = set(grep.group(1).split("|"))
    assert packages <= pinned, f"{path.name} names packages requirements.txt does not pin: {packages - pinned}"
