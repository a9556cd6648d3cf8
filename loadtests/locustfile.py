"""Locust load test of the `detect` ensemble with the real Triton client library (tritonclient).

Two user classes, one per protocol, so the measured time is what an application using tritonclient
sees (request serialization, transport, response parsing):

    GrpcDetectUser   tritonclient.grpc  (grpcio, made gevent-cooperative below)
    HttpDetectUser   tritonclient.http  (geventhttpclient, cooperative already)

Each user sends one image per request (IMAGE [1, 1] BYTES) back to back (no think time while requests
succeed), so the number of users is the number of requests in flight. Every request is reported to locust as
request_type "grpc"/"http", name "detect"; a Triton error, a transport error, a missing output or an
unexpected SOURCE is a failure.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 30s --host 127.0.0.1:8001 GrpcDetectUser

Custom arguments (each also read from the environment variable in brackets):

    --images DIR            photos to send (EDGESTACK_LOAD_IMAGES; required)
    --grpc-url HOST:PORT    gRPC endpoint (EDGESTACK_LOAD_GRPC_URL; default: --host)
    --http-url HOST:PORT    HTTP endpoint (EDGESTACK_LOAD_HTTP_URL; default: --host)
    --model NAME            ensemble name (default: detect)
    --cloud-share F         fraction of requests that send a photo the edge is not confident about
                            (--low-confidence-images), exercising the router's cloud path; the rest
                            send the other photos. Default: every photo of the folder equally likely.
    --low-confidence-images flower.jpg,scream.jpg (the fixture detector finds nothing in them)
    --request-timeout S     per-request client timeout (default 30)
    --failure-backoff S     pause of a user after a failed request (default 0.1; successes: no pause)
    --stats-json FILE       also write the custom stats (SOURCE edge/cloud, DEGRADED) there

At the end the custom stats (results per SOURCE and DEGRADED, per protocol) are printed.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# Importing locust monkey-patches the standard library for gevent. gRPC's C core then has to be told to
# cooperate with gevent BEFORE any channel exists; without it every blocking gRPC call stalls the whole
# hub, so N users would behave like one.
import gevent
from locust import User, events, task
from locust import stats as locust_stats
from locust.runners import WorkerRunner

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from backends.common.files import image_folder  # noqa: E402

DEFAULT_LOW_CONFIDENCE = "flower.jpg,scream.jpg"

INPUT = "IMAGE"
DETECTION_OUTPUTS = ("BOXES", "SCORES", "CLASS_IDS", "CLASS_NAMES", "NUM_DETECTIONS")
OUTPUTS = (*DETECTION_OUTPUTS, "SOURCE", "DEGRADED")
SOURCES = ("edge", "cloud")
REQUEST_NAME = "detect"


class BadResponse(Exception):
    """The server answered, but not with what the ensemble promises (a missing output, a bad SOURCE)."""


class TritonError(Exception):
    """A Triton error, with its status and message in repr() (locust reports failures by repr, and
    InferenceServerException's repr is empty)."""

    @classmethod
    def from_exception(cls, exc: InferenceServerException) -> "TritonError":
        status = exc.status()
        return cls(f"[{status}] {exc.message()}" if status else str(exc.message()))


# ------------------------------------------------------------------ options


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("edgestack detect ensemble")
    group.add_argument("--images", default=os.environ.get("EDGESTACK_LOAD_IMAGES", ""),
                       help="folder of photos to send (required)")
    group.add_argument("--grpc-url", default=os.environ.get("EDGESTACK_LOAD_GRPC_URL", ""),
                       help="host:port of Triton's gRPC endpoint (default: --host)")
    group.add_argument("--http-url", default=os.environ.get("EDGESTACK_LOAD_HTTP_URL", ""),
                       help="host:port of Triton's HTTP endpoint (default: --host)")
    group.add_argument("--model", default=os.environ.get("EDGESTACK_LOAD_MODEL", "detect"), help="ensemble name")
    group.add_argument("--cloud-share", type=float, default=_env_float("EDGESTACK_LOAD_CLOUD_SHARE"),
                       help="fraction (0..1) of requests sending a low-confidence photo (the cloud path); "
                            "default: every photo equally likely")
    group.add_argument("--low-confidence-images", default=DEFAULT_LOW_CONFIDENCE,
                       help="comma-separated file names the edge is not confident about")
    group.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout in seconds")
    group.add_argument("--failure-backoff", type=float, default=0.1,
                       help="seconds a user pauses after a failed request (default 0.1)")
    group.add_argument("--stats-json", default=os.environ.get("EDGESTACK_LOAD_STATS_JSON", ""),
                       help="write the custom SOURCE/DEGRADED stats to this JSON file at the end")


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else None


def _strip_scheme(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


# ------------------------------------------------------------------ images


class ImagePool:
    """The photos of a folder, split into those the edge is confident about and those it is not."""

    def __init__(self, folder: Path, low_confidence: set[str], cloud_share: float | None):
        self.images = {p.name: p.read_bytes() for p in image_folder(folder)}
        self.low = [name for name in self.images if name in low_confidence]
        self.confident = [name for name in self.images if name not in low_confidence]
        if cloud_share is not None:
            if not 0.0 <= cloud_share <= 1.0:
                raise ValueError(f"--cloud-share must be within 0..1, not {cloud_share}")
            if cloud_share > 0 and not self.low:
                raise ValueError(f"--cloud-share {cloud_share} needs low-confidence images "
                                 f"({', '.join(sorted(low_confidence))}) in {folder}")
            if cloud_share < 1 and not self.confident:
                raise ValueError(f"--cloud-share {cloud_share} needs images other than the low-confidence ones in {folder}")
        self.cloud_share = cloud_share

    def draw(self, rng: random.Random) -> tuple[str, bool]:
        """A photo's name and whether it is a low-confidence one."""
        if self.cloud_share is None:
            name = rng.choice(list(self.images))
        elif rng.random() < self.cloud_share:
            name = rng.choice(self.low)
        else:
            name = rng.choice(self.confident)
        return name, name in self.low


_pool: ImagePool | None = None
_pool_lock = threading.Lock()


def image_pool(environment) -> ImagePool:
    global _pool
    with _pool_lock:
        if _pool is None:
            opts = environment.parsed_options
            if not opts.images:
                raise FileNotFoundError("no photos to send: give --images DIR (or EDGESTACK_LOAD_IMAGES)")
            low = {s.strip() for s in opts.low_confidence_images.split(",") if s.strip()}
            _pool = ImagePool(Path(opts.images).expanduser(), low, opts.cloud_share)
        return _pool


# ------------------------------------------------------------------ custom stats (SOURCE / DEGRADED)


class ResultStats:
    """Counts of successful results per protocol: edge, cloud, degraded, low-confidence photos sent."""

    KEYS = ("ok", "edge", "cloud", "degraded", "low_confidence_sent", "low_confidence_cloud")

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def record(self, protocol: str, source: str, degraded: bool, low_confidence: bool) -> None:
        c = self.counts.setdefault(protocol, Counter())
        c["ok"] += 1
        c[source] += 1
        c["degraded"] += int(degraded)
        c["low_confidence_sent"] += int(low_confidence)
        c["low_confidence_cloud"] += int(low_confidence and source == "cloud")

    def merge(self, data: dict[str, dict[str, int]]) -> None:
        for protocol, counts in data.items():
            self.counts.setdefault(protocol, Counter()).update(counts)

    def as_dict(self) -> dict[str, dict[str, int]]:
        out = {p: {k: int(c.get(k, 0)) for k in self.KEYS} for p, c in sorted(self.counts.items())}
        total = Counter()
        for c in self.counts.values():
            total.update(c)
        out["total"] = {k: int(total.get(k, 0)) for k in self.KEYS}
        return out

    def table(self) -> str:
        rows = self.as_dict()
        lines = [f"{'protocol':<9}" + "".join(f"{k:>22}" for k in self.KEYS)]
        lines += [f"{p:<9}" + "".join(f"{c[k]:>22}" for k in self.KEYS) for p, c in rows.items()]
        return "\n".join(lines)


result_stats = ResultStats()


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    """Refuse to start (exit code 2) on a bad image folder, share or endpoint, instead of failing every user."""
    if environment.parsed_options is None:  # library use without locust's argument parser
        return
    try:
        image_pool(environment)
        for user_class in environment.user_classes:
            protocol = getattr(user_class, "protocol", "")
            if protocol and not (getattr(environment.parsed_options, f"{protocol}_url", "") or environment.host):
                raise ValueError(f"{user_class.__name__} needs --{protocol}-url or --host (host:port)")
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).error("edgestack locustfile: %s", exc)
        sys.exit(2)


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    result_stats.counts.clear()


@events.report_to_master.add_listener
def _on_report_to_master(client_id, data, **_kw) -> None:
    data["edgestack_results"] = {p: dict(c) for p, c in result_stats.counts.items()}
    result_stats.counts.clear()


@events.worker_report.add_listener
def _on_worker_report(client_id, data, **_kw) -> None:
    result_stats.merge(data.get("edgestack_results", {}))


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        # Locust rewrites <prefix>_stats.csv only every CSV_STATS_INTERVAL_SEC and not once more at shutdown
        # (locust issue #2299), so the file can miss the last second of requests. Users are stopped by now:
        # give the writer greenlet one more pass so the CSV holds the final numbers.
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.25)
    print("\nedgestack results by SOURCE / DEGRADED (successful requests)", flush=True)
    print(result_stats.table(), flush=True)
    path = getattr(opts, "stats_json", "") if opts is not None else ""
    if path:
        pool = _pool
        total = environment.stats.total
        payload = {
            "locust_total": {"requests": total.num_requests, "failures": total.num_failures},
            "results": result_stats.as_dict(),
            "cloud_share": pool.cloud_share if pool else None,
            "low_confidence_images": pool.low if pool else [],
            "images": sorted(pool.images) if pool else [],
        }
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))


