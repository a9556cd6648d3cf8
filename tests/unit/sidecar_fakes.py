"""Test doubles for the sidecar's unit tests: an in-memory Triton behind the TritonControl methods the agent and
sidecar.health use, a scripted health gate, and a Device (repository, trust store, signed bundles) to run an
Agent on without a tritonserver."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from sidecar.agent import Agent
from sidecar.bundle import create_bundle
from sidecar.bundle_types import ExpectedOutput
from sidecar.errors import HealthGateError, TritonControlError, TritonUnavailableError
from sidecar.keys import generate_key
from sidecar.state import State, StateStore
from sidecar.triton_control import VersionStats
from sidecar.trust import TrustStore, format_time, make_root, sign

DETECTOR, ENSEMBLE = "detect_detector", "detect"
EXPIRES = format_time(datetime.now(timezone.utc) + timedelta(days=30))
DETECTOR_CONFIG = {"name": DETECTOR, "backend": "python", "max_batch_size": 8,
                   "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": ["3", "8", "8"]}],
                   "output": [{"name": "output0", "data_type": "TYPE_FP32", "dims": ["-1", "6"]}],
                   "parameters": {"config": {"string_value": json.dumps(
                       {"model_file": "model.onnx", "input_name": "images", "output_names": ["output0"],
                        "intra_op_threads": 1, "runtime": "onnxruntime"})}}}


class FakeTriton:
    """Triton in explicit model-control mode, in memory: the detector versions loaded, the version the ensemble
    is pinned to, cumulative statistics per loaded version. A version loads only if its folder is in the
    repository; a call fails with the errors queued by fail_next; a killed Triton answers nothing
    (TritonUnavailableError) and a restarted one serves nothing until the agent restores."""

    def __init__(self, repository: Path, detector_model: str = DETECTOR, ensemble_model: str = ENSEMBLE):
        self.url = "fake-triton:8000"
        self.repository = Path(repository)
        self.detector_model, self.ensemble_model = detector_model, ensemble_model
        self.loaded: list[int] = []
        self.pinned: int | None = None
        self.live = True
        self.counters: dict[int, list[int]] = {}  # version -> [success, fail, compute_ns]
        self.traffic: dict[int, tuple[int, int, int]] = {}  # version -> (success, fail, compute_ns) per poll
        self.outputs: dict[int, np.ndarray] = {}  # version -> what infer_detector returns
        self.infer_s: dict[int, float] = {}  # version -> how long an inference takes
        self.queued: dict[str, list[Exception]] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.closed = 0

    # --- test controls ----------------------------------------------------------------------------------

    def fail_next(self, method: str, error: Exception, times: int = 1) -> None:
        self.queued.setdefault(method, []).extend([error] * times)

    def kill(self) -> None:
        self.live = False

    def restart(self) -> None:
        self.live, self.loaded, self.pinned, self.counters = True, [], None, {}

    def serve(self, version: int, success: int = 0, fail: int = 0, compute_ns: int = 0) -> None:
        counters = self.counters[version]
        counters[0], counters[1], counters[2] = counters[0] + success, counters[1] + fail, counters[2] + compute_ns

    def calls_of(self, method: str) -> list[tuple]:
        return [args for name, args in self.calls if name == method]

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        if not self.live:
            raise TritonUnavailableError(f"{method}: Triton at {self.url} unreachable (connection refused)")
        if self.queued.get(method):
            raise self.queued[method].pop(0)

    # --- TritonControl ----------------------------------------------------------------------------------

    def disk_config(self, model: str) -> dict[str, Any]:
        if model != self.detector_model:
            raise TritonControlError(f"the fake has no configuration of {model}")
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in DETECTOR_CONFIG.items()}

    def load_detector(self, versions: list[int]) -> None:
        if not versions:
            raise ValueError("load_detector needs at least one version")
        self._enter("load_detector", sorted(versions))
        missing = [v for v in versions if not (self.repository / self.detector_model / str(v)).is_dir()]
        if missing:
            raise TritonControlError(f"load {self.detector_model}: failed to load version(s) {missing}: no folder")
        self.loaded = sorted(set(versions))
        self.counters = {v: self.counters.get(v, [0, 0, 0]) for v in self.loaded}

    def pin_ensemble(self, version: int) -> None:
        self._enter("pin_ensemble", version)
        if version not in self.loaded:
            raise TritonControlError(f"pin {self.ensemble_model}: {self.detector_model} v{version} is not loaded")
        self.pinned = version

    def restore(self, committed: int) -> None:
        pinned = self.pinned_version()
        if pinned is not None and pinned != committed and pinned in self.ready_versions():
            self.load_detector([committed, pinned])
            self.pin_ensemble(committed)
        self.load_detector([committed])
        self.pin_ensemble(committed)

    def is_live(self) -> bool:
        return self.live

    def is_ready(self, model: str, version: int | None = None) -> bool:
        if not self.live:
            return False
        if model == self.ensemble_model:
            return self.pinned is not None
        return bool(self.loaded) if version is None else version in self.loaded

    def ready_versions(self, model: str | None = None) -> list[int]:
        self._enter("ready_versions")
        return list(self.loaded)

    def pinned_version(self) -> int | None:
        if not self.is_ready(self.ensemble_model):
            return None
        self._enter("pinned_version")
        return self.pinned

    def statistics(self, version: int, model: str | None = None) -> VersionStats:
        self._enter("statistics", version)
        if version not in self.loaded:
            raise TritonControlError(f"no statistics for {self.detector_model} v{version}")
        if version in self.traffic:
            self.serve(version, *self.traffic[version])
        success, fail, compute_ns = self.counters[version]
        return VersionStats(version, success + fail, success, fail, compute_ns, success)

    def infer_detector(self, version: int, tensor: np.ndarray) -> np.ndarray:
        self._enter("infer_detector", version)
        if version not in self.loaded:
            raise TritonControlError(f"infer {self.detector_model} v{version}: not loaded")
        if version in self.infer_s:
            time.sleep(self.infer_s[version])
        self.serve(version, success=1, compute_ns=1_000_000)
        return self.outputs.get(version, np.zeros((1, 0, 6), np.float32))

    def close(self) -> None:
        self.closed += 1


class ScriptedGate:
    """Stands in for sidecar.health.health_gate (monkeypatched into sidecar.agent): warms the candidate up as
    the real gate does (a Triton error becomes HealthGateError from it), then raises `error` if set, else
    passes with the previous version's statistics as the baseline. `during(candidate)` runs first, if set."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.during: Callable[[int], None] | None = None
        self.calls: list[dict[str, Any]] = []

    def __call__(self, control, candidate, previous, expected, thresholds, steps=None, previous_since=None):
        self.calls.append({"candidate": candidate, "previous": previous, "expected": len(expected),
                           "require_expected_outputs": thresholds.require_expected_outputs})
        if self.during is not None:
            self.during(candidate)
        try:
            control.infer_detector(candidate, np.zeros((1, 3, 8, 8), np.float32))
        except TritonControlError as exc:
            raise HealthGateError(f"warm-up request 1 on v{candidate} failed: {exc}") from exc
        if self.error is not None:
            raise self.error
        return {"stage": thresholds.name, "candidate": candidate, "previous": previous,
                "baseline": {**control.statistics(previous).to_dict(), "window": "since load"}}


