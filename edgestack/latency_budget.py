"""Latency budget: where one image's end-to-end time goes, from the client's clock and Triton's statistics.

`measure_budget` sends sequential requests over gRPC and splits the mean client-side latency into

    client serialization      building the InferInput (numpy array + set_data_from_numpy + requested outputs)
    network/gRPC + frontend   client total - serialization - deserialization - the ensemble's server-side time
                              (includes tritonclient's protobuf encoding/decoding and Triton's gRPC frontend)
    ensemble (server side)    the ensemble's request time (Triton statistics: success ns / success count)
      ensemble queue          the ensemble's own queue time
      <step>                  queue + compute_input + compute_infer + compute_output, for each composing model
      between steps           ensemble time - ensemble queue - sum of the steps' times
                              (ensemble scheduling, tensor hand-over, Python-backend calls outside compute;
                              slightly negative when a step's compute_output overlaps the next step)
    client deserialization    InferResult.as_numpy for every output

Server-side numbers are deltas of `get_inference_statistics` taken before and after the run, divided by each
model's success count over the window, so they are means; the client total is reported as median and mean.
The numbers are only clean when nothing else sends requests to the server during the run (each model's
request count is recorded so a reader can check).

Energy per inference: with a readable power source (edgestack.energy: NVIDIA board power, Jetson INA3221 rails,
RAPL package counters) the measured window's joules / requests; it covers everything that source powers (client
included on one machine). Where none is readable, the budget says "not readable here" and why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from backends.common import tensors as T
from edgestack.errors import ClientError
from edgestack.inputs import DEFAULT_SPEC, image_folder

PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
OUTPUTS = (*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED)


@dataclass(frozen=True)
class StepTiming:
    """Mean milliseconds per request of one composing model over the measured window."""

    model: str
    requests: int
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    # Triton's request time for the model (success ns / count). It runs until the request is released, which
    # can be after the next step has started, so the steps' request times may overlap; total_ms does not.
    request_ms: float

    @property
    def total_ms(self) -> float:
        """The step's time: queue + compute_input + compute_infer + compute_output."""
        return self.queue_ms + self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