# ------------------------------------------------------------------ users


def _payload_bytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return int(sum(len(x) for x in array.reshape(-1)))
    return int(array.nbytes)


class _DetectUser(User):
    """One tritonclient per user; one image per request; the request timed around client.infer()."""

    abstract = True
    protocol = ""
    module = None

    def wait_time(self) -> float:
        # Back to back while requests succeed; after a failure pause briefly, so a dead endpoint is not
        # hammered thousands of times a second (failures still fail the run).
        return self.failure_backoff_s if self._last_failed else 0.0

    def __init__(self, environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        explicit = getattr(opts, f"{self.protocol}_url", "") if opts else ""
        self.url = _strip_scheme(explicit or self.host or "")
        if not self.url:
            raise ValueError(f"{type(self).__name__}: give --{self.protocol}-url or --host (host:port)")
        self.model = opts.model if opts else "detect"
        self.timeout_s = float(opts.request_timeout) if opts else 30.0
        self.failure_backoff_s = float(opts.failure_backoff) if opts else 0.1
        self._last_failed = False
        self.rng = random.Random()
        self.client = None
        self._inputs: dict[str, object] = {}

    def make_client(self):
        raise NotImplementedError

    def call(self, inputs, outputs):
        raise NotImplementedError

    def on_start(self) -> None:
        self.pool = image_pool(self.environment)
        self.client = self.make_client()
        self.outputs = [self.module.InferRequestedOutput(name) for name in OUTPUTS]

    def on_stop(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            finally:
                self.client = None

    def _input(self, name: str):
        """The request tensor for a photo, serialized once per user (the bytes never change)."""
        tensor = self._inputs.get(name)
        if tensor is None:
            tensor = self.module.InferInput(INPUT, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[self.pool.images[name]]], dtype=object))
            self._inputs[name] = tensor
        return tensor

    @task
    def detect(self) -> None:
        name, low_confidence = self.pool.draw(self.rng)
        inputs = [self._input(name)]
        exception: BaseException | None = None
        response_length = 0
        started = time.perf_counter()
        try:
            result = self.call(inputs, self.outputs)
        except InferenceServerException as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            exception = TritonError.from_exception(exc)
        except Exception as exc:  # transport errors, timeouts: still this request's failure
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            exception = exc
        else:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            try:
                response_length, source, degraded = self._check(result)
                result_stats.record(self.protocol, source, degraded, low_confidence)
            except Exception as exc:
                exception = exc if isinstance(exc, BadResponse) else BadResponse(f"{type(exc).__name__}: {exc}")
        self._last_failed = exception is not None
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=REQUEST_NAME,
            response_time=elapsed_ms,
            response_length=response_length,
            exception=exception,
            context={"image": name, "low_confidence": low_confidence},
        )

    @staticmethod
    def _check(result) -> tuple[int, str, bool]:
        arrays = {name: result.as_numpy(name) for name in OUTPUTS}
        missing = [name for name, a in arrays.items() if a is None]
        if missing:
            raise BadResponse(f"response lacks output(s) {', '.join(missing)}")
        count = int(arrays["NUM_DETECTIONS"].reshape(-1)[0])
        if not 0 <= count <= arrays["SCORES"].shape[-1]:
            raise BadResponse(f"NUM_DETECTIONS {count} does not fit SCORES {arrays['SCORES'].shape}")
        source = arrays["SOURCE"].reshape(-1)[0]
        source = source.decode() if isinstance(source, bytes) else str(source)
        if source not in SOURCES:
            raise BadResponse(f"unexpected SOURCE {source!r}")
        degraded = bool(arrays["DEGRADED"].reshape(-1)[0])
        return sum(_payload_bytes(a) for a in arrays.values()), source, degraded


class GrpcDetectUser(_DetectUser):
    protocol = "grpc"
    module = grpcclient

    def make_client(self):
        return grpcclient.InferenceServerClient(self.url)

    def call(self, inputs, outputs):
        return self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)


class HttpDetectUser(_DetectUser):
    protocol = "http"
    module = httpclient

    def make_client(self):
        return httpclient.InferenceServerClient(self.url, concurrency=1, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s)

    def call(self, inputs, outputs):
        return self.client.infer(self.model, inputs, outputs=outputs)


if __name__ == "__main__":  # pragma: no cover - run it through locust
    sys.exit("run this file with locust: locust -f loadtests/locustfile.py --headless ...")
