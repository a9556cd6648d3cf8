"""The deployment files, checked without a container engine.

- docker-compose.yml validates against the compose specification (check-jsonschema's vendored
  schema) and has the properties a device deployment needs;
- every Dockerfile is hadolint-clean and multi-stage the way docs/DEPLOY.md says;
- docker/entrypoint.sh, the images' entrypoint, is run for real: it starts a tritonserver on free
  loopback ports, and a SIGTERM to it stops the server and everything it started (integration).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from edgestack.server import TritonInstall, TritonServer, find_triton, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = {name: DOCKER / f"Dockerfile.{name}" for name in ("cpu", "gpu", "sidecar")}
TRITON_IMAGES = ("cpu", "gpu")
TRITON_SERVICES = ("triton", "triton-gpu", "triton-cloud")
TRITON_PORTS = {"8000", "8001", "8002"}
SOURCE_DIRS = ("edgestack/", "builder/", "backends/")


def run_tool(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    tool = Path(cmd[0])
    if not tool.is_file():
        pytest.fail(f"{tool} is missing: it comes with requirements.txt (make setup)")
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_validates_against_the_compose_spec():
    result = run_tool(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, f"check-jsonschema failed:\n{result.stdout}{result.stderr}"


def test_compose_uses_the_compose_spec_without_version(compose):
    assert "version" not in compose
    assert set(TRITON_SERVICES) | {"sidecar"} <= set(compose["services"])


def _bytes(size: str | int) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).strip().lower())
    assert match, f"unreadable size {size!r}"
    return int(match[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]


def _container_ports(service: dict) -> set[str]:
    return {str(p).rsplit(":", 1)[-1].split("/")[0] for p in service.get("ports", [])}


def _host_ports(service: dict) -> set[str]:
    return {str(p).rsplit(":", 1)[0] for p in service.get("ports", [])}


@pytest.mark.parametrize("name", TRITON_SERVICES)
def test_triton_services_are_ready_for_the_python_backend(compose, name):
    service = compose["services"][name]
    # 5 Python-backend instances x 32 MiB regions at start on CPU: Docker's 64 MiB is too small.
    assert _bytes(service["shm_size"]) >= 256 * 2**20
    test = service["healthcheck"]["test"]
    assert "/v2/health/ready" in (test if isinstance(test, str) else " ".join(test))
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service.get("init") is True, "an init forwards SIGTERM and reaps the backend stubs"
    assert _container_ports(service) == TRITON_PORTS
    # Published ports must reach the server: the entrypoint's tritonserver mode on 0.0.0.0.
    assert service["environment"]["EDGESTACK_SERVER"] == "tritonserver"
    assert service["environment"]["BIND_ADDRESS"] == "0.0.0.0"
    assert service["environment"]["MODEL_REPOSITORY"] == "/models"


def test_cpu_triton_is_the_default_service(compose):
    triton = compose["services"]["triton"]
    assert "profiles" not in triton
    assert triton["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "models" in triton["build"]["additional_contexts"]


def test_gpu_triton_reserves_an_nvidia_gpu_on_the_nvidia_profile(compose):
    gpu = compose["services"]["triton-gpu"]
    assert gpu["profiles"] == ["nvidia"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_sidecar_shares_the_model_repository_volume_with_triton(compose):
    services = compose["services"]
    named = set(compose["volumes"])

    def volumes(service: dict) -> dict[str, str]:
        mounts = (str(v).split(":") for v in service.get("volumes", []))
        return {m[0]: m[1] for m in mounts if m[0] in named}

    shared = volumes(services["triton"]).keys() & volumes(services["sidecar"]).keys()
    assert shared, "triton and sidecar share no named volume"
    for volume in shared:
        assert volumes(services["triton"])[volume] == "/models"
    sidecar = services["sidecar"]
    assert sidecar["build"]["dockerfile"] == "docker/Dockerfile.sidecar"
    assert sidecar["restart"] in ("always", "unless-stopped", "on-failure")
    assert sidecar["depends_on"]["triton"]["condition"] == "service_healthy"


def test_sidecar_service_runs_the_daemon_against_an_explicit_mode_triton(compose):
    """The sidecar's command is one the daemon accepts, aimed at the triton service, with its state on a volume
    and the image's root.json; triton runs in explicit model-control mode so its load/unload API is open."""
    import argparse

    from sidecar.daemon_cli import add_options

    services = compose["services"]
    sidecar = services["sidecar"]
    args = add_options(argparse.ArgumentParser()).parse_args(sidecar["command"])
    assert args.repository == "/models" and args.triton_http == "triton:8000"
    assert args.root == "/etc/edgestack/root.json"
    state_mounts = {v.split(":")[1]: v.split(":")[0] for v in sidecar["volumes"]}
    assert Path(args.state_dir).parent.as_posix() in state_mounts and Path(args.trust_dir).parent.as_posix() in state_mounts
    assert state_mounts[Path(args.state_dir).parent.as_posix()] in compose["volumes"], "sidecar state on a named volume"
    assert sidecar["build"]["additional_contexts"]["keys"].startswith("${EDGESTACK_KEYS")
    for name in TRITON_SERVICES:
        assert services[name]["environment"]["MODEL_CONTROL_MODE"] == "explicit"
    assert "**/*.pem" in (ROOT / ".dockerignore").read_text().splitlines(), "private keys must stay out of images"