@dataclass(frozen=True)
class Budget:
    """One image's end-to-end latency, broken down (mean ms per request unless the name says otherwise)."""

    url: str
    model: str
    requests: int
    images: int
    client_total_median_ms: float
    client_total_mean_ms: float
    client_total_p90_ms: float
    serialization_ms: float
    deserialization_ms: float
    ensemble_ms: float
    ensemble_queue_ms: float
    ensemble_requests: int
    steps: tuple[StepTiming, ...] = field(default_factory=tuple)
    detector: str | None = None  # the composing model whose compute_infer is "the model alone"
    joules_per_inference: float | None = None  # None: no readable power source (energy_note says why)
    energy_note: str = ""

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def network_ms(self) -> float:
        """Network, gRPC and Triton's frontend: what the client waited beyond the ensemble's own time.

        A remainder, and it can be slightly negative: Triton ends the ensemble's time when its last step releases
        the request, which can be just after the response has left (and the client has it). On a loaded machine
        that release lag can outweigh the sub-millisecond network and frontend time.
        """
        return self.client_total_mean_ms - self.serialization_ms - self.deserialization_ms - self.ensemble_ms

    @property
    def between_steps_ms(self) -> float:
        """Ensemble time not spent in its queue or in a step's four parts: scheduling, hand-over, backend calls.

        Can be slightly negative: a step's compute_output ends when its responses have been sent, by which time
        the next step (or the ensemble's response, after the last step) may already be under way.
        """
        return self.ensemble_ms - self.ensemble_queue_ms - sum(s.total_ms for s in self.steps)

    @property
    def components_ms(self) -> dict[str, float]:
        """The top-level split of the client's mean total; the values add up to client_total_mean_ms."""
        return {
            "client_serialization": self.serialization_ms,
            "network_grpc_frontend": self.network_ms,
            "ensemble": self.ensemble_ms,
            "client_deserialization": self.deserialization_ms,
        }

    def step(self, model: str) -> StepTiming:
        for s in self.steps:
            if s.model == model:
                return s
        raise KeyError(model)

    @property
    def model_alone_ms(self) -> float | None:
        """The detector's compute_infer: the model's own run (in the Python backend: ORT plus the stub's call)."""
        return self.step(self.detector).compute_infer_ms if self.detector else None

    @property
    def overhead_ms(self) -> float | None:
        """Everything that is not the model's own run: client, network, ensemble and the other steps."""
        alone = self.model_alone_ms
        return None if alone is None else self.client_total_mean_ms - alone

    @property
    def server_overhead_ms(self) -> float | None:
        """Server-side time that is not the model's own run: the Python-backend steps, queues, hand-overs."""
        alone = self.model_alone_ms
        return None if alone is None else self.ensemble_ms - alone

    @property
    def overhead_ratio(self) -> float | None:
        """Client mean total / model alone (1.0 would be no overhead at all)."""
        alone = self.model_alone_ms
        return None if not alone else self.client_total_mean_ms / alone

    # ---- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["steps"] = [{**dataclasses.asdict(s), "total_ms": s.total_ms} for s in self.steps]
        data["derived"] = {
            "network_grpc_frontend_ms": self.network_ms,
            "between_steps_ms": self.between_steps_ms,
            "components_ms": self.components_ms,
            "model_alone_ms": self.model_alone_ms,
            "overhead_ms": self.overhead_ms,
            "server_overhead_ms": self.server_overhead_ms,
            "overhead_ratio": self.overhead_ratio,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Budget":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        step_names = {f.name for f in dataclasses.fields(StepTiming)}
        values["steps"] = tuple(StepTiming(**{k: v for k, v in s.items() if k in step_names}) for s in data.get("steps", ()))
        return cls(**values)

    def table(self) -> str:
        total = self.client_total_mean_ms

        def row(label: str, ms: float | None, indent: int = 0) -> str:
            if ms is None:
                return f"{' ' * indent}{label:<{48 - indent}}{'-':>10}"
            share = f"{100 * ms / total:6.1f}%" if total > 0 else ""
            return f"{' ' * indent}{label:<{48 - indent}}{ms:10.3f}  {share}"

        lines = [
            f"Latency budget: model {self.model!r} at {self.url}, {self.requests} sequential request(s) over gRPC, "
            f"{self.images} image(s)",
            f"{'component':<48}{'ms/request':>10}  {'share of client mean'}",
            row("client serialization (InferInput)", self.serialization_ms),
            row("network / gRPC + frontend (<0: late release)", self.network_ms),
            row(f"ensemble {self.model} (server side)", self.ensemble_ms),
            row("ensemble queue", self.ensemble_queue_ms, 2),
        ]
        for s in self.steps:
            lines.append(row(s.model, s.total_ms, 2))
            for part in PARTS:
                lines.append(row(part, getattr(s, f"{part}_ms"), 4))
        lines += [
            row("between steps (hand-over; <0: overlap)", self.between_steps_ms, 2),
            row("client deserialization (as_numpy)", self.deserialization_ms),
            row("client total (mean)", self.client_total_mean_ms),
            f"{'client total (median / p90)':<48}{self.client_total_median_ms:10.3f}  / {self.client_total_p90_ms:.3f}",
            "",
        ]
        if self.joules_per_inference is not None:
            lines.append(f"Energy per inference: {self.joules_per_inference:.4f} J ({self.energy_note})")
        elif self.energy_note:
            lines.append(self.energy_note)
        if self.detector:
            lines += [
                f"Model alone ({self.detector} compute_infer): {self.model_alone_ms:.3f} ms; "
                f"everything else: {self.overhead_ms:.3f} ms end to end "
                f"({self.server_overhead_ms:.3f} ms of it server side); "
                f"client mean / model alone = {self.overhead_ratio:.3f}x",
            ]
        counts = {s.model: s.requests for s in self.steps} | {self.model: self.ensemble_requests}
        if any(c != self.requests for c in counts.values()):
            lines.append(f"warning: request counts in the window differ from {self.requests} (other traffic?): {counts}")
        return "\n".join(lines)


# ---- measuring ---------------------------------------------------------------------------------------

def _composing_models(client: Any, model: str) -> list[str]:
    config = client.get_model_config(model, as_json=True)
    config = config.get("config", config)
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    if not steps:
        raise ClientError(f"model {model!r} is not an ensemble (no ensemble_scheduling steps)")
    return [s["model_name"] for s in steps]


def _stats(client: Any, models: Sequence[str]) -> dict[str, dict[str, int]]:
    """Cumulative success count and ns of success/queue/compute_* per model (summed over versions)."""
    out: dict[str, dict[str, int]] = {}
    for name in models:
        totals = {"count": 0, "success": 0, **{p: 0 for p in PARTS}}
        for version in client.get_inference_statistics(name, as_json=True).get("model_stats", []):
            s = version.get("inference_stats", {})
            totals["count"] += int(s.get("success", {}).get("count", 0))
            totals["success"] += int(s.get("success", {}).get("ns", 0))
            for p in PARTS:
                totals[p] += int(s.get(p, {}).get("ns", 0))
        out[name] = totals
    return out


def _settled_stats(client: Any, models: Sequence[str], at_least: Mapping[str, int] | None = None,
                   interval_s: float = 0.05, timeout_s: float = 2.0) -> dict[str, dict[str, int]]:
    """`_stats` once every model has counted at least `at_least[model]` requests and two reads `interval_s` apart
    agree (or after timeout_s, with other traffic on the server).

    Triton adds a request to a model's statistics when the request is released, which for an ensemble can be
    just after the client already has the response: read at once, the last request sent can be missing.
    """
    deadline = time.monotonic() + timeout_s
    wanted = at_least or {}
    last = _stats(client, models)
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        now = _stats(client, models)
        if now == last and all(now[m]["count"] >= n for m, n in wanted.items()):
            break
        last = now
    return last


def _delta_ms(before: dict[str, int], after: dict[str, int]) -> tuple[int, dict[str, float]]:
    count = after["count"] - before["count"]
    if count <= 0:
        return 0, {k: 0.0 for k in ("success", *PARTS)}
    return count, {k: (after[k] - before[k]) / 1e6 / count for k in ("success", *PARTS)}


def measure_budget(grpc_url: str, model: str, images: list[bytes], requests: int, warmup: int = 2,
                   timeout_s: float = 60.0, energy: bool = True) -> Budget:
    """Send `requests` sequential single-image requests (cycling through `images`) and break the latency down.

    `warmup` requests go first and are left out of both the client timings and the statistics window. With
    `energy`, the first readable power source (edgestack.energy.find_meter) measures the same window.
    """
    from edgestack.energy import find_meter, not_readable

    meter, reasons = find_meter() if energy else (None, [])
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if not images:
        raise ValueError("images must not be empty")
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        steps = _composing_models(client, model)
        detector = next((m for m in steps if m.endswith("_detector")), None)

        def one(data: bytes) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            tensor = grpcclient.InferInput(T.IMAGE, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[data]], dtype=object))
            outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
            t1 = time.perf_counter()
            result = client.infer(model, [tensor], outputs=outputs, client_timeout=timeout_s)
            t2 = time.perf_counter()
            for name in OUTPUTS:
                result.as_numpy(name)
            t3 = time.perf_counter()
            return t1 - t0, t2 - t1, t3 - t2

        try:
            models = [model, *steps]
            start = _settled_stats(client, models)
            for i in range(warmup):
                one(images[i % len(images)])
            before = _settled_stats(client, models, {m: start[m]["count"] + warmup for m in models})
            if meter is not None:
                meter.start()
            timings = [one(images[i % len(images)]) for i in range(requests)]
            used = meter.stop() if meter is not None else None
            after = _settled_stats(client, models, {m: before[m]["count"] + requests for m in models})
        except InferenceServerException as exc:
            raise ClientError(exc.message() or str(exc), exc.status()) from exc
    finally:
        client.close()

    totals = [sum(t) * 1000 for t in timings]
    ens_count, ens = _delta_ms(before[model], after[model])
    step_timings = []
    for name in steps:
        count, d = _delta_ms(before[name], after[name])
        step_timings.append(StepTiming(name, count, d["queue"], d["compute_input"], d["compute_infer"],
                                       d["compute_output"], d["success"]))
    return Budget(
        url=grpc_url,
        model=model,
        requests=requests,
        images=len(images),
        client_total_median_ms=statistics.median(totals),
        client_total_mean_ms=statistics.fmean(totals),
        client_total_p90_ms=float(np.percentile(totals, 90)),
        serialization_ms=statistics.fmean(t[0] for t in timings) * 1000,
        deserialization_ms=statistics.fmean(t[2] for t in timings) * 1000,
        ensemble_ms=ens["success"],
        ensemble_queue_ms=ens["queue"],
        ensemble_requests=ens_count,
        steps=tuple(step_timings),
        detector=detector,
        joules_per_inference=used.per(requests) if used else None,
        energy_note=(f"{used.source}: {used.watts:.2f} W average over {used.seconds:.2f} s, whole package/board"
                     if used else not_readable(reasons) if energy else ""),
    )


