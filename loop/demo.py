"""`edgestack loop demo`: uncertain samples arriving at the collector, on this machine.

A nats-server (JetStream), the collector, the fixture spec's pipeline rendered with the sampler and served by
tritonserver, the device's uploader; every photo of --images goes through the pipeline, each sample is printed
as the collector stores it, then the counts and a COCO labelling task in --out. Everything is stopped by PID.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from loop.collector import Collector
from loop.settings import SamplingSettings
from loop.spool import Spool
from loop.uploader import Uploader


def _background(make) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(make(stop.is_set)), daemon=True)
    thread.start()
    return stop, thread


def run_demo(spec: Path, images: Path, out: Path, timeout_s: float = 60.0) -> int:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from builder.repository import render_repository, target_for
    from builder.spec import load_spec
    from edgestack.server import TritonServer
    from fleet.nats_server import NatsServer
    from loop.pipeline_step import add_sampling

    out = Path(out)
    spool_dir, store = out / "device-spool", out / "cloud-store"
    settings = SamplingSettings(enabled=True, spool_dir=str(spool_dir.resolve()), device_id="demo-edge-1",
                                rate_per_s=50.0, burst=50)
    loaded = load_spec(spec)
    repo = render_repository(loaded, out / "model_repository", target_for(loaded))
    add_sampling(repo, loaded.name, settings)
    photos = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    arrived: list[str] = []
    with NatsServer(out / "nats", log_path=out / "nats-server.log") as nats_server:
        print(f"cloud: nats-server (JetStream) at {nats_server.url}, collector storing in {store}", flush=True)
        def stored(subject: str) -> None:
            arrived.append(subject)
            print(f"  collector <- uncertain sample #{len(arrived)} from {subject}", flush=True)

        c_stop, c_thread = _background(lambda stop: Collector(store).run(nats_server.url, stop,
                                                                          on_stored=stored))
        u_stop, u_thread = _background(lambda stop: Uploader(Spool(spool_dir, settings.max_bytes), nats_server.url,
                                                             poll_s=0.2).run(stop))
        try:
            with TritonServer(repo, log_path=out / "tritonserver.log") as server:
                print(f"device: tritonserver with the sampler at {server.grpc_url}, spool {spool_dir}", flush=True)
                sampled = 0
                with grpcclient.InferenceServerClient(server.grpc_url) as client:
                    for photo in photos:
                        data = photo.read_bytes()
                        tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
                        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
                        result = client.infer(loaded.name, [tensor])
                        kept = bool(result.as_numpy("SAMPLED").reshape(-1)[0])
                        scores = result.as_numpy("SCORES").reshape(-1)
                        sampled += kept
                        print(f"  {photo.name:24s} {int(result.as_numpy('NUM_DETECTIONS').reshape(-1)[0]):3d} "
                              f"detections, best {scores.max() if scores.size else 0:.2f}  "
                              f"{'-> SAMPLED (uncertain)' if kept else ''}", flush=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and len(arrived) < sampled:
                time.sleep(0.1)
        finally:
            u_stop.set(), c_stop.set()
            u_thread.join(15), c_thread.join(15)
    final = Collector(store)
    stats = final.stats()
    print(f"collector: {len(arrived)} of {sampled} sampled images arrived", flush=True)
    for row in final.db.execute("SELECT sha256, device_id, model_version, reason FROM samples ORDER BY time"):
        print(f"  {row[0][:12]}  {row[1]}  {row[2]}  {row[3]}")
    print("counts:", json.dumps({k: stats[k] for k in ("images", "by_device", "by_model_version", "by_class")}))
    task = final.export_coco(out / "labelling_task")
    final.close()
    print(f"COCO labelling task: {task}")
    return 0 if len(arrived) == sampled else 1
