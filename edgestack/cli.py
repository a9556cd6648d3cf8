"""edgestack: build a Triton model repository from a pipeline spec, serve it, and run detections."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from builder.pipeline_choice import PIPELINE_KINDS
from builder.targets import TARGETS
from edgestack.errors import ClientError, EdgestackError
from edgestack.inputs import DEFAULT_SPEC

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=TARGETS,
                        help="accelerator target (default: the spec's; intel for an OpenVINO --variant)")
    parser.add_argument("--variant", metavar="DIR", help="serve this built model variant (a folder with variant.json) "
                                                        "instead of the spec's model (a cascade's precise stage, a "
                                                        "parallel ensemble's first model)")
    parser.add_argument("--second-variant", metavar="DIR", help="a cascade's fast stage or a parallel ensemble's second "
                                                               "model: this variant of it (built at its input size)")
    parser.add_argument("--cloud-url", help="host:port of a cloud Triton (gRPC) for low-confidence images")
    parser.add_argument("--max-batch-size", type=int, help="override the target's max batch size")
    parser.add_argument("--detector-instances", type=int, help="override the detector's instance count")
    parser.add_argument("--intra-op-threads", type=int, help="inference threads per detector instance (CPU: ONNX Runtime intra-op, intel: OpenVINO)")
    parser.add_argument("--detector-streams", type=int,
                        help="intel target: OpenVINO streams per detector instance; a batch of several images runs "
                             "that many at once, a single image still gets every thread (default 1)")
    parser.add_argument("--intra-op-spinning", action="store_true", default=None,
                        help="let ONNX Runtime's threads busy-wait between operators (faster with the cores to "
                             "itself, slower when they are shared; off by default)")
    parser.add_argument("--pipeline", choices=PIPELINE_KINDS, help="pipeline of models (default: the spec's pipeline.kind; "
                                                                 "cascade and parallel need the spec's pipeline.second)")


def build_from_args(args: argparse.Namespace) -> Path:
    from builder.pipeline_choice import PipelineChoice
    from builder.repository import target_for
    from builder.spec import load_spec
    from ensembles import render_pipeline

    spec = load_spec(args.spec)
    from builder.optimize.variants import load_variant

    variant, second_variant = (load_variant(Path(getattr(args, name)))[0] if getattr(args, name, None) else None
                               for name in ("variant", "second_variant"))
    if args.target:
        spec = spec.replace(target=args.target)
    elif any(v is not None and v.runtime == "openvino" for v in (variant, second_variant)):
        spec = spec.replace(target="intel")
    if args.cloud_url:
        spec = spec.replace(router=dataclasses.replace(spec.router, cloud_url=args.cloud_url))
    if getattr(args, "pipeline", None):
        spec = spec.replace(pipeline=PipelineChoice(**{**vars(spec.pipeline), "kind": args.pipeline}))
    target = target_for(spec, max_batch_size=args.max_batch_size, detector_instances=args.detector_instances,
                        intra_op_threads=args.intra_op_threads,
                        detector_streams=getattr(args, "detector_streams", None),
                        intra_op_spinning=getattr(args, "intra_op_spinning", None))
    return render_pipeline(spec, Path(args.out), target, variant=variant, second_variant=second_variant)


def cmd_build(args: argparse.Namespace) -> int:
    out = build_from_args(args)
    print(f"model repository written to {out}")
    for child in sorted(p for p in out.iterdir() if p.is_dir()):
        print(f"  {child.name}/config.pbtxt")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgestack.server import TritonServer

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the start, so an early signal still stops the server
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(Path(args.repository), http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=Path(args.log) if args.log else None,
                          address=args.address,
                          explicit_models=["*"] if args.model_control == "explicit" else None)
    server.start(should_stop=stop.is_set)
    try:
        if not stop.is_set():
            print(f"tritonserver ready (pid {server.pid}): grpc {server.grpc_url}  http {server.http_url}  "
                  f"metrics 127.0.0.1:{server.metrics_port}; Ctrl-C to stop", flush=True)
            stop.wait()
        print("stopping tritonserver", flush=True)
    finally:
        server.stop()
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from builder.spec import spec_name
    from edgestack.annotate import write_annotated
    from edgestack.client import DetectionClient

    url = args.url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"
    failures = 0
    model = args.model or spec_name(args.spec)
    with DetectionClient(url, args.protocol, model, timeout_s=args.timeout) as client:
        for name in args.images:
            path = Path(name)
            data = path.read_bytes()
            try:
                result = client.detect(data)
            except ClientError as exc:
                failures += 1
                print(json.dumps({"image": str(path), "error": str(exc)}))
                continue
            print(json.dumps({"image": str(path), **result.to_dict()}))
            if args.annotate:
                write_annotated(data, result, Path(args.annotate) / f"{path.stem}.jpg")
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgestack.demo import run_demo

    return run_demo(Path(args.spec), Path(args.images), Path(args.out), args.protocol, [Path(p) for p in args.pipelines])


def cmd_device_info(args: argparse.Namespace) -> int:
    from builder.device_class import main as device_info

    return device_info()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgestack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", aliases=["render"], help="pipeline spec + target -> Triton model repository",
                           description="Render every config.pbtxt and copy the model and backend code into a self-contained repository.")
    build.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC), help=f"pipeline spec YAML (default: specs/{DEFAULT_SPEC.name})")
    build.add_argument("--out", default="model_repository", help="output repository folder (default: model_repository)")
    _add_build_options(build)
    build.set_defaults(func=cmd_build)

    serve = sub.add_parser("serve", help="run tritonserver on a repository until SIGINT/SIGTERM",
                           description="Start tritonserver on loopback, wait until it is ready, stop it cleanly on SIGINT/SIGTERM.")
    serve.add_argument("repository", nargs="?", default="model_repository")
    serve.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    serve.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    serve.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    serve.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    serve.add_argument("--log", help="append the server's log to this file (default: discard)")
    serve.add_argument("--model-control", choices=["none", "explicit"], default="none",
                       help="explicit: load every model at start and accept the repository load/unload API "
                            "(what the sidecar needs to own the served versions)")
    serve.set_defaults(func=cmd_serve)

    detect = sub.add_parser("detect", help="detect objects in images through a running server; prints JSON lines",
                            description="Send each image to the ensemble and print one JSON line per image.")
    detect.add_argument("images", nargs="+", help="JPEG/PNG files")
    detect.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    detect.add_argument("--url", help="host:port (default: 127.0.0.1:8001 for grpc, :8000 for http)")
    detect.add_argument("--model", help="ensemble name (default: the name of --spec)")
    detect.add_argument("--spec", default=str(DEFAULT_SPEC),
                        help=f"pipeline spec whose name is the default --model (default: specs/{DEFAULT_SPEC.name})")
    detect.add_argument("--annotate", metavar="DIR", help="also write pictures with boxes, names and scores to DIR")
    detect.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    detect.set_defaults(func=cmd_detect)

    demo = sub.add_parser("demo", help="build, serve, detect the fixture photos, write results, stop",
                          description="The whole path on this machine: render the repository, start tritonserver, "
                                      "run every image through the ensemble, write JSON and annotated pictures, stop.")
    demo.add_argument("--spec", default=str(DEFAULT_SPEC))
    demo.add_argument("--images", required=True, metavar="DIR", help="folder of photos to detect")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    demo.add_argument("--pipelines", nargs="*", default=[], metavar="SPEC",
                      help="more pipeline specs (e.g. specs/centernet_cascade.yaml) served beside --spec's; "
                           "each photo goes through each")
    demo.set_defaults(func=cmd_demo)

    device = sub.add_parser("device-info", help="this device's class: CPU features, accelerator, Triton version",
                            description="Print this device's descriptor as JSON: architecture, CPU ISA features, "
                                        "CPU class (what INT8 artifacts and bundles are matched against), "
                                        "accelerator and compute capability, Triton version.")
    device.set_defaults(func=cmd_device_info)

    from edgestack import compress_cli, latency_budget, load, optimize_cli, plan_cli, tune_cli
    from fleet import cli as fleet_cli
    from sidecar import cli as sidecar_cli
    from sidecar import daemon_cli

    optimize_cli.add_parser(sub)
    tune_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    compress_cli.add_parser(sub)
    latency_budget.add_parser(sub)
    load.add_parser(sub)
    sidecar_cli.add_parser(sub)
    daemon_cli.add_parser(sub)
    fleet_cli.add_parsers(sub)
    from edgestack import loop_cli

    loop_cli.add_parser(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, e.g. `bundle create`: the values of the subparsers' *command destinations."""
    words = [value for key, value in vars(args).items() if key == "command" or key.endswith("_command")]
    return " ".join(dict.fromkeys(words))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; every error the project raises on purpose (EdgestackError, see backends.errors) and a file
    the command cannot read or write (OSError) is reported here, once, as one line with exit code 2."""
    return run_parsed(make_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command, mapping the project's errors (and OSError) to one line and exit code 2; every entry
    point that parses its own command line (fleet.rollout_cli) runs through here."""
    try:
        return args.func(args)
    except (EdgestackError, OSError) as exc:
        print(f"edgestack {command_name(args)}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
