"""What a device measures for its fleet report: Triton's latency and errors (fleet.triton_metrics), power
(fleet.power), and accuracy: the share of the serving version's signed expected outputs that the served detector
still reproduces, judged by the health gate's own comparison (sidecar.health.detection_problems).

The expected outputs are those of the installed bundle, taken from the agent's verified metadata when an install
commits and kept per version folder in <state_dir>/expected/<folder>.json, so a rollback to an earlier
bundle checks that bundle's set. A version the device shipped with has no signed set: accuracy None.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from fleet.power import PowerMeter
from fleet.protocol import Metrics
from fleet.triton_metrics import IntervalMetrics
from sidecar.bundle_types import parse_expected_output
from sidecar.durable import atomic_write
from sidecar.state import State

log = logging.getLogger("fleet.device")


class AccuracyCheck:
    """check() -> accuracy 0..1 of the serving version, None without a signed set or while the agent is busy."""

    def __init__(self, agent, cache_dir: Path):
        from sidecar.triton_control import TritonControl

        self.agent = agent
        self.cache_dir = Path(cache_dir)
        # Its own connection: the agent's control belongs to the agent's thread
        self.control = TritonControl(agent.control.url, agent.repository, agent.detector_model,
                                     agent.control.ensemble_model)

    def _remember_installed(self) -> None:
        st = self.agent.store.load()
        if st is None or st.state != State.DONE or st.candidate != st.current or not st.signed:
            return
        # Always rewritten: a folder number freed by a rollback is used again by the next install
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.cache_dir / f"{st.current}.json", json.dumps(st.signed.get("expected_outputs", [])).encode())

    def expected(self, folder: int) -> list[Any]:
        path = self.cache_dir / f"{folder}.json"
        if not path.is_file():
            return []
        return [parse_expected_output(item) for item in json.loads(path.read_text(encoding="utf-8"))]

    def check(self) -> float | None:
        from sidecar.health import PipelineSteps, detection_problems

        if self.agent.status()["busy"]:
            return None
        self._remember_installed()
        current = self.agent.versions()["current"]
        expected = self.expected(current) if current is not None else []
        if not expected:
            return None
        thresholds = self.agent.thresholds
        try:
            steps = PipelineSteps(self.control)
            reproduced = 0
            for item in expected:
                tensor, transform = steps.preprocess(base64.b64decode(item.image_b64))
                got = steps.postprocess(self.control.infer_detector(current, tensor), transform)
                reproduced += not detection_problems(item, *got, iou_min=thresholds.iou_min,
                                                     score_tolerance=thresholds.score_tolerance,
                                                     score_threshold=steps.score_threshold)
            return reproduced / len(expected)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is no measurement, not a device failure
            log.warning("accuracy check of v%s not done: %s: %s", current, type(exc).__name__, exc)
            return None
        finally:
            self.control.close()


class DeviceMetrics:
    """Metrics of one reporting interval. Accuracy is checked every accuracy_s (it runs the golden images);
    between checks the last result is reported."""

    def __init__(self, agent, triton_metrics_url: str | None, ensemble_model: str, state_dir: Path, *,
                 accuracy_s: float = 60.0, clock=None):
        import time

        self.triton = IntervalMetrics(triton_metrics_url, ensemble_model) if triton_metrics_url else None
        self.power = PowerMeter()
        self.accuracy = AccuracyCheck(agent, Path(state_dir) / "expected")
        self.accuracy_s = accuracy_s
        self.clock = clock or time.monotonic
        self._accuracy: float | None = None
        self._checked_at: float | None = None

    def recheck_accuracy(self) -> None:
        """Check at the next collect (after an install or a rollback: another version serves)."""
        self._checked_at = None

    def collect(self) -> Metrics:
        interval = self.triton.sample() if self.triton else None
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.accuracy_s:
            self._accuracy, self._checked_at = self.accuracy.check(), now
        if interval is None:
            return Metrics(requests=0, accuracy=self._accuracy, power_w=self.power.sample())
        return Metrics(requests=interval.requests, p50_ms=interval.p50_ms, p99_ms=interval.p99_ms,
                       error_rate=interval.error_rate, accuracy=self._accuracy, power_w=self.power.sample())
