"""Tuned Triton against every peer configuration, at concurrency 1, 4 and 8, in one run.

    python benchmarks/tune_vs_peers.py --out BENCHMARKS.md                 # runs `edgestack tune` first
    python benchmarks/tune_vs_peers.py --tune-report build/tune/tune_report.json --out BENCHMARKS.md

  triton-tuned      the `detect` ensemble rendered with the candidate `edgestack tune` chose on this machine
                    (its report's "chosen"; without --tune-report the tune runs first, objective balanced)
  triton-default    the same ensemble with the builder's defaults: the baseline the ratios are read against
  peer-tuned, peer-tuned-stock, peer-default, peer-cores
                    FastAPI + uvicorn + ONNX Runtime (benchmarks/peer_fastapi.py: the same servers, senders and
                    closed loop)
  peer-openvino, peer-openvino-cores
                    the same peer with OpenVINO running the same FP32 model (one worker per core, one thread each;
                    one worker on every core): the like-for-like peers when the tune picks the `intel` target

All servers run for the whole measurement; each level measures every system in turn (interleaved; the tuned one in
the middle of the pass, the order reversed every other pass), so drift hits all alike. With --rounds N each level's
medians over the passes count (throughput, p50 and p99, each its own median), and the passes are also compared pair
by pair: in how many the tuned system answered more images/s than the best peer (one-sided sign test) and in how
many its p99 was lower (this machine's own speed moves by up to a third for spells of seconds:
benchmarks/machine_modes.py; a pair of slots in one pass sees the same spell far more often than two medians do).
Load: Triton over keep-alive HTTP/1.1 by default, as the peers (--triton-protocol).
Goal (issue #14): triton-tuned >= 1.0x the best peer's throughput at every concurrency, with p99
<= that peer's p99. The 1-minute load average before and after is printed: on a shared machine the absolute
numbers move, the ratios within the run are what to read. Not a test: it prints numbers (--out appends Markdown).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from benchmarks.peer_fastapi import (CORES, Level, closed_loop, http_sender, add_triton_protocol_option,  # noqa: E402
                                     make_peers, outputs_agree)
from benchmarks.sections import replace_section  # noqa: E402
from edgestack.client import sender_factory  # noqa: E402
from builder.repository import target_for  # noqa: E402
from builder.spec import load_spec  # noqa: E402
from builder.tune.space import Candidate  # noqa: E402
from edgestack.server import TritonServer  # noqa: E402
from ensembles import render_pipeline  # noqa: E402

PEERS = ("peer-tuned", "peer-tuned-stock", "peer-default", "peer-cores", "peer-openvino", "peer-openvino-cores")
SYSTEMS = ("triton-tuned", "triton-default", *PEERS)
# The order of one pass (reversed every other pass): the tuned system in the middle, so that every peer is measured
# within a few slots of it and the paired comparison of a pass sees the machine in much the same spell.
PASS_ORDER = ("triton-default", "peer-tuned-stock", "peer-default", "peer-tuned", "triton-tuned", "peer-openvino-cores",
              "peer-cores", "peer-openvino")


def tuned_candidate(args: argparse.Namespace, tmp: Path) -> tuple[Candidate, str]:
    """The chosen candidate from a tune report, running `edgestack tune` first when none is given."""
    report = Path(args.tune_report) if args.tune_report else tmp / "tune" / "tune_report.json"
    if not args.tune_report:
        from edgestack import cli

        tune_args = ["tune", args.spec, "--images", args.images, "--out", str(tmp / "tuned"),
                     "--report", str(report.parent), *shlex.split(args.tune_args)]
        print(f"running: edgestack {' '.join(map(shlex.quote, tune_args))}", flush=True)
        if cli.main(tune_args) != 0:
            raise SystemExit("edgestack tune found no candidate; see its report")
    data = json.loads(report.read_text())
    if not data.get("chosen"):
        raise SystemExit(f"{report} has no chosen candidate: {data.get('reason')}")
    return Candidate(**data["chosen"]["candidate"]), f"{report} ({data['objective']}: {data['reason']})"


def median_level(passes: list[Level]) -> Level:
    """One level of one system over its passes: the median throughput, the median p50 and the median p99 of the
    passes, each its own median (the p99 of whichever pass had the median throughput is nearly one request's time,
    picked by another statistic); requests, errors and seconds summed."""
    return Level(passes[0].concurrency, sum(lv.requests for lv in passes), sum(lv.errors for lv in passes),
                 sum(lv.seconds for lv in passes), statistics.median(lv.images_per_s for lv in passes),
                 statistics.median(lv.p50_ms for lv in passes), statistics.median(lv.p99_ms for lv in passes))


def spread(passes: list[Level]) -> tuple[float, float]:
    return min(lv.images_per_s for lv in passes), max(lv.images_per_s for lv in passes)


def paired(tuned_passes: list[Level], peer_passes: list[Level]) -> tuple[int, int, float, int]:
    """Round by round (the two measured in the same interleaved pass, so the machine's slow and fast spells hit both):
    in how many passes the tuned system answered more images/s, of how many, the one-sided sign test's p-value for
    "ahead in at least that many" if neither were faster (ties count as not ahead), and in how many its p99 was lower."""
    from scipy.stats import binomtest

    pairs = list(zip(tuned_passes, peer_passes))
    ahead = sum(t.images_per_s > p.images_per_s for t, p in pairs)
    lower_p99 = sum(t.p99_ms < p.p99_ms for t, p in pairs)
    p_value = float(binomtest(ahead, len(pairs), 0.5, alternative="greater").pvalue) if pairs else float("nan")
    return ahead, len(pairs), p_value, lower_p99


def verdict(tuned: Level, peer: Level, tuned_range: tuple[float, float], peer_range: tuple[float, float],
            passes: int) -> str:
    """meets / MISSES on the medians over the passes; with several passes, 'within spread' when the two throughput ranges
    overlap: the run does not resolve it."""
    if tuned.images_per_s >= peer.images_per_s and tuned.p99_ms <= peer.p99_ms:
        return "meets"
    overlap = tuned_range[1] >= peer_range[0] and peer_range[1] >= tuned_range[0]
    return "MISSES (within spread)" if passes > 1 and overlap else "MISSES"


def verdicts(passes: dict[str, dict[int, list[Level]]], results: dict[str, dict[int, Level]],
             levels: list[int]) -> list[str]:
    lines = []
    for c in levels:
        tuned = results["triton-tuned"][c]
        best = max(PEERS, key=lambda n: results[n][c].images_per_s)
        peer = results[best][c]
        ratio = tuned.images_per_s / peer.images_per_s if peer.images_per_s else float("nan")
        base = results["triton-default"][c].images_per_s
        (t_low, t_high), (p_low, p_high) = spread(passes["triton-tuned"][c]), spread(passes[best][c])
        ahead, n, p_value, lower_p99 = paired(passes["triton-tuned"][c], passes[best][c])
        lines.append(f"| {c} | {best} | {peer.images_per_s:.2f} ({p_low:.1f}-{p_high:.1f}) | {peer.p99_ms:.1f} | "
                     f"{tuned.images_per_s:.2f} ({t_low:.1f}-{t_high:.1f}) | {tuned.p99_ms:.1f} | {ratio:.3f}x | "
                     f"{tuned.p99_ms / peer.p99_ms:.3f}x | {ahead}/{n} (p {p_value:.3f}); p99 {lower_p99}/{n} | {tuned.images_per_s / base:.3f}x | "
                     f"{verdict(tuned, peer, (t_low, t_high), (p_low, p_high), len(passes[best][c]))} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"))
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each level per system and pass")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes per level, the systems interleaved in each (order reversed every other pass); "
                             "per level the medians over the passes count (throughput, p50, p99 each) and the range is shown (3 or more on a noisy machine)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per system first")
    parser.add_argument("--workers", type=int, default=CORES, help=f"peer-tuned uvicorn workers (default {CORES})")
    parser.add_argument("--tune-report", help="tune_report.json of an earlier `edgestack tune` on this machine")
    parser.add_argument("--tune-args", default="--targets cpu,intel --concurrency 1,4,8 --seconds 4 --rounds 2 --objective balanced",
                        help="options for the tune run when no --tune-report is given")
    add_triton_protocol_option(parser)
    parser.add_argument("--out", help="append the results as a Markdown section to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    spec = load_spec(args.spec)
    images = [p.read_bytes() for p in image_files(Path(args.images))]
    levels = [int(c) for c in args.concurrency.split(",")]
    passes: dict[str, dict[int, list[Level]]] = {n: {c: [] for c in levels} for n in SYSTEMS}

    with tempfile.TemporaryDirectory(prefix="tune-vs-peers-") as tmp_name:
        tmp = Path(tmp_name)
        candidate, source = tuned_candidate(args, tmp)
        load_before = os.getloadavg()[0]
        tuned_spec = candidate.spec_for(spec)
        targets = {"triton-tuned": target_for(tuned_spec, **candidate.overrides()), "triton-default": target_for(spec)}
        specs = {"triton-tuned": tuned_spec, "triton-default": spec}
        tritons = {n: TritonServer(render_pipeline(specs[n], tmp / n, t), log_path=tmp / f"{n}.log")
                   for n, t in targets.items()}
        peers = make_peers(["triton", *PEERS], Path(args.spec).resolve(), args.workers, tmp)
        started: list = []
        try:
            for server in [*tritons.values(), *peers.values()]:
                server.start()
                started.append(server)
            senders = {**{n: sender_factory(s, args.triton_protocol, spec.name) for n, s in tritons.items()},
                       **{n: http_sender(p.port) for n, p in peers.items()}}
            check_triton, check_peer = senders["triton-tuned"](), senders["peer-tuned"]()
            agree = sum(outputs_agree(check_triton(img), check_peer(img)) for img in images)
            check_triton.close(), check_peer.close()
            print(f"tuned: {candidate.label} from {source}\noutputs agree on {agree}/{len(images)} images", flush=True)
            for make in senders.values():
                closed_loop(make, images, max(levels), args.warmup)
            for c in levels:
                for r in range(args.rounds):
                    for name in (PASS_ORDER if r % 2 == 0 else PASS_ORDER[::-1]):
                        make = senders[name]
                        level = closed_loop(make, images, c, args.seconds)
                        passes[name][c].append(level)
                        print(f"concurrency {c:>2} pass {r + 1} {name:<20} {level.images_per_s:7.2f} img/s  p50 "
                              f"{level.p50_ms:8.1f} ms  p99 {level.p99_ms:8.1f} ms  ({level.requests} requests, "
                              f"{level.errors} errors)", flush=True)
        finally:
            for server in reversed(started):
                server.stop()
        load_after = os.getloadavg()[0]
    results = {n: {c: median_level(passes[n][c]) for c in levels} for n in SYSTEMS}

    tuned_target = targets["triton-tuned"]
    lines = [
        f"### Tuned Triton vs every peer configuration ({datetime.date.today()}, {platform.machine()}, {CORES} cores, "
        f"{len(images)} images, {args.seconds:g} s per level" + (f" x {args.rounds} interleaved passes (medians over the passes; "
                                                                   f"range of the passes in brackets)" if args.rounds > 1 else "")
        + ", `python benchmarks/tune_vs_peers.py`)",
        "",
        f"- triton-tuned: `edgestack tune`'s choice, {candidate.label} "
        f"(target {tuned_target.name}: {json.dumps(dataclasses.asdict(tuned_target))}); chosen by {source}.",
        f"- triton-default: the builder's defaults for the spec's target ({spec.target}). Peers as in benchmarks/peer_fastapi.py: "
        + "; ".join(f"{n}: `{p.describe()}`" for n, p in peers.items()) + ".",
        f"- Outputs agree on {agree}/{len(images)} images. Closed loop, load generator in the same process, on the "
        f"same cores; to Triton over {args.triton_protocol}, to the peers over HTTP/1.1 keep-alive. 1-min load average before the measurement {load_before:.2f}, after {load_after:.2f}"
        + (" (not idle when it started: a load average over half the cores; on a machine shared with other work the "
           "ratios of the same run are what to compare)" if load_before > CORES / 2 else "")
        + ".",
        "",
        "| concurrency | " + " | ".join(f"{n} img/s | {n} p99 ms" for n in SYSTEMS) + " |",
        "|---|" + "---|---|" * len(SYSTEMS),
    ]
    for c in levels:
        lines.append(f"| {c} | " + " | ".join(f"{results[n][c].images_per_s:.2f} | {results[n][c].p99_ms:.1f}"
                                              for n in SYSTEMS) + " |")
    lines += [
        "",
        "| concurrency | best peer | its img/s | its p99 ms | tuned img/s | tuned p99 ms | throughput vs peer "
        "| p99 vs peer | passes: tuned more img/s (sign test); lower p99 | tuned vs default | goal (>= 1.0x, p99 <=) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *verdicts(passes, results, levels),
        "",
        f"Errors: { {n: sum(lv.errors for runs in r.values() for lv in runs) for n, r in passes.items()} }.",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/tune_vs_peers.py', *map(shlex.quote, sys.argv[1:])])}`",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:  # its own section, replaced in place (inside the tune section of BENCHMARKS.md, with the tune table)
        replace_section(Path(args.out), "<!-- tune-vs-peers-run:begin -->", "<!-- tune-vs-peers-run:end -->", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
