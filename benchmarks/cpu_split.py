"""Where the CPU goes per image: Triton's processes (server, each step's Python stubs) against a peer's.

    python benchmarks/cpu_split.py --out BENCHMARKS.md
    python benchmarks/cpu_split.py --triton 2x1t,1x2t,2x2t --peers peer-cores --concurrency 1,8 --seconds 8

Each system runs alone (the others stopped) at each concurrency, closed loop from this process; the CPU time
each of its processes spent during the measured seconds (psutil, user + system) is divided by the images
answered. "load generator" is this process (the Triton gRPC client or the peer's HTTP client). On 2 cores the
load generator shares the cores with the server, so its cost is part of what a closed loop measures.
Not a test: it prints numbers (--out writes its own Markdown section).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from benchmarks.peer_fastapi import CORES, Level, closed_loop, http_sender, make_peers, add_triton_protocol_option  # noqa: E402
from edgestack.client import sender_factory  # noqa: E402
from benchmarks.sections import replace_section  # noqa: E402
from builder.repository import target_for  # noqa: E402
from builder.spec import load_spec  # noqa: E402
from edgestack.server import TritonServer  # noqa: E402
from ensembles import render_pipeline  # noqa: E402

BEGIN, END = "<!-- cpu-split:begin -->", "<!-- cpu-split:end -->"
LOAD_GENERATOR = "load generator"


def parse_layout(text: str) -> tuple[int, int]:
    """'2x1t' -> (2 detector instances, 1 intra-op thread)."""
    try:
        instances, threads = text.lower().rstrip("t").split("x")
        return int(instances), int(threads)
    except ValueError:
        raise SystemExit(f"--triton: {text!r} is not INSTANCESxTHREADSt (e.g. 2x1t)") from None


def role(proc: psutil.Process) -> str:
    """A Triton stub by its model's name (its model.py path), else the process name."""
    try:
        model = next((arg for arg in proc.cmdline() if arg.endswith("/model.py")), None)
        return Path(model).parent.parent.name if model else proc.name()
    except psutil.Error:
        return "gone"


def cpu_by_role(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process tree, summed per role, plus this process as the load generator."""
    totals: dict[str, float] = defaultdict(float)
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            totals[role(proc)] += t.user + t.system
        except psutil.Error:
            continue
    me = psutil.Process().cpu_times()
    totals[LOAD_GENERATOR] += me.user + me.system
    return totals


def measure(make, pid: int, images: list[bytes], concurrency: int, seconds: float) -> tuple[Level, dict[str, float]]:
    before = cpu_by_role(pid)
    level = closed_loop(make, images, concurrency, seconds)
    after = cpu_by_role(pid)
    answered = max(level.requests, 1)
    return level, {k: (after[k] - before.get(k, 0.0)) * 1000 / answered for k in after}


def table(name: str, rows: dict[int, tuple[Level, dict[str, float]]]) -> list[str]:
    roles = sorted({r for _, split in rows.values() for r in split}, key=lambda r: (r == LOAD_GENERATOR, r))
    levels = sorted(rows)
    lines = [f"**{name}**", "", "| CPU ms per image | " + " | ".join(f"concurrency {c}" for c in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for r in roles:
        lines.append(f"| {r} | " + " | ".join(f"{rows[c][1].get(r, 0.0):.2f}" for c in levels) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(rows[c][1].values()):.2f}**" for c in levels) + " |")
    lines.append("| img/s (p99 ms) | " + " | ".join(f"{rows[c][0].images_per_s:.2f} ({rows[c][0].p99_ms:.0f})"
                                                     for c in levels) + " |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"))
    parser.add_argument("--triton", default="2x1t,1x2t,2x2t", help="detector layouts, INSTANCESxTHREADSt")
    parser.add_argument("--peers", default="peer-cores,peer-tuned", help="peer configurations (benchmarks/peer_fastapi.py)")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    add_triton_protocol_option(parser)
    parser.add_argument("--out", help="write the tables as this benchmark's section of this Markdown file")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    images = [p.read_bytes() for p in image_files(Path(args.images))]
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()[0]
    results: dict[str, dict[int, tuple[Level, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-split-") as tmp_name:
        tmp = Path(tmp_name)
        for layout in filter(None, args.triton.split(",")):
            instances, threads = parse_layout(layout)
            target = target_for(spec, detector_instances=instances, intra_op_threads=threads)
            name = f"triton {layout}"
            with TritonServer(render_pipeline(spec, tmp / layout, target), log_path=tmp / f"{layout}.log") as server:
                make = sender_factory(server, args.triton_protocol, spec.name)
                closed_loop(make, images, max(levels), args.warmup)
                results[name] = {c: measure(make, server.pid, images, c, args.seconds) for c in levels}
            print("\n".join(table(name, results[name])), flush=True)
        peer_names = [p for p in args.peers.split(",") if p]
        for name, peer in make_peers(peer_names, Path(args.spec).resolve(), CORES, tmp).items():
            peer.start()
            try:
                make = http_sender(peer.port)
                closed_loop(make, images, max(levels), args.warmup)
                results[name] = {c: measure(make, peer.process.pid, images, c, args.seconds) for c in levels}
            finally:
                peer.stop()
            print("\n".join(table(name, results[name])), flush=True)
    if args.out:
        head = [f"## Where the CPU goes per image ({datetime.date.today()}, {platform.machine()}, {CORES} cores, "
                f"{len(images)} images, {args.seconds:g} s per level, `python benchmarks/cpu_split.py`)", "",
                "Each system alone, closed loop from the benchmark's process; CPU seconds of each process (psutil) "
                "over the measured seconds, divided by the images answered. Triton stubs are named by their model. "
                f"1-min load average before: {load_before:.2f}.", ""]
        body = head + [line for name in results for line in table(name, results[name])]
        replace_section(Path(args.out), BEGIN, END, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
