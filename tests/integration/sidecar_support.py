"""Two tritonservers (explicit model control) per test session for the sidecar's integration tests, each one
pytest-xdist group (tests/conftest.py): test_sidecar_swap and test_sidecar_crash run on one serving a synthetic
detector (sidecar_env; mechanics do not depend on what the detector computes), test_sidecar_gate and
test_sidecar_golden on one serving the fixture detector (fixture_sidecar_env). Each test starts from v1 only
(SidecarEnv.reset_to_v1 puts v1's folder back when a test garbage-collected it), with a fresh trust store and
agent state. Bundles are signed with fresh keys (sidecar.keys) from copies of v1's detector folder: the same model
(a good v2), an ONNX graph with its boxes shifted (wrong outputs), a model.py that sleeps (too slow) and one that
raises in initialize (crashes on load).
"""
from __future__ import annotations

import base64
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from sidecar.agent import Agent
from sidecar.bundle import create_bundle
from sidecar.bundle_types import ExpectedOutput
from sidecar.keys import generate_key
from sidecar.triton_control import TritonControl
from sidecar.trust import TrustStore, format_time, make_root, sign
from tests.conftest import IMAGES
from builder.repository import render_repository, target_for
from tests import synthetic_detector
from tests.integration.conftest import QUEUE_DELAY_US, assert_stopped, render

DETECTOR = "detect_detector"
DOG = IMAGES / "dog.jpg"
EXPIRES = format_time(datetime.now(timezone.utc) + timedelta(days=30))
VARIANTS = ("same", "wrong", "slow", "crash")


# --- helpers ----------------------------------------------------------------------------------------------

@dataclass
class Keys:
    root: list = field(default_factory=lambda: [generate_key()])
    bundle: list = field(default_factory=lambda: [generate_key()])

    def trust_store(self, folder: Path) -> TrustStore:
        store = TrustStore(folder)
        store.initialize(sign(make_root(version=1, expires=EXPIRES, root_keys=self.root, root_threshold=1,
                                        bundle_keys=self.bundle, bundle_threshold=1), self.root))
        return store


def expected_outputs(server: TritonServer, images: list[Path]) -> list[ExpectedOutput]:
    """What the serving pipeline (v1) detects on each image: the outputs a good new version must reproduce."""
    out = []
    with DetectionClient(server.grpc_url, "grpc") as client:
        for path in images:
            data = path.read_bytes()
            result = client.detect(data)
            assert result.detections, f"v1 detects nothing on {path.name}"
            out.append(ExpectedOutput(base64.b64encode(data).decode(), [list(d.box) for d in result.detections],
                                      [d.score for d in result.detections], [d.class_id for d in result.detections]))
    return out


def make_variant(source: Path, dest: Path, kind: str) -> Path:
    """A copy of a detector version folder: same, wrong (boxes + 40 px), slow (execute sleeps 0.3 s, several times the
    canary gate's bound of 1.5 x v1 + 30 ms over the synthetic detector), crash,
    retrained (the last four weight tensors scaled by 1.0005: new bytes, the same detections)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    model_py = dest / "model.py"
    if kind == "retrained":
        import numpy as np
        import onnx

        model = onnx.load(dest / "model.onnx")
        weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) >= 256]
        for tensor in weights[-4:]:
            tensor.raw_data = (np.frombuffer(tensor.raw_data, np.float32) * np.float32(1.0005)).tobytes()
        onnx.save(model, dest / "model.onnx")
    elif kind == "wrong":
        import onnx
        from onnx import helper, numpy_helper
        import numpy as np

        model = onnx.load(dest / "model.onnx")
        out = "tower_0/detections"
        producer = next(n for n in model.graph.node if out in n.output)
        producer.output[list(producer.output).index(out)] = "unshifted_detections"
        shift = numpy_helper.from_array(np.array([40, 40, 40, 40, 0, 0], np.float32), "box_shift")
        model.graph.initializer.append(shift)
        model.graph.node.append(helper.make_node("Add", ["unshifted_detections", "box_shift"], [out], "shift_boxes"))
        onnx.checker.check_model(model)
        onnx.save(model, dest / "model.onnx")
    elif kind == "slow":
        text = model_py.read_text().replace("    def execute(self, requests):\n",
                                            "    def execute(self, requests):\n        __import__('time').sleep(0.3)\n")
        assert "sleep(0.3)" in text
        model_py.write_text(text)
    elif kind == "crash":
        text = model_py.read_text().replace("    def initialize(self, args):\n",
                                            "    def initialize(self, args):\n        raise RuntimeError('crashes on load')\n")
        assert "crashes on load" in text
        model_py.write_text(text)
    return dest


def make_bundle(folder: Path, out: Path, keys: Keys, expected: list[ExpectedOutput], metadata_version: int = 2) -> Path:
    return create_bundle(folder, out, model_name=DETECTOR, model_version=f"1.{metadata_version}.0", target="cpu",
                         metadata_version=metadata_version, keys=keys.bundle, expires=EXPIRES,
                         expected_outputs=expected)


def reset_to_v1(repository: Path, control: TritonControl) -> None:
    """Serve v1 only, and only v1's folder on disk."""
    control.restore(1)
    for path in (repository / DETECTOR).iterdir():
        if path.is_dir() and path.name != "1":
            shutil.rmtree(path)