def test_cloud_profile_serves_the_fallback_on_other_ports(compose):
    cloud = [s for s in compose["services"].values() if "cloud" in s.get("profiles", [])]
    assert len(cloud) == 1
    assert cloud[0]["build"]["args"]["CLOUD_URL"] == "", "the cloud's own router must not route again"
    assert not _host_ports(cloud[0]) & _host_ports(compose["services"]["triton"])


# --- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += " " + line.strip() if current else line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        logical.append(current)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) >= 3 and words[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_hadolint_clean(name):
    result = run_tool(BIN / "hadolint", DOCKERFILES[name])
    assert result.returncode == 0, f"hadolint {DOCKERFILES[name].name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runtime_stage_copies_from_the_builder_stage(name):
    stages = parse_dockerfile(DOCKERFILES[name])
    names = [s.name for s in stages]
    assert "builder" in names
    runtime = stages[-1]
    assert runtime.name is None and runtime.base != "scratch"
    assert any(args.startswith("--from=builder") or " --from=builder" in f" {args}"
               for args in runtime.args_of("COPY")), f"{name}: the runtime stage copies nothing from builder"
    # The runtime stage installs nothing from the source tree and runs as a non-root user.
    assert not any(any(d in args for d in SOURCE_DIRS) and "--from" not in args for args in runtime.args_of("COPY"))
    users = runtime.args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_requirements_are_copied_before_the_source(name):
    """Layer order: a code change must not invalidate the dependency install."""
    copies = [(i, args) for i, (ins, args) in enumerate(
        (ins, args) for stage in parse_dockerfile(DOCKERFILES[name]) for ins, args in stage.instructions)
        if ins == "COPY" and "--from" not in args]
    requirements = [i for i, args in copies if "requirements.txt" in args]
    source = [i for i, args in copies if any(d in args.split() for d in SOURCE_DIRS) or args.split()[0] == "."]
    assert requirements and source, f"{name}: expected COPYs of requirements.txt and of the source"
    assert min(requirements) < min(source)


@pytest.mark.parametrize("name", TRITON_IMAGES)
def test_triton_images_serve_through_the_entrypoint(name):
    stages = parse_dockerfile(DOCKERFILES[name])
    runtime = stages[-1]
    assert runtime.args_of("EXPOSE") == ["8000 8001 8002"]
    assert any("/v2/health/ready" in args for args in runtime.args_of("HEALTHCHECK"))
    assert any("docker/entrypoint.sh" in args for args in runtime.args_of("COPY"))
    assert runtime.args_of("ENTRYPOINT") == ['["/usr/local/bin/edgestack-entrypoint"]']
    assert any("--from=builder" in args and "/models" in args for args in runtime.args_of("COPY"))
    builder = next(s for s in stages if s.name == "builder")
    target = {"cpu": "cpu", "gpu": "nvidia-gpu"}[name]
    build = [args for args in builder.args_of("RUN") if "edgestack build" in args]
    assert build and f"--target {target}" in build[0] and "--out /models" in build[0]
    assert any(args.startswith("SPEC=") for args in builder.args_of("ARG")), "the spec must be a build arg"
    # The models come in through a stage a named build context replaces.
    assert any(s.name == "models" and s.base == "scratch" for s in stages)


