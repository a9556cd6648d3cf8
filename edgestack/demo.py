"""The demo: spec -> repository -> real tritonserver -> every photo through the ensemble -> files + table."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Sequence

from builder.spec import load_spec
from edgestack.annotate import write_annotated
from edgestack.client import DetectionClient
from edgestack.demo_pipelines import render_demo_pipelines, run_pipeline
from edgestack.errors import ClientError
from edgestack.inputs import image_folder
from edgestack.server import TritonServer
from ensembles import render_pipeline


def run_demo(spec_path: Path, images_dir: Path, out_dir: Path, protocol: str = "grpc",
             pipelines: Sequence[Path] = ()) -> int:
    """pipelines: more specs (a cascade, a parallel ensemble: ensembles/) served beside spec_path's, each photo
    through each of them too (edgestack/demo_pipelines.py)."""
    spec = load_spec(spec_path)
    images = image_folder(images_dir)
    repository = render_pipeline(spec, out_dir / "model_repository")
    print(f"rendered {repository} from {spec_path} (target {spec.target})")
    extra = render_demo_pipelines(pipelines, repository)
    rows, failures = [], 0
    with TritonServer(repository, log_path=out_dir / "tritonserver.log") as server:
        print(f"tritonserver ready (pid {server.pid}) grpc {server.grpc_url} http {server.http_url}")
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with DetectionClient(url, protocol, spec.name) as client:
            for path in images:
                data = path.read_bytes()
                started = time.perf_counter()
                try:
                    result = client.detect(data)
                except ClientError as exc:
                    failures += 1
                    rows.append((path.name, f"ERROR {exc}", "", 0.0))
                    continue
                elapsed_ms = (time.perf_counter() - started) * 1000
                (out_dir / "json").mkdir(parents=True, exist_ok=True)
                (out_dir / "json" / f"{path.stem}.json").write_text(json.dumps({"image": path.name, **result.to_dict()}, indent=2))
                write_annotated(data, result, out_dir / "annotated" / f"{path.stem}.jpg")
                found = ", ".join(f"{d.class_name} {d.score:.2f}" for d in result.detections) or "nothing"
                rows.append((path.name, found, result.source, elapsed_ms))
        tables = io.StringIO()  # printed after the main table
        with contextlib.redirect_stdout(tables):
            for pipeline in extra:
                failures += run_pipeline(url, protocol, pipeline, images)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'image':<{width}}  {'ms':>6}  {'source':<6}  detections (class score)")
    for name, found, source, ms in rows:
        print(f"{name:<{width}}  {ms:6.1f}  {source:<6}  {found}")
    print(tables.getvalue(), end="")
    print(f"\nJSON in {out_dir / 'json'}, annotated pictures in {out_dir / 'annotated'}; tritonserver stopped.")
    return 1 if failures else 0
