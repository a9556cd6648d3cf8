"""The learning loop's costs, through a real tritonserver on this machine.

1. Sampling on vs off: the fixture spec's pipeline rendered twice (plain, and with the sampler step), both served
   at once, every fixture photo sent to both, the order alternating image by image so they share the machine's
   noise; p50/p90 of each and the ratio. The sampler keeps every uncertain image (rate limit off: the worst case,
   spool writes included, on their thread).
2. The frame-result cache on a real video (fixtures/videos/vtest.avi, 768x576 at 10 fps): every frame JPEG-encoded
   and detected by the plain pipeline (the reference, and each frame's latency); then, per cache setting, the
   frames replayed through loop.frame_cache with the video's timestamps: the share reused, the mean latency per
   frame (the cache's own check, plus the frame's measured pipeline latency when computed), and the missed-change
   rate: reused frames whose own detections differ from the reused ones (one-to-one match, same class, IoU >= 0.5).

Writes its section of BENCHMARKS.md between markers and out/bench_loop.json. Not a test: nothing asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.device_class import detect as device_info  # noqa: E402
from builder.repository import render_repository, target_for  # noqa: E402
from builder.spec import load_spec  # noqa: E402
from edgestack.server import TritonServer  # noqa: E402
from loop.frame_cache import FrameCache, FrameCacheSettings, thumbnail  # noqa: E402
from loop.pipeline_step import add_sampling  # noqa: E402
from loop.settings import SamplingSettings  # noqa: E402
from loop.uncertainty import pairwise_iou  # noqa: E402
from sections import replace_section  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
SPEC = ROOT / "specs" / "centernet_coco.yaml"
BEGIN, END = "<!-- loop:begin -->", "<!-- loop:end -->"
CACHE_SETTINGS = [FrameCacheSettings(max_diff=d, max_block_diff=b, max_frames=f, max_age_ms=a)
                  for d, b, f, a in ((1.0, None, 5, 500.0), (2.0, None, 5, 500.0), (3.0, None, 5, 500.0),
                                     (8.0, None, 10, 1000.0), (2.0, 12.0, 5, 500.0), (2.0, 20.0, 5, 500.0),
                                     (3.0, 30.0, 10, 1000.0))]


def infer(client, model: str, image: bytes) -> tuple[float, tuple]:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("BOXES", "SCORES", "CLASS_IDS", "NUM_DETECTIONS")]
    start = time.perf_counter()
    result = client.infer(model, [tensor], outputs=outputs)
    ms = (time.perf_counter() - start) * 1000.0
    k = int(result.as_numpy("NUM_DETECTIONS").reshape(-1)[0])
    return ms, (result.as_numpy("BOXES")[0, :k], result.as_numpy("SCORES")[0, :k], result.as_numpy("CLASS_IDS")[0, :k])


def pct(values, q) -> float:
    return float(np.percentile(values, q))


def sampling_overhead(servers, photos, rounds: int) -> dict:
    import tritonclient.grpc as grpcclient

    clients = {name: grpcclient.InferenceServerClient(s.grpc_url) for name, s in servers.items()}
    lat = {name: [] for name in servers}
    for name in servers:  # warm-up
        for p in photos[:3]:
            infer(clients[name], "detect", p)
    for r in range(rounds):
        for i, image in enumerate(photos):
            order = ["off", "on"] if (r + i) % 2 == 0 else ["on", "off"]
            for name in order:
                lat[name].append(infer(clients[name], "detect", image)[0])
    out = {name: {"n": len(v), "p50_ms": round(pct(v, 50), 2), "p90_ms": round(pct(v, 90), 2),
                  "mean_ms": round(statistics.fmean(v), 2)} for name, v in lat.items()}
    out["p50_ratio"] = round(out["on"]["p50_ms"] / out["off"]["p50_ms"], 4)
    out["p90_ratio"] = round(out["on"]["p90_ms"] / out["off"]["p90_ms"], 4)
    return out


def matched(a, b, iou: float = 0.5) -> int:
    """Detections of a matched one-to-one to b's (same class, IoU >= iou), greedily by best IoU."""
    (ba, _, ca), (bb, _, cb) = a, b
    if len(ca) == 0 or len(cb) == 0:
        return 0
    m = pairwise_iou(ba, bb)
    m[ca[:, None] != cb[None, :]] = 0.0
    used, count = set(), 0
    for i in np.argsort(-m.max(axis=1)):
        j = next((int(j) for j in np.argsort(-m[i]) if int(j) not in used and m[i, j] >= iou), None)
        if j is not None:
            used.add(j)
            count += 1
    return count


def same_detections(a, b, iou: float = 0.5) -> bool:
    return len(a[2]) == len(b[2]) == matched(a, b, iou)


def f1(a, b) -> float:
    total = len(a[2]) + len(b[2])
    return 1.0 if total == 0 else 2.0 * matched(a, b) / total