def leftovers(repository: Path) -> list[str]:
    return sorted(p.name for p in (repository / DETECTOR).iterdir() if p.name.startswith("."))


def detect_dog(url: str, protocol: str = "grpc") -> list[str]:
    with DetectionClient(url, protocol) as client:
        return client.detect(DOG.read_bytes()).class_names


# --- the shared server --------------------------------------------------------------------------------------

@dataclass
class SidecarEnv:
    tmp: Path
    repository: Path
    server: TritonServer
    control: TritonControl
    keys: Keys
    bundles: dict[str, Path]  # signed v2 bundles by variant kind (VARIANTS); "same" is metadata version 2
    variants: Path  # the variant folders the bundles were made from, by kind
    pristine_v1: Path  # v1's detector folder as rendered

    def reset_to_v1(self) -> None:
        """Serve v1 only, and only v1's folder on disk (put back if a test garbage-collected it)."""
        if not (self.repository / DETECTOR / "1").is_dir():
            shutil.copytree(self.pristine_v1, self.repository / DETECTOR / "1")
        reset_to_v1(self.repository, self.control)


@contextmanager
def running_sidecar_env(tmp: Path, repository: Path, kinds: tuple[str, ...] = VARIANTS) -> Iterator[SidecarEnv]:
    """An explicit-mode tritonserver on the rendered repository, serving v1, with keys and v2 bundles of these
    kinds."""
    pristine = shutil.copytree(repository / DETECTOR / "1", tmp / "pristine-v1", ignore=shutil.ignore_patterns("__pycache__"))
    server = TritonServer(repository, explicit_models=[], log_path=tmp / "tritonserver.log")
    with server:
        control = TritonControl(server.http_url, repository)
        control.restore(1)
        expected = expected_outputs(server, [DOG])
        keys = Keys()
        bundles = {kind: make_bundle(make_variant(pristine, tmp / "variants" / kind, kind),
                                     tmp / f"{kind}.bundle", keys, expected, n + 2)
                   for n, kind in enumerate(kinds)}
        yield SidecarEnv(tmp, repository, server, control, keys, bundles, tmp / "variants", pristine)
        control.close()  # an open HTTP connection holds tritonserver's exit for its whole exit timeout
        pid = server.pid
    assert_stopped(pid)


@pytest.fixture(scope="session")
def sidecar_env(tmp_path_factory) -> Iterator[SidecarEnv]:
    """The mechanics tests' server (swap, rollback, crash recovery, deltas, restarts): the fixture pipeline with
    the synthetic detector (tests/synthetic_detector.py)."""
    tmp = tmp_path_factory.mktemp("sidecar")
    spec = synthetic_detector.spec(tmp)
    repository = render_repository(spec, tmp / "model_repository", target_for(spec, max_queue_delay_us=QUEUE_DELAY_US))
    with running_sidecar_env(tmp, repository) as env:
        yield env


@pytest.fixture(scope="session")
def fixture_sidecar_env(tmp_path_factory) -> Iterator[SidecarEnv]:
    """The server with the real fixture detector, for the tests whose outcome depends on what it computes (golden
    sets, the latency gate under load): a module selects it by overriding swap_env."""
    tmp = tmp_path_factory.mktemp("sidecar-fixture")
    with running_sidecar_env(tmp, render(tmp), ("same",)) as env:
        yield env


@pytest.fixture(scope="module")
def swap_env(sidecar_env) -> SidecarEnv:
    """The shared server, serving v1 only when the module starts."""
    sidecar_env.reset_to_v1()
    return sidecar_env


@pytest.fixture
def make_agent(swap_env, tmp_path):
    """Agents on the shared server with a fresh trust store and state under the test's tmp_path."""
    swap_env.reset_to_v1()
    agents: list[Agent] = []

    def factory(**options) -> Agent:
        trust = swap_env.keys.trust_store(tmp_path / "trust")
        options = {"probation_s": 1.0, "probation_poll_s": 0.25, **options}
        agents.append(Agent(swap_env.repository, swap_env.server.http_url, tmp_path / "state", trust, **options))
        return agents[-1]

    yield factory
    for agent in agents:
        agent.control.close()


# --- load -----------------------------------------------------------------------------------------------------

class Load:
    """Client threads (gRPC and HTTP) sending dog.jpg through `detect` until stopped."""

    def __init__(self, server: TritonServer, protocols=("grpc", "http", "grpc", "http")):
        self.server, self.stop, self.lock = server, threading.Event(), threading.Lock()
        self.ok, self.failures, self.latencies = 0, [], []
        self.threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in protocols]

    def _run(self, protocol: str) -> None:
        url = self.server.grpc_url if protocol == "grpc" else self.server.http_url
        image = DOG.read_bytes()
        with DetectionClient(url, protocol, timeout_s=120) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    names = client.detect(image).class_names
                    assert "dog" in names, names
                    with self.lock:
                        self.ok += 1
                        self.latencies.append(time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with self.lock:
                        self.failures.append(f"{protocol}: {type(exc).__name__}: {exc}")

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)
