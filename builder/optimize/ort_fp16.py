"""FP16 variant for the GPU targets: float16 weights and activations, float32 inputs, outputs and decode tail."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from builder.optimize.ort_common import (GPU_TARGETS, MODEL_FILE, QuantizationError, check_runs, ort_versions,
                                         sha256_file, staged, zero_feed)
from builder.optimize.ort_graph import default_head_exclusions
from builder.optimize.variants import Variant


def _convert_fp16(source: Path, target: Path, block: list[str]) -> dict[str, Any]:
    """convert_float_to_float16(keep_io_types=True) with onnxconverter-common; if ORT cannot load or run its
    output, the same converter as shipped (and maintained) inside ONNX Runtime, onnxruntime.transformers.float16.

    onnxconverter-common 1.16 mistypes graphs whose outputs are also consumed inside the graph (this detector's
    keypoints/wh outputs feed the decode): ORT refuses the result with a type error.
    """
    import onnx
    from onnxconverter_common import float16 as occ_float16
    from onnxruntime.transformers import float16 as ort_float16

    failures = []
    for name, convert in (("onnxconverter_common.float16", occ_float16.convert_float_to_float16),
                          ("onnxruntime.transformers.float16", ort_float16.convert_float_to_float16)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "float32 number ... will be truncated" per tiny weight
                model = convert(onnx.load(str(source)), keep_io_types=True, node_block_list=block)
            onnx.save(model, str(target))
            check_runs(target, zero_feed(target))
            return {"converter": name, "converter_failures": failures}
        except Exception as exc:  # noqa: BLE001 - try the next converter, report all if none works
            failures.append(f"{name}: {str(exc).strip().splitlines()[0][:300]}")
            target.unlink(missing_ok=True)
    raise QuantizationError(f"float16 conversion of {source.name} failed: " + " | ".join(failures))


def build_fp16(source: Path, out_dir: Path) -> Variant:
    """Float16 weights and activations for GPU targets, float32 inputs and outputs (keep_io_types).

    The decode tail (default_head_exclusions) stays float32: it casts TopK's flat indices (up to H*W*C,
    1.3 million for this detector) to float, which float16 cannot hold above 65504.
    """
    source, out_dir = Path(source), Path(out_dir)
    tail = list(default_head_exclusions(source))
    with staged(out_dir) as stage:
        target = stage / MODEL_FILE
        used = _convert_fp16(source, target, tail)
        sha = sha256_file(target)
    options = {"keep_io_types": True, "float32_nodes": tail, **used, "source_sha256": sha256_file(source), "sha256": sha,
               "onnxconverter_common": _package_version("onnxconverter-common"), **ort_versions()}
    return Variant("fp16", "onnxruntime", "fp16", out_dir / MODEL_FILE, options, GPU_TARGETS)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
