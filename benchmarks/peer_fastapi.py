"""Peer comparison: the Triton ensemble against the same detector behind FastAPI + uvicorn + ONNX Runtime.

One run, same machine, same images, one load generator (closed loop: `concurrency` threads in this process,
each sending its next request as soon as the previous answer arrived, for a fixed number of seconds):

  triton        the `detect` ensemble rendered with the builder's defaults for the spec's target, over gRPC
                (tritonclient, one client per thread); nothing tuned here beyond the builder.
  peer-tuned    benchmarks/fastapi_peer_app.py under uvicorn with <cores> workers (one per core), ONNX Runtime
                intra_op_num_threads=1 per worker, access log off, started with `python -m
                benchmarks.fastapi_peer_app`, which works around uvicorn's lost TCP_NODELAY with --workers > 1
                (Kludex/uvicorn#3149: +~40 ms per keep-alive request); HTTP keep-alive (http.client).
  peer-tuned-stock  the same with the stock `uvicorn --workers <cores>` command line, bug included.
  peer-default  the same app with uvicorn's and ONNX Runtime's defaults (1 worker, ORT default threads).

All servers run for the whole measurement (idle while another is measured); levels are interleaved (each
level measures every system in turn), so drift over the run hits all of them alike.
Prints images/s and p99 per level and the Triton / peer-tuned ratios at the highest level against the
target (throughput >= 0.95x, p99 <= 1.1x). Not a test: it prints numbers (--out appends Markdown).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from builder.repository import render_repository, target_for  # noqa: E402
from builder.spec import load_spec  # noqa: E402
from builder.tune.measure import Level, closed_loop  # noqa: E402,F401 - tune_vs_peers imports them from here
from edgestack.client import LOAD_PROTOCOLS, sender_factory  # noqa: E402
from edgestack.server import TritonServer, free_port, stop_process_group  # noqa: E402

THROUGHPUT_TARGET = 0.95  # Triton / peer-tuned images per second, at the highest concurrency
P99_TARGET = 1.10  # Triton / peer-tuned p99 latency, at the highest concurrency
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- the peer service --------------------------------------------------------------------------------

@dataclass
class PeerServer:
    """uvicorn serving benchmarks/fastapi_peer_app.py on a free loopback port; stopped by PID (process group)."""

    name: str
    workers: int | None  # None: uvicorn's default (1)
    ort_threads: int | None  # None: ONNX Runtime's default
    spec: Path
    log_path: Path
    access_log: bool = True
    stock_cli: bool = True  # False: python -m benchmarks.fastapi_peer_app (TCP_NODELAY-safe workers)
    engine: str = "onnxruntime"  # or openvino (PEER_ENGINE)
    port: int = 0
    process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.stock_cli:
            cmd = [sys.executable, "-m", "uvicorn", "benchmarks.fastapi_peer_app:app"]
        else:
            cmd = [sys.executable, "-m", "benchmarks.fastapi_peer_app"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        if not self.access_log:
            cmd.append("--no-access-log")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, PEER_SPEC=str(self.spec), PYTHONPATH=str(ROOT))
        env.pop("PEER_ORT_THREADS", None)
        if self.ort_threads is not None:
            env["PEER_ORT_THREADS"] = str(self.ort_threads)
        env["PEER_ENGINE"] = self.engine
        return env

    def describe(self) -> str:
        threads = "default" if self.ort_threads is None else str(self.ort_threads)
        engine = "" if self.engine == "onnxruntime" else f"PEER_ENGINE={self.engine} "
        return f"{engine}PEER_ORT_THREADS={threads} python " + " ".join(shlex.quote(c) for c in self.command()[1:])

    def start(self, timeout_s: float = 60.0) -> "PeerServer":
        self.port = self.port or free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.environment(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"{self.name}: uvicorn exited with code {code} while starting; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read())["ready"]:
                        return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name}: not ready within {timeout_s:.0f}s; log: {self.log_path}")

    def stop(self, timeout_s: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout_s)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


# ---- load generator ----------------------------------------------------------------------------------

def http_sender(port: int) -> Callable[[], Callable[[bytes], object]]:
    """Per-thread sender factory: one keep-alive HTTP/1.1 connection per thread."""

    def make() -> Callable[[bytes], object]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def send(data: bytes) -> object:
            conn.request("POST", "/detect", body=data, headers={"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
            return json.loads(body)

        send.close = conn.close  # type: ignore[attr-defined]
        return send

    return make


def add_triton_protocol_option(parser: argparse.ArgumentParser) -> None:
    """--triton-protocol: how the load generator talks to Triton (edgestack.client.sender_factory)."""
    parser.add_argument("--triton-protocol", choices=LOAD_PROTOCOLS, default=LOAD_PROTOCOLS[0],
                        help="how the load generator talks to Triton: http-keepalive (default, as to the peers) or "
                             "tritonclient's grpc / http")


# ---- sanity: same model, same answers ----------------------------------------------------------------

def outputs_agree(triton_result, peer_json: dict, tolerance_px: float = 1.5) -> bool:
    a = triton_result.detections
    b = peer_json["detections"]
    if [d.class_id for d in a] != [d["class_id"] for d in b]:
        return False
    return all(abs(x - y) <= tolerance_px for d, e in zip(a, b) for x, y in zip(d.box, e["box"]))


# ---- main ----------------------------------------------------------------------------------------------

SYSTEMS = ("triton", "peer-tuned", "peer-tuned-stock", "peer-default")


def make_peers(names: list[str], spec: Path, workers: int, tmp: Path) -> dict[str, PeerServer]:
    configs = {
        "peer-tuned": dict(workers=workers, ort_threads=1, access_log=False, stock_cli=False),
        "peer-tuned-stock": dict(workers=workers, ort_threads=1, access_log=False, stock_cli=True),
        "peer-default": dict(workers=None, ort_threads=None, access_log=True, stock_cli=True),
        # one worker whose ONNX Runtime uses every core without spinning: one image on all cores
        "peer-cores": dict(workers=None, ort_threads=CORES, access_log=False, stock_cli=False),
        # the same model run by OpenVINO (as the `intel` target's detector): one worker per core, and one on all
        "peer-openvino": dict(workers=workers, ort_threads=1, access_log=False, stock_cli=False, engine="openvino"),
        "peer-openvino-cores": dict(workers=None, ort_threads=CORES, access_log=False, stock_cli=False,
                                    engine="openvino"),
    }
    return {n: PeerServer(n, spec=spec, log_path=tmp / f"{n}.log", **configs[n]) for n in names if n != "triton"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"))
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated levels (default: 1,4,8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each level per system (default: 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per system first")
    parser.add_argument("--workers", type=int, default=CORES, help=f"peer-tuned uvicorn workers (default: cores = {CORES})")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}; triton and peer-tuned are always run")
    add_triton_protocol_option(parser)
    parser.add_argument("--out", help="append the results as a Markdown section to this file")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    images = [p.read_bytes() for p in image_files(Path(args.images))]
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = {n.strip() for n in args.systems.split(",") if n.strip()} | {"triton", "peer-tuned"}
    unknown = wanted - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s) {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    names = [n for n in SYSTEMS if n in wanted]
    target = target_for(spec)  # the builder's defaults for the spec's target: nothing tuned here
    results: dict[str, dict[int, Level]] = {n: {} for n in names}
    load_before = os.getloadavg()[0]  # other work on the machine skews every number; it is reported

    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repo = render_repository(spec, tmp / "model_repository", target)
        peers = make_peers(names, Path(args.spec).resolve(), args.workers, tmp)
        triton = TritonServer(repo, log_path=tmp / "tritonserver.log")
        started: list = []
        try:
            triton.start()
            started.append(triton)
            for peer in peers.values():
                peer.start()
                started.append(peer)
            senders = {"triton": sender_factory(triton, args.triton_protocol, spec.name),
                       **{n: http_sender(peer.port) for n, peer in peers.items()}}
            print(f"tritonserver pid {triton.pid} grpc {triton.grpc_url}; target {target.name}: "
                  f"{json.dumps(dataclasses.asdict(target))}", flush=True)
            for name, peer in peers.items():
                print(f"{name} pid {peer.process.pid} port {peer.port}: {peer.describe()}", flush=True)

            # Same model, same answers (on every image), then warm every system up.
            check_triton, check_peer = senders["triton"](), senders["peer-tuned"]()
            agree = sum(outputs_agree(check_triton(img), check_peer(img)) for img in images)
            check_triton.close(), check_peer.close()
            print(f"outputs agree (classes, boxes within 1.5 px) on {agree}/{len(images)} images", flush=True)
            for name, make in senders.items():
                closed_loop(make, images, max(levels), args.warmup)

            for c in levels:
                for name, make in senders.items():
                    level = closed_loop(make, images, c, args.seconds)
                    results[name][c] = level
                    print(f"concurrency {c:>2} {name:<16} {level.images_per_s:7.2f} img/s  p50 {level.p50_ms:8.1f} ms  "
                          f"p99 {level.p99_ms:8.1f} ms  ({level.requests} requests, {level.errors} errors)", flush=True)
        finally:
            for server in reversed(started):
                server.stop()

    top = max(levels)
    t, p = results["triton"][top], results["peer-tuned"][top]
    tput_ratio = t.images_per_s / p.images_per_s if p.images_per_s else float("nan")
    p99_ratio = t.p99_ms / p.p99_ms if p.p99_ms else float("nan")
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    lines = [
        f"## Triton vs FastAPI + ONNX Runtime peer ({datetime.date.today()}, {platform.machine()}, {CORES} cores, "
        f"{len(images)} images, {args.seconds:g} s per level)",
        "",
        f"- triton: `{spec.name}` ensemble rendered with the builder's defaults for target `{target.name}`: "
        f"{target.detector_instances} detector instance(s) x {target.intra_op_threads} ORT thread(s), "
        f"{target.preprocess_instances}/{target.postprocess_instances}/{target.router_instances} preprocess/postprocess/router "
        f"instance(s), max_batch_size {target.max_batch_size}, max_queue_delay_us {target.max_queue_delay_us}, "
        f"input conversion fused into the graph: {target.fuse_input_conversion}; gRPC, one tritonclient per thread.",
    ]
    lines += [f"- {name}: `{peer.describe()}`" for name, peer in peers.items()]
    lines += [
        f"- Triton over {args.triton_protocol}. Peers: HTTP/1.1 keep-alive, one connection per thread; `python -m benchmarks.fastapi_peer_app` works around "
        "uvicorn's lost TCP_NODELAY with --workers > 1 (Kludex/uvicorn#3149), the stock command line does not.",
        f"- Outputs agree on {agree}/{len(images)} images. Closed loop, load generator in the same process, "
        f"on the same cores as the servers. 1-min load average before the run: {load_before:.2f}, "
        f"after: {os.getloadavg()[0]:.2f} (includes this run).",
        "",
        "| concurrency | " + " | ".join(f"{n} img/s | {n} p99 ms" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for c in levels:
        lines.append(f"| {c} | " + " | ".join(f"{results[n][c].images_per_s:.2f} | {results[n][c].p99_ms:.1f}" for n in names) + " |")
    errors = {n: sum(r.errors for r in levels_.values()) for n, levels_ in results.items()}
    lines += [
        "",
        f"**At concurrency {top}, triton / peer-tuned: throughput {tput_ratio:.3f}x "
        f"({verdict(tput_ratio >= THROUGHPUT_TARGET)} target >= {THROUGHPUT_TARGET}x), "
        f"p99 {p99_ratio:.3f}x ({verdict(p99_ratio <= P99_TARGET)} target <= {P99_TARGET}x).**",
        "",
        f"Errors: {errors}.",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/peer_fastapi.py', *map(shlex.quote, sys.argv[1:])])}`",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
