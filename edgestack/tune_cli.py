"""`edgestack tune`: search the serving knobs on this device, measure each candidate, write the best repository.

For every candidate of the search space (builder/tune/space.py: detector instances x intra-op threads x dynamic
batching x preprocess/postprocess instances; on `intel` also OpenVINO streams per instance) the
repository is rendered into a temporary folder, a real tritonserver serves it on free loopback ports, a closed-loop
load runs at each concurrency asked (by default over keep-alive HTTP/1.1 connections, the client that takes
least CPU from the server's cores; --protocol grpc or http for tritonclient's), and the server is stopped by PID.
The objective picks the best (builder/tune/select.py), which is rendered into --out; the table of what was tried goes to --report.

    edgestack tune --images ../shared/fixtures/images --objective latency --concurrency 1
    edgestack tune --images DIR --objective throughput --p99-slo-ms 300 --concurrency 1,4,8
    edgestack tune --images DIR --detector-instances 1,2 --intra-op-threads 1,2 --queue-delay-us 0,2000
    edgestack tune --images DIR --targets cpu,intel      # ONNX Runtime and OpenVINO in one search
    edgestack tune --images DIR --target intel --detector-instances 1 --intra-op-threads 2 --detector-streams 1,2
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from edgestack.client import LOAD_PROTOCOLS
from edgestack.inputs import DEFAULT_SPEC, image_folder


FLAGS = {"detector_instances": "--detector-instances", "intra_op_threads": "--intra-op-threads",
         "max_batch_size": "--max-batch-size", "max_queue_delay_us": "--queue-delay-us",
         "preprocess_instances": "--preprocess-instances", "postprocess_instances": "--postprocess-instances",
         "detector_streams": "--detector-streams"}


def _candidates(args: argparse.Namespace, spec_target: str) -> list:
    """The candidates of every target asked (--targets: several runtimes in one search; else the spec's)."""
    from builder.tune.space import CPU_TARGETS
    from builder.errors import TargetError

    if not args.targets:
        return _space(args, spec_target).candidates()
    targets = tuple(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    unknown = [t for t in targets if t not in CPU_TARGETS]
    if unknown or not targets:
        raise TargetError(f"tune: --targets {args.targets!r}: each must be one of the CPU targets {CPU_TARGETS}")
    return [c for t in targets for c in _space(args, t, named=True).candidates()]


def _space(args: argparse.Namespace, target: str, named: bool = False):
    from builder.tune.space import SearchSpace, default_space, parse_levels

    space = default_space(target, args.cores, quick=args.quick)
    if named:
        space = dataclasses.replace(space, targets=(target,))
    given = {}
    for name, flag in FLAGS.items():
        if getattr(args, name):
            given[name] = parse_levels(getattr(args, name), flag, allow_auto=name == "preprocess_instances")
    if getattr(args, "spinning", None):
        given["intra_op_spinning"] = tuple(_on_off(v) for v in args.spinning.split(",") if v.strip())
    if given:  # explicit levels: no thread cap beyond what was asked
        space = SearchSpace(**{**{k: v for k, v in vars(space).items() if k != "max_threads"}, **given})
        if target == "intel":  # OpenVINO has no spinning threads
            space = dataclasses.replace(space, intra_op_spinning=(False,))
    return space


def _on_off(text: str) -> bool:
    from builder.errors import TargetError

    value = text.strip().lower()
    if value not in ("on", "off"):
        raise TargetError(f"tune: --spinning: {text!r} is not on or off")
    return value == "on"


@contextlib.contextmanager
def _energy_window() -> Iterator:
    """Joules over the window from the first readable power source; the callable answers None where none is."""
    from edgestack.energy import find_meter

    meter, _ = find_meter()
    if meter is None:
        yield lambda: None
        return
    meter.start()
    used: list = []

    def joules() -> float | None:
        if not used:
            used.append(meter.stop())
        return used[0].joules

    try:
        yield joules
    finally:
        if not used:
            meter.stop()


def cmd_tune(args: argparse.Namespace) -> int:
    from builder.repository import target_for
    from builder.spec import load_spec
    from builder.tune.measure import SearchSettings, run_search
    from builder.tune.report import table, write_report
    from builder.tune.select import choose
    from builder.tune.space import parse_levels
    from edgestack.client import sender_factory
    from edgestack.energy import find_meter, not_readable
    from edgestack.server import TritonServer
    from ensembles import render_pipeline

    spec = load_spec(args.spec)
    if args.target:
        spec = spec.replace(target=args.target)
    concurrencies = parse_levels(args.concurrency, "--concurrency")
    candidates = _candidates(args, spec.target)
    images = [p.read_bytes() for p in image_folder(args.images)]
    meter, reasons = find_meter()
    energy_note = f"measured by {meter.name}" if meter else not_readable(reasons)
    print(f"tune: {len(candidates)} candidate(s) for target {args.targets or spec.target} on {args.cores} core(s), "
          f"concurrency {','.join(map(str, concurrencies))}, {args.seconds:g} s per level; {energy_note}",
          file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="edgestack-tune-") as tmp_name:
        tmp = Path(tmp_name)

        @contextlib.contextmanager
        def serve(candidate):
            n = len(list(tmp.glob("repo-*")))
            own = candidate.spec_for(spec)
            repo = render_pipeline(own, tmp / f"repo-{n}", target_for(own, **candidate.overrides()))
            with TritonServer(repo, log_path=tmp / f"tritonserver-{n}.log") as server:
                yield sender_factory(server, args.protocol, spec.name)

        settings = SearchSettings(concurrencies=concurrencies, seconds=args.seconds, warmup_s=args.warmup,
                                  rounds=args.rounds,
                                  energy=_energy_window, log=lambda line: print(line, file=sys.stderr, flush=True))
        trials = run_search(candidates, serve, images, settings)

    chosen, reason = choose(trials, args.objective, args.p99_slo_ms)
    print(table(trials, concurrencies, chosen))
    print(f"\nchoice ({args.objective}): {reason}")
    context = {"spec": args.spec, "target": args.targets or spec.target, "cores": args.cores, "images": len(images),
               "seconds per level": args.seconds, "rounds": args.rounds, "load protocol": args.protocol, "p99 SLO ms": args.p99_slo_ms, "energy": energy_note.removeprefix("energy: "),
               "load average (1 min) at the end": f"{os.getloadavg()[0]:.2f}"}
    md, js = write_report(Path(args.report), trials, concurrencies, args.objective, chosen, reason, context)
    print(f"report: {md} and {js}")
    if chosen is None:
        return 1
    best = chosen.candidate.spec_for(spec)
    out = render_pipeline(best, Path(args.out), target_for(best, **chosen.candidate.overrides()))
    print(f"tuned repository written to {out}; the same with the builder: edgestack build {args.spec} "
          f"{chosen.candidate.build_flags()} (queue delay, pre/postprocess instances: the spec's runtime section)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from builder.targets import TARGETS
    from builder.tune.select import OBJECTIVES

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = subparsers.add_parser(
        "tune", help="search instances x threads x batching on this device, measure each, write the best repository",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images sent in turn")
    parser.add_argument("--target", choices=TARGETS, help="target to tune (default: the spec's)")
    parser.add_argument("--targets", metavar="cpu,intel",
                        help="several CPU targets in one search, which compares their runtimes too (cpu: ONNX "
                             "Runtime, intel: OpenVINO; the same FP32 model); overrides --target")
    parser.add_argument("--objective", choices=OBJECTIVES, default="balanced",
                        help="latency (p99 at concurrency 1), throughput (at the highest concurrency, under "
                             "--p99-slo-ms) or balanced (closest to the best at every concurrency; default)")
    parser.add_argument("--p99-slo-ms", type=float, help="p99 SLO for throughput/balanced")
    parser.add_argument("--concurrency", default="1,4,8", help="comma list of closed-loop levels (default 1,4,8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level (default 5)")
    parser.add_argument("--protocol", choices=LOAD_PROTOCOLS, default=LOAD_PROTOCOLS[0],
                        help="how the load generator sends: http-keepalive (default; 0.6-1.0 ms of CPU per request "
                             "here), or tritonclient's grpc (1.3-1.9 ms) or http")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per candidate (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over the candidates, order alternating; per level the median pass is kept "
                             "(2 or more on a shared, noisy machine)")
    parser.add_argument("--cores", type=int, default=cores, help=f"cores the default grid is sized for ({cores})")
    parser.add_argument("--quick", action="store_true", help="the default grid's corners only")
    what = {"detector_instances": "detector instances (intel: OpenVINO streams)",
            "intra_op_threads": "threads per detector instance", "max_batch_size": "dynamic batching max batch size",
            "max_queue_delay_us": "dynamic batching max queue delay",
            "preprocess_instances": "preprocess instances ('auto': detector instances + 1)",
            "postprocess_instances": "postprocess instances",
            "detector_streams": "OpenVINO streams per detector instance (intel)"}
    for dest, flag in FLAGS.items():
        parser.add_argument(flag, dest=dest, metavar="N,N", help=f"comma list of {what[dest]}")
    parser.add_argument("--spinning", metavar="off,on", help="ONNX Runtime spinning threads to try (default: off,on on "
                                                             "the cpu target for candidates of 2+ threads)")
    parser.add_argument("--out", default="model_repository", help="where the best repository is written")
    parser.add_argument("--report", default="build/tune", help="folder for tune_report.md/json")
    parser.set_defaults(func=cmd_tune)
    return parser
