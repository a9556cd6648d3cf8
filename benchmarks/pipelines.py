"""Pipelines of several models and preprocessing under a flood, through a real tritonserver on this machine.

1. Latency of each pipeline (single `detect`, `cascade`, `parallel`; specs/centernet_*.yaml), one image per request,
   the pipelines interleaved image by image so they share the machine's noise; the share of requests each cascade
   stage answered (fast, precise, cloud: the cloud here is the same server's `detect`, a stand-in).
2. The flood: one client sends the fixture photos one by one (good requests) to `detect`, first on an idle server,
   then while other clients keep sending in-limit heavy images (8192x4880 JPEGs, decoded at reduced size, or PNGs,
   decoded in full); p99 of the good requests against the idle server's, in the same run.

Writes its section of BENCHMARKS.md between markers. Not a test: nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image
from sections import replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common import tensors as T  # noqa: E402
from builder.repository import target_for  # noqa: E402
from builder.spec import load_spec  # noqa: E402
from edgestack.server import TritonServer, free_port  # noqa: E402
from ensembles import render_pipeline  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
BEGIN, END = "<!-- pipelines:begin -->", "<!-- pipelines:end -->"
CLOUD_BELOW = 0.45


def photos() -> list[bytes]:
    files = sorted(p for d in ("images", "images_more") for p in (FIXTURES / d).iterdir() if p.suffix in (".jpg", ".png"))
    return [p.read_bytes() for p in files]


class Client:
    def __init__(self, url: str):
        import tritonclient.grpc as grpc

        self.grpc = grpc
        self.client = grpc.InferenceServerClient(url)

    def infer(self, model: str, image: bytes, outputs=(T.NUM_DETECTIONS, T.SOURCE, T.STATUS)) -> dict:
        tensor = self.grpc.InferInput(T.IMAGE, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=object))
        result = self.client.infer(model, [tensor], outputs=[self.grpc.InferRequestedOutput(n) for n in outputs])
        return {n: result.as_numpy(n).reshape(-1)[0] for n in outputs}

    def close(self) -> None:
        self.client.close()


def percentiles(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def measure_pipelines(rounds: int, tmp: Path) -> dict:
    """Latency of detect, cascade and parallel (default CPU target); the cascade's stage shares, also with a cloud
    (cascade_cloud: the router sends precise answers under CLOUD_BELOW to this server's detect, one instance per step)."""
    repo = tmp / "pipelines"
    grpc_port = free_port()
    single = load_spec(ROOT / "specs" / "centernet_coco.yaml")
    cascade = load_spec(ROOT / "specs" / "centernet_cascade.yaml")
    with_cloud = cascade.replace(name="cascade_cloud", router=dataclasses.replace(
        cascade.router, cloud_url=f"127.0.0.1:{grpc_port}", cloud_model=single.name, min_confidence=CLOUD_BELOW))
    parallel = load_spec(ROOT / "specs" / "centernet_parallel.yaml")
    for spec in (single, cascade, parallel):
        render_pipeline(spec, repo, target_for(spec))
    render_pipeline(with_cloud, repo, target_for(with_cloud, detector_instances=1, preprocess_instances=1))
    images = photos()
    models = ("detect", "cascade", "parallel", "cascade_cloud")
    latencies = {name: [] for name in models}
    by_stage: dict[str, list[float]] = {"fast": [], "precise": []}
    stages = {"cascade": Counter(), "cascade_cloud": Counter()}
    with TritonServer(repo, grpc_port=grpc_port, log_path=tmp / "pipelines.log") as server:
        client = Client(server.grpc_url)
        try:
            for model in models:  # warm every model once
                client.infer(model, images[0])
            for _ in range(rounds):
                for image in images:
                    for model in models:
                        cascade_model = model.startswith("cascade")
                        outputs = (T.NUM_DETECTIONS, T.SOURCE, T.STAGE) if cascade_model else (T.NUM_DETECTIONS,)
                        started = time.perf_counter()
                        answer = client.infer(model, image, outputs)
                        elapsed = (time.perf_counter() - started) * 1000
                        latencies[model].append(elapsed)
                        if cascade_model:
                            stage = "cloud" if answer[T.SOURCE].decode() == "cloud" else answer[T.STAGE].decode()
                            stages[model][stage] += 1
                            if model == "cascade":
                                by_stage[stage].append(elapsed)
        finally:
            client.close()
    return {"latency_ms": {m: percentiles(v) for m, v in latencies.items()},
            "cascade_by_stage_ms": {k: percentiles(v) for k, v in by_stage.items() if v},
            "cascade_stages": {m: dict(c) for m, c in stages.items()}, "images": len(images), "rounds": rounds}


def heavy_jpeg(width: int = 8192, height: int = 4880) -> bytes:
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = np.kron(tiles, np.ones((16, 16, 1), np.uint8))[:height, :width]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def heavy_png(width: int = 8192, height: int = 4880) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(out, "PNG", optimize=True)
    return out.getvalue()


def flood_phase(url: str, good: list[bytes], heavy: bytes | None, rate: float, seconds: float, cap: int = 16) -> dict:
    """Good requests one by one for seconds while heavy images arrive at rate per second (open loop: they do not
    wait for each other's answers; at most cap in flight, the rest counted as not sent)."""
    import tritonclient.grpc as grpc

    stop = threading.Event()
    lock = threading.Lock()
    counts = {"sent": 0, "done": 0, "failed": 0, "not_sent": 0, "in_flight": 0}

    def answered(result, error) -> None:
        with lock:
            counts["in_flight"] -= 1
            counts["done"] += 1
            failed = error is not None or bool(result.as_numpy(T.STATUS).reshape(-1)[0])
            counts["failed"] += failed

    def heavy_loop() -> None:
        client = grpc.InferenceServerClient(url)
        tensor = grpc.InferInput(T.IMAGE, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[heavy]], dtype=object))
        outputs = [grpc.InferRequestedOutput(T.STATUS)]
        next_at = time.monotonic()
        try:
            while not stop.is_set():
                with lock:
                    room = counts["in_flight"] < cap
                    counts["in_flight" if room else "not_sent"] += 1
                    counts["sent"] += room
                if room:
                    client.async_infer("detect", [tensor], callback=answered, outputs=outputs)
                next_at += 1.0 / rate
                stop.wait(max(0.0, next_at - time.monotonic()))
            deadline = time.monotonic() + 120
            while counts["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            client.close()

    sender = threading.Thread(target=heavy_loop, daemon=True) if heavy else None
    if sender:
        sender.start()
    client = Client(url)
    latencies = []
    deadline = time.monotonic() + seconds
    try:
        i = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.infer("detect", good[i % len(good)])
            latencies.append((time.perf_counter() - started) * 1000)
            i += 1
    finally:
        stop.set()
        client.close()
        if sender:
            sender.join(timeout=180)
    return {**percentiles(latencies), **{f"heavy_{k}": v for k, v in counts.items()}}


def measure_flood(seconds: float, rate: float, tmp: Path, preprocess_instances: int | None) -> dict:
    spec = load_spec(ROOT / "specs" / "centernet_coco.yaml")
    repo = tmp / f"flood-{preprocess_instances}"
    target = target_for(spec, preprocess_instances=preprocess_instances)
    render_pipeline(spec, repo, target)
    good = photos()
    phases = {}
    with TritonServer(repo, log_path=tmp / "flood.log") as server:
        warm = Client(server.grpc_url)
        for image in good[:4]:
            warm.infer("detect", image)
        warm.close()
        phases["idle"] = flood_phase(server.grpc_url, good, None, rate, seconds)
        for name, heavy in (("jpeg_8192x4880", heavy_jpeg()), ("png_8192x4880", heavy_png())):
            phases[name] = {**flood_phase(server.grpc_url, good, heavy, rate, seconds), "bytes": len(heavy)}
    return {"preprocess_instances": target.preprocess_instances, "detector_instances": target.detector_instances,
            "rate": rate, "seconds": seconds, "phases": phases}


def decode_costs(repeats: int = 5) -> dict:
    """In-process preprocess time (decode + resize to 512x512) of each heavy image, full size and reduced (draft)."""
    from backends.common.settings import DecodeLimits, InputSpec
    from backends.preprocess.image_ops import decode_reduced, prepare_input

    spec = InputSpec(height=512, width=512, dtype="uint8")
    costs = {}
    for name, data in (("jpeg_8192x4880", heavy_jpeg()), ("png_8192x4880", heavy_png())):
        for mode, side in (("full", None), ("reduced", 512)):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                decoded = decode_reduced(data, DecodeLimits(), side)
                prepare_input(decoded.rgb, spec, decoded.original_size)
                times.append((time.perf_counter() - started) * 1000)
            costs[f"{name} {mode}"] = {"ms": float(np.median(times)), "decoded": list(decoded.rgb.shape[:2])}
    return costs


def device_class() -> str:
    from builder.device_class import host_class

    try:
        return host_class()
    except Exception:  # noqa: BLE001
        return platform.machine()


def section(r: dict) -> str:
    p = r["pipelines"]
    lat = p["latency_ms"]
    base = lat["detect"]["p50"]
    lines = [f"## Pipelines of several models and preprocessing under a flood ({r['date']}, {r['device']}, "
             f"{r['cores']} cores shared, `python benchmarks/pipelines.py`)", "",
             f"One image per request over gRPC, {p['images']} photos (fixtures `images/` + `images_more/`) x "
             f"{p['rounds']} rounds, the pipelines interleaved image by image; default CPU target "
             "(2 detector instances x 1 ONNX Runtime thread, 3 preprocess instances). The cascade's fast stage and the "
             "parallel ensemble's second model are the fixture CenterNet rewritten by the builder to 320x320 and "
             "384x384 input (`ensembles/input_resize.py`); the precise/first model is the fixture at 512x512. "
             "`cascade_cloud` is the cascade whose router sends precise answers under "
             f"{CLOUD_BELOW} to a cloud, here this same server's `detect` (one instance per step).", "",
             "| pipeline | p50 ms | p99 ms | mean ms | p50 vs `detect` |", "|---|---|---|---|---|"]
    for model, s in lat.items():
        lines.append(f"| `{model}` | {s['p50']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} | {s['p50'] / base:.2f}x |")
    for stage, s in p["cascade_by_stage_ms"].items():
        lines.append(f"| `cascade`, answered by {stage} | {s['p50']:.1f} | {s['p99']:.1f} | {s['mean']:.1f} | "
                     f"{s['p50'] / base:.2f}x |")
    lines.append("")
    for model, counts in p["cascade_stages"].items():
        total = sum(counts.values()) or 1
        lines.append(f"Share of requests answered by each stage of `{model}` (fast stage kept at best score >= 0.5): "
                     + ", ".join(f"{name} {counts.get(name, 0)} ({100 * counts.get(name, 0) / total:.0f}%)"
                                 for name in ("fast", "precise", "cloud")) + f" of {total}.")
        lines.append("")
    lines += ["Preprocess time of one heavy image in process (decode + resize to 512x512, median of 5): "
              + "; ".join(f"{k} {v['ms']:.0f} ms (decoded {v['decoded'][1]}x{v['decoded'][0]})"
                          for k, v in r["decode_costs"].items()) + ". A PNG has no reduced decode: the per-request "
              "pixel budget (`limits.max_request_pixels`) bounds what one request may cost.", ""]
    for flood in r["floods"]:
        idle = flood["phases"]["idle"]["p99"]
        lines += [f"Flood: one client sends the photos one by one to `detect` for {flood['seconds']:g} s per phase, "
                  f"while heavy in-limit images arrive at {flood['rate']:g}/s (open loop, at most 16 in flight) "
                  f"(preprocess instances {flood['preprocess_instances']}, detector instances "
                  f"{flood['detector_instances']}).", "",
                  "| phase | good p50 ms | good p99 ms | good p99 vs idle | good requests | heavy sent / answered / failed / not sent |",
                  "|---|---|---|---|---|---|"]
        for name, p in flood["phases"].items():
            heavy = "" if name == "idle" else (f"{p['heavy_sent']} / {p['heavy_done']} / {p['heavy_failed']} / {p['heavy_not_sent']} "
                                               f"({p['bytes'] / 1024:.0f} KB each)")
            lines.append(f"| {name} | {p['p50']:.1f} | {p['p99']:.1f} | {p['p99'] / idle:.2f}x | {p['n']} | {heavy} |")
        lines.append("")
    lines += ["Reading it: the fast stage answers the photos it is confident on at its own, smaller latency and the "
              "rest pay both stages, so the cascade beats `detect` alone only when the fast stage's share is high "
              "enough: where most images are easy (a fixed camera) or the precise stage is far slower than the fast "
              "one. The parallel ensemble runs both detectors concurrently, so it costs about the slower branch "
              "plus the fusion, not the sum. The flood tables compare good requests with an idle server in the same "
              "run (the target: good p99 within 2x of idle). Large images (over `limits.large_pixels` decoded) are "
              "decoded one at a time per model, in a thread of the lowest CPU priority (SCHED_IDLE), and refused as "
              "busy while another decodes or when batched with other requests (the heavy 'failed' column); JPEGs "
              "are decoded at reduced size. A PNG has no reduced decode: with the builder's preprocess instances "
              "(one more than the detector's) a good request always finds a free instance and the decode only "
              "takes the CPU left over; with one instance a good request waits behind the decode (the baseline "
              "tables). Before this, a refused PNG was still decoded in full (Pillow's PNG getexif() reads the "
              "whole file) and the same flood gave good p99 25.7x idle.", ""]
    for flood in r["floods"]:
        idle = flood["phases"]["idle"]["p99"]
        verdicts = [f"{name} {p['p99'] / idle:.2f}x ({'within' if p['p99'] <= 2 * idle else 'NOT within'} 2x)"
                    for name, p in flood["phases"].items() if name != "idle"]
        lines.append(f"With {flood['preprocess_instances']} preprocess instance(s) at {flood['rate']:g} heavy/s, good p99 "
                     f"vs idle: " + ", ".join(verdicts) + ".")
    lines.append("")
    return "\n".join(lines) + "\n"


def write_section(path: Path, result: dict) -> None:
    replace_section(path, BEGIN, END, section(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the photos per pipeline")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each flood phase")
    parser.add_argument("--heavy-rates", default="1.5,3", help="heavy images per second during a flood, one flood each")
    parser.add_argument("--baseline", action="store_true", help="also flood a server with one preprocess instance")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="write the section here ('' to skip)")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--from-json", default="", help="only write the section from results saved with --json")
    args = parser.parse_args()
    import os

    if args.from_json:
        write_section(Path(args.out), json.loads(Path(args.from_json).read_text()))
        return 0
    with tempfile.TemporaryDirectory(prefix="pipelines-bench-") as tmp:
        result = {"date": date.today().isoformat(), "device": device_class(), "cores": os.cpu_count(),
                  "pipelines": measure_pipelines(args.rounds, Path(tmp)), "decode_costs": decode_costs(),
                  "floods": []}
        for rate in (float(r) for r in args.heavy_rates.split(",")):
            result["floods"].append(measure_flood(args.seconds, rate, Path(tmp), None))
            if args.baseline:
                result["floods"].append(measure_flood(args.seconds, rate, Path(tmp), 1))
    print(section(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.out:
        write_section(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
