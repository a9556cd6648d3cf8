"""`edgestack samples ...` and `edgestack loop ...`: the edge-cloud learning loop's commands (loop/, docs/LOOP.md).

    loop build SPEC --out DIR       render the spec's pipeline with the sampler step (the spec's `sampling` section)
    loop demo                       uncertain samples from a served pipeline arriving at a collector
    loop promote                    a retrained version better by --margin -> canary rollout (or --propose)
    samples upload                  device: the spool to the cloud over NATS JetStream, until stopped (or --once)
    samples collect                 cloud: the samples stream into the object store, until stopped
    samples stats / export          counts per class, device and model version; a COCO labelling task
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
from pathlib import Path

from edgestack.inputs import DEFAULT_SPEC


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _nats(args: argparse.Namespace) -> str:
    from fleet.rollout_cli import default_nats

    return args.nats or default_nats()


def cmd_loop_build(args: argparse.Namespace) -> int:
    from builder.spec import spec_name
    from edgestack.cli import build_from_args
    from loop.pipeline_step import add_sampling, describe, load_sampling

    settings = load_sampling(args.spec)
    out = build_from_args(args)
    if not settings.enabled:
        print(f"model repository written to {out} (the spec's sampling is off: no sampler step)")
        return 0
    sampler = add_sampling(out, spec_name(args.spec), settings)
    print(f"model repository written to {out} with the sampler step {sampler.name}: {json.dumps(describe(settings))}")
    return 0


def cmd_loop_demo(args: argparse.Namespace) -> int:
    from loop.demo import run_demo

    return run_demo(Path(args.spec), Path(args.images), Path(args.out))


def cmd_loop_promote(args: argparse.Namespace) -> int:
    from fleet.registry import Registry
    from fleet.strategy import load_strategy
    from loop.promote import promote

    strategy = load_strategy(args.strategy)
    registry = Registry(args.registry)

    async def main() -> dict:
        bus = None
        if not args.propose:
            from fleet.transport import NatsFleetBus

            bus = await NatsFleetBus.connect(_nats(args), name="edgestack-loop-promote")
        try:
            return await promote(registry, bus, args.model, args.candidate, args.deployed, strategy,
                                 metric=args.metric, margin=args.margin, propose_only=args.propose,
                                 rollout_id=args.id)
        finally:
            if bus is not None:
                await bus.close()

    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    return 0


def cmd_samples_upload(args: argparse.Namespace) -> int:
    from loop.spool import Spool
    from loop.uploader import Uploader

    uploader = Uploader(Spool(args.spool, 1 << 62), _nats(args), poll_s=args.poll)
    if args.once:
        async def once() -> int:
            await uploader.connect()
            try:
                return await uploader.drain()
            finally:
                await uploader.close()

        print(json.dumps({"uploaded": asyncio.run(once()), "left": len(uploader.spool)}))
        return 0
    stop = _stop_event()
    asyncio.run(uploader.run(stop.is_set))
    print(json.dumps(uploader.counts))
    return 0


def cmd_samples_collect(args: argparse.Namespace) -> int:
    from loop.collector import Collector

    collector = Collector(args.store)
    stop = _stop_event()
    print(f"collecting samples from {_nats(args)} into {args.store}; Ctrl-C to stop", flush=True)
    asyncio.run(collector.run(_nats(args), stop.is_set,
                              on_stored=lambda subject: print(f"stored a sample from {subject}", flush=True)))
    print(json.dumps(collector.stats()))
    collector.close()
    return 0


def cmd_samples_stats(args: argparse.Namespace) -> int:
    from loop.collector import Collector

    collector = Collector(args.store)
    stats = collector.stats()
    stats.pop("this_run", None)
    print(json.dumps(stats, indent=2))
    collector.close()
    return 0


def cmd_samples_export(args: argparse.Namespace) -> int:
    from loop.collector import Collector

    classes: tuple[str, ...] = ()
    if args.classes:
        classes = tuple(line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip())
    collector = Collector(args.store)
    path = collector.export_coco(args.out, classes)
    count = collector.stats()["images"]
    collector.close()
    print(f"COCO labelling task with {count} images written to {path}")
    return 0


def _nats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", help="NATS URL(s), comma-separated (default: $EDGESTACK_NATS, else the fleet's)")


def add_parser(subparsers) -> None:
    from edgestack.cli import _add_build_options

    loop = subparsers.add_parser("loop", help="the edge-cloud learning loop: sampling build, demo, promotion",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = loop.add_subparsers(dest="loop_command", required=True)
    build = sub.add_parser("build", help="render the spec's pipeline with the sampler step (spec: sampling)")
    build.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    build.add_argument("--out", default="model_repository")
    _add_build_options(build)
    build.set_defaults(func=cmd_loop_build)
    demo = sub.add_parser("demo", help="serve with sampling on, send photos, watch samples arrive at a collector")
    demo.add_argument("--spec", default=str(DEFAULT_SPEC))
    demo.add_argument("--images", default=str(Path(DEFAULT_SPEC).parent.parent.parent / "shared/fixtures/images"))
    demo.add_argument("--out", default="out/loop-demo")
    demo.set_defaults(func=cmd_loop_demo)
    prom = sub.add_parser("promote", help="start (or --propose) a canary rollout of a retrained version that beats "
                                          "the deployed one by --margin")
    prom.add_argument("--model", required=True)
    prom.add_argument("--candidate", required=True, help="the retrained version (semver or alias)")
    prom.add_argument("--deployed", default="production", help="the deployed version (default: alias production)")
    prom.add_argument("--metric", default="fidelity_map")
    prom.add_argument("--margin", type=float, default=0.01, help="absolute gain needed on every shared device class")
    prom.add_argument("--strategy", required=True, help="rollout strategy YAML (specs/rollout.yaml)")
    prom.add_argument("--registry", help="registry URI (default: EDGESTACK_REGISTRY or the fleet's)")
    prom.add_argument("--propose", action="store_true", help="only print the proposed rollout; start nothing")
    prom.add_argument("--id", help="rollout id (default: MODEL-VERSION)")
    _nats_option(prom)
    prom.set_defaults(func=cmd_loop_promote)

    samples = subparsers.add_parser("samples", help="uncertain samples: upload (device), collect, stats, export")
    sub = samples.add_subparsers(dest="samples_command", required=True)
    up = sub.add_parser("upload", help="device: publish the spool to the cloud whenever reachable, until stopped")
    up.add_argument("--spool", required=True)
    up.add_argument("--poll", type=float, default=1.0, help="seconds between passes")
    up.add_argument("--once", action="store_true", help="one pass, then exit")
    _nats_option(up)
    up.set_defaults(func=cmd_samples_upload)
    col = sub.add_parser("collect", help="cloud: store the samples stream in --store until stopped")
    col.add_argument("--store", required=True)
    _nats_option(col)
    col.set_defaults(func=cmd_samples_collect)
    st = sub.add_parser("stats", help="images in the store per class, device and model version (JSON)")
    st.add_argument("--store", required=True)
    st.set_defaults(func=cmd_samples_stats)
    ex = sub.add_parser("export", help="a COCO-format labelling task of the stored samples")
    ex.add_argument("--store", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--classes", help="class names file (category ids 1..N); default: the classes predicted")
    ex.set_defaults(func=cmd_samples_export)
