"""The demo's pipelines of several models (ensembles/): rendered beside the main pipeline, every photo through each,
one table per pipeline with the stage (cascade) or the fused detections (parallel) and the share each stage answered."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from backends.common import tensors as T
from builder.repository import target_for
from builder.spec import PipelineSpec, load_spec
from edgestack.client import _module
from ensembles import render_pipeline


def render_demo_pipelines(spec_paths: Sequence[Path], repository: Path) -> list[PipelineSpec]:
    """Render each spec's pipeline into repository, one instance per step (the demo shows them, it does not load them)."""
    specs = []
    for path in spec_paths:
        spec = load_spec(path)
        render_pipeline(spec, repository, target_for(spec, detector_instances=1, preprocess_instances=1))
        print(f"rendered {spec.pipeline.kind} pipeline {spec.name!r} from {path}")
        specs.append(spec)
    return specs


def run_pipeline(url: str, protocol: str, spec: PipelineSpec, images: Sequence[Path]) -> int:
    """Every photo through the pipeline, one request each; prints the table; returns the number of failures."""
    module = _module(protocol)
    client = module.InferenceServerClient(url)
    extra = (T.STAGE,) if spec.pipeline.kind == "cascade" else ()
    names = (T.SCORES, T.CLASS_NAMES, T.NUM_DETECTIONS, T.SOURCE, T.STATUS, *extra)
    rows, stages, failures = [], Counter(), 0
    try:
        for path in images:
            tensor = module.InferInput(T.IMAGE, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[path.read_bytes()]], dtype=object))
            started = time.perf_counter()
            try:
                result = client.infer(spec.name, [tensor], outputs=[module.InferRequestedOutput(n) for n in names])
            except Exception as exc:  # noqa: BLE001 - the demo reports every failed image and goes on
                failures += 1
                rows.append((path.name, 0.0, "", f"ERROR {exc}"))
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            k = int(result.as_numpy(T.NUM_DETECTIONS)[0, 0])
            found = ", ".join(f"{n.decode()} {s:.2f}" for n, s in zip(result.as_numpy(T.CLASS_NAMES)[0, :k],
                                                                   result.as_numpy(T.SCORES)[0, :k])) or "nothing"
            source = result.as_numpy(T.SOURCE)[0, 0].decode()
            stage = result.as_numpy(T.STAGE)[0, 0].decode() if extra else source
            stage = "cloud" if source == "cloud" else stage
            stages[stage] += 1
            rows.append((path.name, elapsed_ms, stage, found))
    finally:
        client.close()
    width = max(len(r[0]) for r in rows)
    print(f"\n{spec.pipeline.kind} pipeline {spec.name!r}:\n{'image':<{width}}  {'ms':>6}  {'stage':<7}  detections")
    for name, ms, stage, found in rows:
        print(f"{name:<{width}}  {ms:6.1f}  {stage:<7}  {found}")
    print("answered by: " + ", ".join(f"{stage} {count}/{len(images)}" for stage, count in sorted(stages.items())))
    return failures