def test_gpu_image_is_pinned_to_one_triton_release():
    stages = parse_dockerfile(DOCKERFILES["gpu"])
    bases = {s.base for s in stages if s.base != "scratch"}
    assert bases == {"nvcr.io/nvidia/tritonserver:24.10-py3"}
    install = " ".join(stages[-1].args_of("RUN"))
    for package in ("numpy==1.", "opencv-python-headless==4.", "pillow==", "cupy-cuda12x==", "tritonclient[grpc]=="):
        assert package in install, f"runtime stage does not pin {package}"


def test_cpu_image_is_python_slim_and_serves_with_edgestack_by_default():
    stages = parse_dockerfile(DOCKERFILES["cpu"])
    assert all(s.base.startswith("python:3.11-slim") for s in stages if s.base not in ("scratch", "deps"))
    env = " ".join(stages[-1].args_of("ENV"))
    assert "EDGESTACK_SERVER=edgestack" in env


def test_sidecar_image_runs_the_sidecar_module_with_the_image_root():
    stages = parse_dockerfile(DOCKERFILES["sidecar"])
    runtime = stages[-1]
    assert runtime.args_of("ENTRYPOINT") == ['["python", "-m", "sidecar"]']
    cmd = json.loads(runtime.args_of("CMD")[0])
    assert cmd[cmd.index("--root") + 1] == "/etc/edgestack/root.json"
    assert "--from=keys /root.json /etc/edgestack/root.json" in runtime.args_of("COPY")
    keys = next(s for s in stages if s.name == "keys")
    assert keys.base == "scratch" and keys.args_of("COPY") == ["keys/root.json /root.json"], "only root.json"
    deps = " ".join(next(s for s in stages if s.name == "deps").args_of("RUN"))
    for package in ("cryptography", "bsdiff4", "zstandard", "tritonclient", "opencv-python-headless", "pillow"):
        assert package in deps, f"the sidecar image does not install {package}"


# --- entrypoint ------------------------------------------------------------------------------


def test_entrypoint_is_posix_sh():
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, re.M)
    assert len(re.findall(r"^\s*exec ", text, re.M)) == 2, "both servers are exec'd"
    for shell in ("sh", "dash", "bash"):
        path = shutil.which(shell)
        if path:
            args = [path, "--posix", "-n"] if shell == "bash" else [path, "-n"]
            result = subprocess.run([*args, str(ENTRYPOINT)], capture_output=True, text=True)
            assert result.returncode == 0, f"{shell} -n: {result.stderr}"