def frame_cache_run(server, video: Path, max_frames: int) -> dict:
    import cv2
    import tritonclient.grpc as grpcclient

    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    frames, encoded = [], []
    while len(frames) < max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
        encoded.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    capture.release()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for image in encoded[:3]:
        infer(client, "detect", image)
    reference = [infer(client, "detect", image) for image in encoded]
    lat = [ms for ms, _ in reference]
    changes = sum(not same_detections(reference[i][1], reference[i - 1][1]) for i in range(1, len(reference)))
    prev_f1 = statistics.fmean(f1(reference[i][1], reference[i - 1][1]) for i in range(1, len(reference)))
    start = time.perf_counter()
    for frame in frames:
        thumbnail(frame, 32)
    check_ms = (time.perf_counter() - start) * 1000.0 / len(frames)
    rows = []
    for settings in CACHE_SETTINGS:
        cache: FrameCache = FrameCache(settings)
        total_ms, missed, reused_n, f1s = 0.0, 0, 0, []
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            dets, reused = cache.get_or_compute("vtest", frame, lambda _f, i=i: reference[i][1],
                                                now_ms=i * 1000.0 / fps)
            total_ms += (time.perf_counter() - t0) * 1000.0 + (0.0 if reused else lat[i])
            if reused:
                reused_n += 1
                missed += not same_detections(dets, reference[i][1])
            f1s.append(f1(dets, reference[i][1]))
        rows.append({"max_diff": settings.max_diff, "max_block_diff": settings.max_block_diff,
                     "mean_f1": round(statistics.fmean(f1s), 4), "max_frames": settings.max_frames,
                     "max_age_ms": settings.max_age_ms, "reuse_rate": round(reused_n / len(frames), 4),
                     "mean_ms": round(total_ms / len(frames), 2),
                     "missed_change_rate": round(missed / len(frames), 4),
                     "missed_of_reused": round(missed / reused_n, 4) if reused_n else 0.0})
    return {"frames": len(frames), "fps": fps, "every_frame_mean_ms": round(statistics.fmean(lat), 2),
            "consecutive_frames_differ": round(changes / max(1, len(frames) - 1), 4),
            "previous_frame_f1": round(prev_f1, 4),
            "cache_check_ms": round(check_ms, 3), "settings": rows}


def markdown(result: dict) -> str:
    s, f = result["sampling"], result["frame_cache"]
    lines = [BEGIN, "## The learning loop (benchmarks/loop.py)", "",
             f"{result['date']}, CPU class `{result['cpu_class']}` ({result['cpus']} CPUs, shared), detector "
             f"{result['threads']} intra-op threads, 1 instance per step, gRPC, one image per request.", "",
             "**Sampling on vs off** (fixture photos, the two servers interleaved image by image; sampler keeps every "
             "uncertain image, rate limit off, spool writes on their thread):", "",
             "| pipeline | requests | p50 ms | p90 ms | mean ms |", "|---|---|---|---|---|"]
    for name in ("off", "on"):
        lines.append(f"| sampling {name} | {s[name]['n']} | {s[name]['p50_ms']} | {s[name]['p90_ms']} | "
                     f"{s[name]['mean_ms']} |")
    lines += ["", f"p50 on/off = **{s['p50_ratio']:.3f}** (goal <= 1.02), p90 on/off = {s['p90_ratio']:.3f}.", "",
              f"**Frame-result cache** on fixtures/videos/vtest.avi ({f['frames']} frames at {f['fps']:g} fps, JPEG q90): "
              f"computing every frame costs {f['every_frame_mean_ms']} ms per frame; consecutive frames' detections "
              f"differ in {f['consecutive_frames_differ']:.1%} of frames (F1 of a frame's detections against the previous "
              f"frame's: {f['previous_frame_f1']:.3f}: the detector flickers on this crowd); the cache's check costs "
              f"{f['cache_check_ms']} ms per frame.", "",
              "| max_diff (mean, grey levels) | max_block_diff | max_frames | max_age ms | reused | mean ms/frame | "
              "missed changes (of all frames) | missed (of reused) | F1 vs every frame |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in f["settings"]:
        block = "-" if r["max_block_diff"] is None else f"{r['max_block_diff']:g}"
        lines.append(f"| {r['max_diff']:g} | {block} | {r['max_frames']} | {r['max_age_ms']:g} | {r['reuse_rate']:.1%} | "
                     f"{r['mean_ms']} | {r['missed_change_rate']:.1%} | {r['missed_of_reused']:.1%} | {r['mean_f1']:.3f} |")
    lines += ["", "A missed change is a reused frame whose own detections differ from the reused ones (one-to-one, "
              "same class, IoU >= 0.5); F1 is the mean over all frames of the served detections against that frame's own "
              "(1.0: nothing lost). Run: `.venv/bin/python benchmarks/loop.py`.", END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """`text` is the section with its markers (section() adds them)."""
    replace_section(ROOT / "BENCHMARKS.md", BEGIN, END, text.replace(BEGIN, "").replace(END, ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="passes over the fixture photos (sampling on/off)")
    parser.add_argument("--frames", type=int, default=400, help="video frames for the frame cache")
    parser.add_argument("--threads", type=int, default=2, help="detector intra-op threads")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    spec = load_spec(SPEC)
    photos = [p.read_bytes() for p in sorted((FIXTURES / "images").iterdir()) if p.suffix in (".jpg", ".png")]
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        tmp = Path(tmp)
        target = target_for(spec, intra_op_threads=args.threads)
        off = render_repository(spec, tmp / "off", target)
        on = render_repository(spec, tmp / "on", target)
        add_sampling(on, spec.name, SamplingSettings(enabled=True, spool_dir=str(tmp / "spool"), rate_per_s=1e6,
                                                     burst=1_000_000, max_bytes=1 << 30))
        with TritonServer(off, log_path=tmp / "off.log") as s_off, TritonServer(on, log_path=tmp / "on.log") as s_on:
            sampling = sampling_overhead({"off": s_off, "on": s_on}, photos, args.rounds)
            sampled = len(list((tmp / "spool").glob("*.sample")))
            frame_cache = frame_cache_run(s_off, FIXTURES / "videos" / "vtest.avi", args.frames)
    sampling["samples_spooled"] = sampled
    info = device_info(gpu=False)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_class": getattr(info, "cpu_class", "?"),
              "cpus": __import__("os").cpu_count(), "threads": args.threads, "machine": platform.machine(),
              "sampling": sampling, "frame_cache": frame_cache}
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "bench_loop.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
