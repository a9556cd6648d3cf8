"""Explicit model control of the serving Triton (tritonclient.http), as the update agent needs it.

Triton runs with --model-control-mode=explicit. Every load sends a config override built from the
model's config.pbtxt on disk (parsed with builder.triton_config_parse), so what is served never depends on
which version folders happen to exist:

  load_detector([1, 2])  the detector with version_policy {specific: [1, 2]} (both versions loaded)
  pin_ensemble(2)        the ensemble with its detector step at model_version 2: traffic moves at once
  restore(2)             both of the above for one version: after a Triton restart (explicit mode starts
                         empty) the agent restores exactly the committed version

Each override is ALSO written to the model's config.pbtxt (only when it changes): loading an ensemble
makes Triton re-read every step whose folder changed since it was loaded (a new version folder, even the
__pycache__ a Python model writes) FROM DISK, and the rendered detector config (latest version) would then
load the newest folder, whether it passed the gate or not, and drop the version the ensemble is pinned to.
With disk == override, such reloads change nothing, and a restarted Triton in any mode serves what the
agent last loaded. Load the detector BEFORE the ensemble. tritonclient's HTTP client is not thread-safe,
so each thread gets its own. Every tritonclient error is raised as TritonControlError, connection errors
and timeouts as its subclass TritonUnavailableError.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from builder import triton_config, triton_config_render
from builder.errors import BuilderError
from sidecar.errors import TritonControlError, TritonUnavailableError

T = TypeVar("T")
CONTROL_TIMEOUT_S = 300.0  # a load of Python-backend models can take a while on a small device


@dataclass(frozen=True)
class VersionStats:
    """Cumulative statistics of one model version (since it was loaded)."""

    version: int
    inference_count: int
    success_count: int
    fail_count: int
    compute_infer_ns: int
    compute_infer_count: int

    @property
    def compute_ns_per_inference(self) -> float | None:
        return self.compute_infer_ns / self.compute_infer_count if self.compute_infer_count else None

    def minus(self, earlier: "VersionStats") -> "VersionStats":
        return VersionStats(self.version, *(getattr(self, f) - getattr(earlier, f) for f in (
            "inference_count", "success_count", "fail_count", "compute_infer_ns", "compute_infer_count")))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "inference_count": self.inference_count, "success": self.success_count,
                "fail": self.fail_count, "compute_infer_ns_per_inference": self.compute_ns_per_inference}


class TritonControl:
    def __init__(self, url: str, repository: Path, detector_model: str = "detect_detector",
                 ensemble_model: str = "detect", timeout_s: float = CONTROL_TIMEOUT_S):
        self.url = url.removeprefix("http://")
        self.repository = Path(repository)
        self.detector_model = detector_model
        self.ensemble_model = ensemble_model
        self.timeout_s = timeout_s
        self._local = threading.local()

    # --- plumbing ---------------------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as http

            client = http.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s)
            self._local.client = client
        return client

    def _call(self, what: str, func: Callable[[Any], T]) -> T:
        from tritonclient.utils import InferenceServerException

        try:
            return func(self._client())
        except InferenceServerException as exc:
            raise TritonControlError(f"{what}: {exc.message() or exc}") from exc
        except (OSError, TimeoutError) as exc:  # connection refused/reset, timeouts (gevent's are OSErrors)
            self._local.client = None
            raise TritonUnavailableError(f"{what}: Triton at {self.url} unreachable ({type(exc).__name__}: {exc})") from exc

    def disk_config(self, model: str) -> dict[str, Any]:
        """The model's config.pbtxt from the repository as protobuf-JSON (proto field names), without a
        `specific` version policy (the agent's own, which builder.triton_config does not model)."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        from builder.triton_config_parse import from_proto

        path = self.repository / model / triton_config.CONFIG_FILENAME
        try:
            message = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
            if message.version_policy.WhichOneof("policy_choice") == "specific":
                message.ClearField("version_policy")
            return triton_config_render.to_dict(from_proto(message))
        except (OSError, BuilderError, text_format.ParseError) as exc:
            raise TritonControlError(f"cannot read the configuration of {model} ({path}): {exc}") from exc

    def _write_config(self, model: str, config: dict[str, Any]) -> None:
        """config.pbtxt := config, atomically, and only when the text changes."""
        from google.protobuf import text_format

        from sidecar.durable import atomic_write

        path = self.repository / model / triton_config.CONFIG_FILENAME
        text = text_format.MessageToString(triton_config_render.dict_to_proto(config), as_utf8=True)
        try:
            if path.read_text(encoding="utf-8") == text:
                return
            atomic_write(path, text.encode("utf-8"))
        except OSError as exc:
            raise TritonControlError(f"cannot write {path}: {exc}") from exc

    # --- control ----------------------------------------------------------------------------------------

    def detector_config(self, versions: list[int]) -> dict[str, Any]:
        config = self.disk_config(self.detector_model)
        config["version_policy"] = {"specific": {"versions": sorted({int(v) for v in versions})}}
        return config

    def ensemble_config(self, version: int) -> dict[str, Any]:
        config = self.disk_config(self.ensemble_model)
        steps = [s for s in config.get("ensemble_scheduling", {}).get("step", [])
                 if s["model_name"] == self.detector_model]
        if not steps:
            raise TritonControlError(f"ensemble {self.ensemble_model} has no step running {self.detector_model}")
        for step in steps:
            step["model_version"] = int(version)
        return config

    def load_detector(self, versions: list[int]) -> None:
        """(Re)load the detector with exactly `versions`; other loaded versions are unloaded."""
        if not versions:
            raise ValueError("load_detector needs at least one version")
        config = self.detector_config(versions)
        self._write_config(self.detector_model, config)
        body = json.dumps(config)
        self._call(f"load {self.detector_model} versions {sorted(versions)}",
                   lambda c: c.load_model(self.detector_model, config=body))

    def pin_ensemble(self, version: int) -> None:
        """(Re)load the ensemble with its detector step pinned to `version` (which must be loaded)."""
        config = self.ensemble_config(version)
        self._write_config(self.ensemble_model, config)
        body = json.dumps(config)
        self._call(f"pin {self.ensemble_model} to {self.detector_model} v{version}",
                   lambda c: c.load_model(self.ensemble_model, config=body))

    def restore(self, committed: int) -> None:
        """Serve exactly `committed`: load that detector version, then the ensemble pinned to it. If the
        ensemble runs another loaded version, that one keeps serving until the ensemble has moved."""
        pinned = self.pinned_version()
        if pinned is not None and pinned > 0 and pinned != committed and pinned in self.ready_versions():
            self.load_detector([committed, pinned])
            self.pin_ensemble(committed)
        self.load_detector([committed])
        self.pin_ensemble(committed)

    # --- state ------------------------------------------------------------------------------------------

    def is_live(self) -> bool:
        try:
            return bool(self._call("live", lambda c: c.is_server_live()))
        except TritonControlError:
            return False

    def is_ready(self, model: str, version: int | None = None) -> bool:
        try:
            return bool(self._call(f"ready {model}", lambda c: c.is_model_ready(
                model, "" if version is None else str(version))))
        except TritonControlError:
            return False

    def ready_versions(self, model: str | None = None) -> list[int]:
        model = model or self.detector_model
        index = self._call("repository index", lambda c: c.get_model_repository_index())
        return sorted(int(m["version"]) for m in index
                      if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit())

    def pinned_version(self) -> int | None:
        """The detector version the loaded ensemble runs (-1 means latest); None if the ensemble is not loaded."""
        if not self.is_ready(self.ensemble_model):
            return None
        config = self._call(f"config of {self.ensemble_model}", lambda c: c.get_model_config(self.ensemble_model))
        for step in config.get("ensemble_scheduling", {}).get("step", []):
            if step.get("model_name") == self.detector_model:
                return int(step.get("model_version", -1))
        return None

    def statistics(self, version: int, model: str | None = None) -> VersionStats:
        model = model or self.detector_model
        data = self._call(f"statistics of {model} v{version}",
                          lambda c: c.get_inference_statistics(model, str(version)))
        entry = next((s for s in data.get("model_stats", []) if str(s.get("version")) == str(version)), None)
        if entry is None:
            raise TritonControlError(f"no statistics for {model} v{version}")
        stats = entry.get("inference_stats", {})

        def pick(key: str, field: str) -> int:
            return int(stats.get(key, {}).get(field, 0))

        return VersionStats(version, int(entry.get("inference_count", 0)), pick("success", "count"),
                            pick("fail", "count"), pick("compute_infer", "ns"), pick("compute_infer", "count"))

    # --- inference --------------------------------------------------------------------------------------

    def detector_io(self) -> tuple[str, str, list[str]]:
        """(input name, input Triton dtype without TYPE_, output names in config order) of the detector."""
        config = self.disk_config(self.detector_model)
        if len(config.get("input", [])) != 1 or not config.get("output"):
            raise TritonControlError(f"{self.detector_model} must have one input and an output for the health gate")
        tensor = config["input"][0]
        return tensor["name"], tensor["data_type"].removeprefix("TYPE_"), [o["name"] for o in config["output"]]

    def infer_detector(self, version: int, tensor: np.ndarray) -> list[np.ndarray]:
        """Run one batch (leading batch dimension) on one detector version; every output, in config order."""
        import tritonclient.http as http

        input_name, dtype, output_names = self.detector_io()
        request = http.InferInput(input_name, list(tensor.shape), dtype)
        request.set_data_from_numpy(np.ascontiguousarray(tensor), binary_data=True)
        outputs = [http.InferRequestedOutput(name, binary_data=True) for name in output_names]
        result = self._call(f"infer {self.detector_model} v{version}", lambda c: c.infer(
            self.detector_model, [request], model_version=str(version), outputs=outputs))
        arrays = [result.as_numpy(name) for name in output_names]
        missing = [name for name, array in zip(output_names, arrays) if array is None]
        if missing:
            raise TritonControlError(f"{self.detector_model} v{version} returned no {', '.join(missing)}")
        return arrays

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None