@pytest.mark.parametrize("env, message", [
    ({"EDGESTACK_SERVER": "docker"}, "EDGESTACK_SERVER must be"),
    ({"HTTP_PORT": "80a"}, "HTTP_PORT must be a port number"),
    ({"METRICS_PORT": "-1"}, "METRICS_PORT must be a port number"),
    ({"MODEL_REPOSITORY": "/nonexistent/models"}, "is not a directory"),
    ({"MODEL_CONTROL_MODE": "poll"}, "MODEL_CONTROL_MODE must be 'none' or 'explicit'"),
])
def test_entrypoint_refuses_bad_settings(tmp_path, env, message):
    result = subprocess.run(["sh", str(ENTRYPOINT)], env={"PATH": os.environ["PATH"], "MODEL_REPOSITORY": str(tmp_path), **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 64
    assert message in result.stderr


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_entrypoint_runs_tritonserver_with_the_flags_of_edgestack_server(tmp_path, mode):
    """The GPU image's mode passes what edgestack.server passes, listening on BIND_ADDRESS; in explicit model
    control it loads every model at start, as `edgestack serve --model-control explicit` does."""
    fake = tmp_path / "tritonserver"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "EDGESTACK_SERVER": "tritonserver", "TRITONSERVER": str(fake),
           "MODEL_REPOSITORY": str(tmp_path), "HTTP_PORT": "18000", "GRPC_PORT": "18001", "METRICS_PORT": "18002",
           "TRITON_BACKEND_DIR": "/backends", "TRITON_LOG": str(tmp_path / "triton.log"), "MODEL_CONTROL_MODE": mode}
    result = subprocess.run(["sh", str(ENTRYPOINT), "--strict-readiness=true"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    flags = result.stdout.split()
    server = TritonServer(tmp_path, http_port=18000, grpc_port=18001, metrics_port=18002,
                          explicit_models=["*"] if mode == "explicit" else None)
    expected = server.command(TritonInstall(Path("tritonserver"), Path("/backends"), Path("/lib")))[1:]
    # A container's /dev/shm goes with it: the per-process shared-memory prefix TritonServer removes after a killed
    # server has no job there.
    expected = [f.replace("=127.0.0.1", "=0.0.0.0") for f in expected if "shm-region-prefix-name" not in f]
    assert sorted(f for f in flags if f not in (f"--log-file={tmp_path / 'triton.log'}", "--strict-readiness=true")) \
        == sorted(expected)
    assert flags[-1] == "--strict-readiness=true", "arguments go on to the server, last"


# --- entrypoint, for real --------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            table[int(entry.name)] = (int(ppid), state)
    return table


def _descendants(pid: int) -> set[int]:
    table = _proc_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    state = _proc_table().get(pid)
    return state is not None and state[1] not in ("Z", "X")


def _tritonservers_on(http_port: int) -> set[int]:
    """Live processes started with --http-port=<http_port> (how both modes start tritonserver)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"--http-port={http_port}".encode() in argv and _alive(int(entry.name)):
                pids.add(int(entry.name))
    return pids


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def rendered_repository(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("entrypoint") / "model_repository"
    result = subprocess.run([str(BIN / "edgestack"), "build", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"edgestack build failed:\n{result.stdout}{result.stderr}"
    return out


@pytest.mark.integration
@pytest.mark.parametrize("server", ["edgestack", "tritonserver"])
def test_entrypoint_serves_until_sigterm_and_leaves_nothing_behind(server, rendered_repository, tmp_path):
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server_log = tmp_path / "triton.log"
    env = dict(os.environ, MODEL_REPOSITORY=str(rendered_repository), HTTP_PORT=str(http_port),
               GRPC_PORT=str(grpc_port), METRICS_PORT=str(metrics_port), TRITON_LOG=str(server_log),
               EDGESTACK_SERVER=server)
    if server == "tritonserver":  # the GPU image's mode, with the wheel's tritonserver as the CPU image has it
        install = find_triton()
        env = install.environment(env)
        env.update(TRITONSERVER=str(install.binary), TRITON_BACKEND_DIR=str(install.backend_dir),
                   BIND_ADDRESS="127.0.0.1", MODEL_CONTROL_MODE="explicit")  # as docker-compose.yml runs it
    else:  # `edgestack` on PATH, as in the image
        env["PATH"] = os.pathsep.join((str(BIN), env.get("PATH", "")))
    output = tmp_path / "entrypoint.out"

    def logs() -> str:
        texts = [f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in (output, server_log) if p.exists()]
        return "\n".join(texts)

    started: set[int] = set()
    with output.open("wb") as out:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _ready(http_port):
            assert proc.poll() is None, f"entrypoint exited with {proc.returncode} before ready\n{logs()}"
            assert time.monotonic() < deadline, f"not ready within 120 s\n{logs()}"
            time.sleep(0.25)
        if server == "edgestack":
            # `edgestack serve` handles SIGTERM from its "ready" line on (it installs the handler
            # after printing it); a SIGTERM before that kills it without stopping tritonserver.
            while b"tritonserver ready" not in output.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, f"no ready line\n{logs()}"
                time.sleep(0.1)
            time.sleep(0.5)
        # every model loaded at start, in either model-control mode
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/detect/ready", timeout=5) as response:
            assert response.status == 200, "the ensemble is not loaded"
        # exec: the entrypoint's PID is the server's now, so the SIGTERM goes to the server itself.
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert comm != "sh", "the entrypoint did not exec the server"
        servers = _tritonservers_on(http_port)
        assert servers, f"no tritonserver with --http-port={http_port} found\n{logs()}"
        started = {proc.pid} | _descendants(proc.pid) | servers

        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the entrypoint ({server}) did not exit within 60 s of SIGTERM\n{logs()}")
        assert returncode == 0, f"exit code {returncode} after SIGTERM\n{logs()}"
        deadline = time.monotonic() + 10  # orphans are reaped by init, not by us
        while (survivors := {p for p in started if _alive(p)} | _tritonservers_on(http_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not survivors, f"still running after the entrypoint exited: {sorted(survivors)}\n{logs()}"
        assert not _ready(http_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in (started | _tritonservers_on(http_port)) - {proc.pid}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