# ---- CLI: edgestack bench ------------------------------------------------------------------------------

def _report(budget: Budget, json_path: str | None) -> None:
    print(budget.table(), flush=True)
    if json_path:
        text = json.dumps(budget.to_dict(), indent=2)
        if json_path == "-":
            print(text)
        else:
            Path(json_path).write_text(text + "\n")
            print(f"JSON written to {json_path}")


def cmd_bench(args: argparse.Namespace) -> int:
    images = [path.read_bytes() for path in image_folder(args.images)]
    if args.url:
        _report(measure_budget(args.url, args.model, images, args.requests, warmup=args.warmup), args.json)
        return 0
    from builder.repository import render_repository, target_for
    from builder.spec import load_spec
    from edgestack.server import TritonServer

    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory(prefix="edgestack-bench-") as tmp:
        repo = render_repository(spec, Path(tmp) / "model_repository", target_for(spec))
        print(f"started tritonserver on a repository rendered from {args.spec} (target {spec.target}, builder defaults)",
              file=sys.stderr, flush=True)
        with TritonServer(repo, log_path=Path(tmp) / "tritonserver.log") as server:
            budget = measure_budget(server.grpc_url, spec.name, images, args.requests, warmup=args.warmup)
    _report(budget, args.json)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the CLI's subparsers; the handler is set as `func`."""
    bench = subparsers.add_parser(
        "bench", help="latency budget of one image: client, network, ensemble queue and each step's time",
        description="Send sequential gRPC requests and break one image's latency into client serialization, "
                    "network/gRPC + frontend, the ensemble's queue and each step's queue and compute times "
                    "(Triton statistics API). Without --url, renders the default spec into a temporary folder "
                    "and runs its own tritonserver for the measurement.")
    bench.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    bench.add_argument("--model", default="detect", help="ensemble name (with --url; default: detect)")
    bench.add_argument("--spec", default=str(DEFAULT_SPEC), help="spec to render when no --url is given")
    bench.add_argument("--images", required=True, metavar="DIR", help="folder of images, sent in turn")
    bench.add_argument("--requests", type=_positive_int, default=50, help="measured sequential requests (default: 50)")
    bench.add_argument("--warmup", type=_non_negative_int, default=3, help="unmeasured requests first (default: 3)")
    bench.add_argument("--json", metavar="FILE", help="also write the budget as JSON to FILE ('-': stdout)")
    bench.set_defaults(func=cmd_bench)
    return bench
