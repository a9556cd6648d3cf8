"""The peer a user would otherwise deploy: the same detector in ONNX Runtime behind a minimal FastAPI service.

POST /detect with the encoded image as the body (any content type); the answer is JSON like
`edgestack detect`'s: {"source": "peer", "degraded": false, "detections": [{class_id, class_name, score, box}]}.
The same plain functions as the Triton backends do the work: backends.preprocess.image_ops (decode, resize,
layout), ONNX Runtime on the spec's original ONNX file, backends.postprocess.pipeline (decode, NMS, mapping).
The blocking work runs in Starlette's thread pool, so the event loop keeps accepting requests.

Configuration (environment, read when a worker starts, so it reaches every `--workers` process):
  PEER_SPEC         pipeline spec YAML (default: specs/centernet_coco.yaml)
  PEER_ORT_THREADS  detector threads per worker; unset or "default": the runtime's own default (ONNX Runtime:
                    one thread per physical core, spinning; OpenVINO: its latency hint's choice)
  PEER_ENGINE       onnxruntime (default) or openvino: the same FP32 ONNX file, run by OpenVINO on the CPU
                    (backends.detector.openvino_runner, as the `intel` target's detector)

    PEER_ORT_THREADS=1 uvicorn benchmarks.fastapi_peer_app:app --workers 2 --port 8080

Known uvicorn problem (0.54, Linux; Kludex/uvicorn#3149): with `--workers N > 1` the supervisor binds the
listening socket with proto 0, so asyncio never sets TCP_NODELAY on accepted connections and every
keep-alive request after the first waits ~40 ms on the client's delayed ACK (a GET /health takes 44 ms
instead of 0.4 ms here). `python -m benchmarks.fastapi_peer_app --workers N` runs the same app under
uvicorn's own multiprocess supervisor with the listener created as IPPROTO_TCP, which avoids it:

    PEER_ORT_THREADS=1 python -m benchmarks.fastapi_peer_app --workers 2 --port 8080 --no-access-log
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from backends.errors import InvalidImageError  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402
from backends.preprocess.image_ops import decode_image, prepare_input  # noqa: E402
from builder.spec import PipelineSpec, load_spec  # noqa: E402

DEFAULT_SPEC = ROOT / "specs" / "centernet_coco.yaml"


def make_ort_session(model_path: str, threads: int | None):
    """threads=None: ONNX Runtime's default session options (threads = cores, spinning); else explicit intra-op
    threads, not spinning (as the backend)."""
    import onnxruntime as ort

    if threads is None:
        return ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    from backends.detector.onnx_runner import make_session

    return make_session(model_path, intra_op_threads=threads)


ENGINES = ("onnxruntime", "openvino")


def make_runner(spec: PipelineSpec, threads: int | None, engine: str):
    """batch -> the detector's output, by ONNX Runtime or OpenVINO on the spec's ONNX file."""
    if engine == "onnxruntime":
        session = make_ort_session(str(spec.model_path), threads)
        return lambda batch: session.run([spec.output.name], {spec.input_name: batch})[0]
    if engine == "openvino":
        import threading

        from backends.detector.openvino_runner import OpenVinoDetector

        detector, one_at_a_time = OpenVinoDetector(str(spec.model_path), spec.input_name, spec.output.name,
                                                   threads or 0), threading.Lock()

        def run(batch):  # one infer request per detector: Starlette's pool threads take turns on it
            with one_at_a_time:
                return detector.run(batch)

        return run
    raise ValueError(f"PEER_ENGINE {engine!r} is not one of {ENGINES}")


class PeerDetector:
    """bytes -> JSON-ready detections, in one process: decode/preprocess, the detector, postprocess."""

    def __init__(self, spec: PipelineSpec, threads: int | None, engine: str = "onnxruntime"):
        self.spec = spec
        self.threads = threads
        self.engine = engine
        self.run = make_runner(spec, threads, engine)
        self.options = dict(num_classes=len(spec.classes), score_threshold=spec.thresholds.score,
                            iou_threshold=spec.thresholds.iou, max_detections=spec.thresholds.max_detections,
                            class_agnostic=spec.thresholds.class_agnostic)

    def __call__(self, data: bytes) -> dict[str, Any]:
        spec = self.spec
        tensor, transform = prepare_input(decode_image(data, spec.limits), spec.input)
        raw = self.run(tensor[None])
        boxes, scores, class_ids = postprocess_image(raw[0], spec.output.format, transform, **self.options)
        return {
            "source": "peer",
            "degraded": False,
            "detections": [
                {"class_id": int(c), "class_name": spec.classes[int(c)], "score": round(float(s), 4),
                 "box": [round(float(v), 1) for v in b]}
                for b, s, c in zip(boxes.tolist(), scores.tolist(), class_ids.tolist())
            ],
        }


def threads_from_env(value: str | None) -> int | None:
    if value is None or value.strip().lower() in ("", "default"):
        return None
    threads = int(value)
    if threads < 0:
        raise ValueError(f"PEER_ORT_THREADS must be >= 0 or 'default', got {value!r}")
    return threads


def detector_from_env() -> PeerDetector:
    return PeerDetector(load_spec(os.environ.get("PEER_SPEC", str(DEFAULT_SPEC))),
                        threads_from_env(os.environ.get("PEER_ORT_THREADS")),
                        os.environ.get("PEER_ENGINE", "onnxruntime").strip().lower() or "onnxruntime")


def create_app(detector: PeerDetector | None = None) -> FastAPI:
    """The service; without a detector, one is built from the environment when the worker starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if getattr(app.state, "detector", None) is None:
            app.state.detector = detector_from_env()
        yield

    app = FastAPI(title="edgestack peer: FastAPI + ONNX Runtime", lifespan=lifespan)
    app.state.detector = detector

    @app.get("/health")
    async def health() -> dict[str, Any]:
        d = app.state.detector
        return {"ready": d is not None, "ort_threads": "default" if d is None or d.threads is None else d.threads,
                "engine": None if d is None else d.engine}

    @app.post("/detect")
    async def detect(request: Request) -> dict[str, Any]:
        data = await request.body()
        try:
            return await run_in_threadpool(app.state.detector, data)
        except InvalidImageError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    return app


app = create_app()


def serve(host: str, port: int, workers: int = 1, access_log: bool = True) -> None:
    """uvicorn with `workers` processes; the shared listener is made as IPPROTO_TCP (see the module's notes)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("benchmarks.fastapi_peer_app:app", host=host, port=port, workers=workers,
                            access_log=access_log)
    if workers <= 1:
        uvicorn.Server(config).run()
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the FastAPI + ONNX Runtime peer (TCP_NODELAY-safe workers).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.workers, args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
