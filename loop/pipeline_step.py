"""The sampling side path in a rendered repository: a Python-backend step <name>_sampler beside the router.

The spec's `sampling` section (loop.settings) turns it on. add_sampling() takes a repository rendered for a
single-detector pipeline (builder.repository / `edgestack build`) and adds:

    <name>_sampler      inputs IMAGE, the detector's raw outputs and TRANSFORM (what postprocess reads) and STATUS;
                        outputs SAMPLED (bool per image) and STATUS handed on unchanged
    <name> (ensemble)   one more step and one more output, SAMPLED; the router reads STATUS from the sampler

Triton runs only the ensemble steps the requested outputs need, so a side step nobody reads would never run: the
router's STATUS goes through the sampler. The sampler reads what postprocess reads (not what it writes) and
computes the final detections itself with the same function (backends.postprocess.pipeline), so it runs beside
postprocess, not after it: the router waits for the slower of the two. Its cost on the request path is that, the
keep rule and a queue put (the spool write is on a thread); benchmarks/loop.py measures it.

The sampler's code is loop/sampler_model.py (as model.py) with backends/ and the loop modules it needs copied
beside it, as every Python step of the repository is self-contained.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

from backends.common import tensors as T
from builder.repository import BACKENDS_SOURCE
from builder.triton_config import DynamicBatching, EnsembleStep, InstanceGroup, TensorConfig
from builder.triton_config_parse import parse
from builder.triton_config_render import write_config
from loop.errors import SamplingError
from loop.settings import SamplingSettings

SAMPLED = "SAMPLED"
SAMPLER_STATUS = "SAMPLER_STATUS"  # STATUS as the sampler hands it on to the router
LOOP_SOURCE = Path(__file__).resolve().parent
# What the sampler model imports from loop/ (all of it plain numpy and the standard library).
LOOP_MODULES = ("__init__.py", "errors.py", "settings.py", "spool.py", "uncertainty.py", "sampler.py")


def load_sampling(spec_path: Path | str) -> SamplingSettings:
    """The spec's `sampling` section (defaults when absent: disabled); spool_dir resolved against the spec."""
    spec_path = Path(spec_path)
    raw = yaml.safe_load(spec_path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise SamplingError(f"{spec_path}: a spec must be a YAML mapping")
    settings = SamplingSettings.from_dict(raw.get("sampling"))
    spool = Path(settings.spool_dir)
    if not spool.is_absolute():
        spool = (spec_path.parent / spool).resolve()
    return dataclasses.replace(settings, spool_dir=str(spool))


def sampler_name(pipeline: str) -> str:
    return f"{pipeline}_sampler"


def add_sampling(repository: Path | str, pipeline: str, settings: SamplingSettings,
                 model_version: str | None = None) -> Path:
    """Add the sampler step to the ensemble `pipeline` of a rendered repository; returns the sampler's folder.
    SamplingError when the repository has no single-detector pipeline of that name."""
    repository = Path(repository)
    ensemble_path = repository / pipeline / "config.pbtxt"
    post_path = repository / f"{pipeline}_postprocess" / "config.pbtxt"
    if not ensemble_path.is_file() or not post_path.is_file():
        raise SamplingError(f"{repository} has no single-detector pipeline {pipeline!r} (need {pipeline}/ and "
                            f"{pipeline}_postprocess/); sampling supports pipeline.kind single")
    ensemble, post = parse(ensemble_path.read_text()), parse(post_path.read_text())
    if any(o.name == SAMPLED for o in ensemble.outputs):
        raise SamplingError(f"pipeline {pipeline} samples already")
    post_step = next((s for s in ensemble.ensemble_steps if s.model_name == post.name), None)
    image = next((t for t in ensemble.inputs if t.name == T.IMAGE), None)
    if post_step is None or image is None:
        raise SamplingError(f"ensemble {pipeline} has no {post.name} step or no {T.IMAGE} input")
    post_settings = json.loads(post.parameters[T.CONFIG_PARAMETER])
    name = sampler_name(pipeline)
    parameters = {"sampling": settings.to_dict(), "postprocess": post_settings,
                  "model_version": model_version or settings.model_version or pipeline}
    sampler = dataclasses.replace(
        post, name=name, backend="python", platform=None,
        inputs=(image,) + post.inputs,
        outputs=(TensorConfig(SAMPLED, "TYPE_BOOL", (1,)),),
        instance_groups=(InstanceGroup(count=1, kind="KIND_CPU"),), dynamic_batching=DynamicBatching(),
        parameters={T.CONFIG_PARAMETER: json.dumps(parameters, sort_keys=True)}, ensemble_steps=(), warmup=())
    # Triton runs only the steps the requested outputs need: the sampler hands the per-image STATUS on to the
    # steps that read it (the router), so it runs for every request, whatever the client asks for.
    status = next((s.output_map[T.STATUS] for s in ensemble.ensemble_steps if T.STATUS in s.output_map), None)
    if status is None:
        raise SamplingError(f"ensemble {pipeline} has no step writing {T.STATUS} to hand on")
    status_config = next(t for t in parse((repository / next(
        s.model_name for s in ensemble.ensemble_steps if T.STATUS in s.output_map) / "config.pbtxt").read_text()
        ).outputs if t.name == T.STATUS)
    sampler = dataclasses.replace(sampler, inputs=sampler.inputs + (status_config,),
                                  outputs=sampler.outputs + (status_config,))
    step = EnsembleStep(name, {T.IMAGE: T.IMAGE, **post_step.input_map, T.STATUS: status},
                        {SAMPLED: SAMPLED, T.STATUS: SAMPLER_STATUS})
    steps = tuple(dataclasses.replace(s, input_map={k: SAMPLER_STATUS if v == status else v
                                                    for k, v in s.input_map.items()})
                  for s in ensemble.ensemble_steps)
    model_dir = repository / name
    version_dir = model_dir / "1"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir.mkdir(parents=True)
    shutil.copy2(LOOP_SOURCE / "sampler_model.py", version_dir / "model.py")
    shutil.copytree(BACKENDS_SOURCE, version_dir / "backends",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "model.py"))
    (version_dir / "loop").mkdir()
    for module in LOOP_MODULES:
        shutil.copy2(LOOP_SOURCE / module, version_dir / "loop" / module)
    write_config(sampler, model_dir)
    write_config(dataclasses.replace(ensemble, outputs=ensemble.outputs + (TensorConfig(SAMPLED, "TYPE_BOOL", (1,)),),
                                     ensemble_steps=steps + (step,)), repository / pipeline)
    return model_dir


def describe(settings: SamplingSettings) -> dict[str, Any]:
    return {"spool_dir": settings.spool_dir, "entropy_bits": settings.entropy_bits,
            "unsure_band": [settings.unsure_low, settings.unsure_high], "rate_per_s": settings.rate_per_s,
            "max_bytes": settings.max_bytes, "device_id": settings.device_id}