class Crash(BaseException):
    """The agent's process dies here: no `except Exception` of the agent runs (a kill, in one process)."""


def crash_in(state: State) -> Callable[[State], None]:
    def on_transition(new: State) -> None:
        if new == state:
            raise Crash(state.value)

    return on_transition


@dataclass
class Device:
    """A repository serving v1 from a FakeTriton, a trust store and signed bundles of new detector versions."""

    root: Path
    triton: FakeTriton = field(init=False)
    gate: ScriptedGate = field(default_factory=ScriptedGate)
    root_keys: list = field(default_factory=lambda: [generate_key()])
    bundle_keys: list = field(default_factory=lambda: [generate_key()])

    def __post_init__(self) -> None:
        self.repository = self.root / "model_repository"
        self.model_dir = self.repository / DETECTOR
        self.write_version(self.model_dir / "1", b"v1 weights")
        (self.model_dir / "config.pbtxt").write_text(f'name: "{DETECTOR}"\nbackend: "python"\n')
        self.triton = FakeTriton(self.repository)
        self.triton.restore(1)
        self.triton.calls.clear()
        self.trust = TrustStore(self.root / "trust")
        self.trust.initialize(sign(make_root(version=1, expires=EXPIRES, root_keys=self.root_keys, root_threshold=1,
                                             bundle_keys=self.bundle_keys, bundle_threshold=1), self.root_keys))
        self.state_dir = self.root / "state"
        (self.root / "bundles").mkdir()

    @staticmethod
    def write_version(folder: Path, weights: bytes) -> Path:
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(weights + os.urandom(64))
        (folder / "model.py").write_text("class TritonPythonModel:\n    pass\n")
        return folder

    def bundle(self, metadata_version: int = 2, *, keys: list | None = None, expected: bool = True) -> Path:
        """A signed full bundle of a new detector version (new weights, the same model.py)."""
        out = self.root / "bundles" / f"v{metadata_version}.bundle"
        if out.exists():
            return out
        source = self.write_version(self.root / "sources" / str(metadata_version), f"v{metadata_version}".encode())
        outputs = [ExpectedOutput("aW1hZ2U=", [[1.0, 2.0, 30.0, 40.0]], [0.9], [0])] if expected else []
        return create_bundle(source, out, model_name=DETECTOR, model_version=f"1.{metadata_version}.0", target="cpu",
                             metadata_version=metadata_version, keys=keys or self.bundle_keys, expires=EXPIRES,
                             expected_outputs=outputs)

    def agent(self, **options: Any) -> Agent:
        options = {"probation_s": 0.0, "probation_poll_s": 0.0, "target": "cpu", "device_classes": ("x86-avx2",),
                   **options}
        trust = TrustStore(self.root / "trust")  # read again, as a restarted agent does
        return Agent(self.repository, self.triton.url, self.state_dir, trust, control=self.triton, **options)

    def trusted_version(self) -> int | None:
        return TrustStore(self.root / "trust").trusted_version(DETECTOR)

    def state(self):
        return StateStore(self.state_dir / "state.json").load()

    def disk_versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.model_dir.iterdir() if p.name.isdigit())

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.model_dir.iterdir() if p.name.startswith("."))

    def serves(self) -> tuple[int | None, list[int]]:
        """(the version the ensemble is pinned to, the detector versions loaded)."""
        return self.triton.pinned, list(self.triton.loaded)

    def moves(self) -> list[tuple[State, State]]:
        """Every (from, to) transition in the persisted history."""
        return [(State(e["previous_state"]), State(e["state"])) for e in self.state().history
                if e["event"] == "transition"]


@pytest.fixture
def device(tmp_path, monkeypatch) -> Iterator[Device]:
    """A Device whose agents run the ScriptedGate in place of sidecar.health.health_gate."""
    dev = Device(tmp_path)
    monkeypatch.setattr("sidecar.agent.health_gate", dev.gate)
    yield dev


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class FileServer:
    """The files under `folder` over HTTP on 127.0.0.1 (a real server: the agent downloads with urllib)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(self.folder)))

    def __enter__(self) -> "FileServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url_of(self, path: Path) -> tuple[str, str, int]:
        """(URL, sha256, size) of a file under the folder: what an install from a URL needs."""
        relative = Path(path).relative_to(self.folder).as_posix()
        return (f"http://127.0.0.1:{self.server.server_address[1]}/{relative}",
                hashlib.sha256(Path(path).read_bytes()).hexdigest(), Path(path).stat().st_size)


@pytest.fixture
def bundle_url(device) -> Iterator[Callable[[Path], tuple[str, str, int]]]:
    """url_of(bundle) -> (URL, sha256, size) of a bundle of the device served over HTTP."""
    with FileServer(device.root) as files:
        yield files.url_of
