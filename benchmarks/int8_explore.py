"""Why is (or isn't) ONNX Runtime INT8 faster than FP32 on this CPU? One process, one table.

Builds INT8 variants of the spec's detector with builder.optimize.ort_variants (ORT's own quantizer), then
measures them against the FP32 model in the same process, same input, same threads:

  latency   each round runs every session once, in a rotating order (the FP32 baseline included), so load
            from other processes hits all of them alike; reported: median and min ms over --runs rounds, and
            the speedup as the median of the per-round ratios fp32/variant (paired, robust to drift).
  kernels   what ORT executes after its own graph optimization (quantized_op_counts: QLinearConv vs float
            Conv, Q/DQ left in the executed graph).
  fidelity  detections on every image of --images through postprocess_image with the spec's thresholds,
            against FP32: images whose class set is the same, FP32 boxes matched by a same-class box with
            IoU > 0.8, extra boxes, and the mean correlation of a dense output (--heatmap) with FP32.
  profile   --profile ROW: ORT's profiler, kernel ms per op type and conv kernels by kind, FP32 vs ROW.

  mAP       fidelity mAP@0.5 (builder.optimize.evaluate.fidelity_map, pycocotools): the row's detections down to
            score 0.05 against FP32's detections above the spec's threshold, the number `edgestack optimize` reports.

Rows named nncf-* quantize with NNCF's ONNX backend (benchmarks/int8_nncf_onnx.py) and run in ORT.
Findings and the table it printed: docs/INT8.md.

Usage: python benchmarks/int8_explore.py [--threads 1] [--runs 30] [--only NAME,...] [--profile NAME]
Builds are cached under --out (delete it, or pass --rebuild, after changing the quantizer).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402
from benchmarks import int8_nncf_onnx  # noqa: E402
from benchmarks.int8_profile import conv_kinds, profile  # noqa: E402
from builder.optimize import evaluate  # noqa: E402
from builder.optimize import ort_variants as ov  # noqa: E402
from builder.optimize.ort_graph import count_ops  # noqa: E402
from builder.optimize.calibration import load_calibration_set  # noqa: E402
from builder.spec import load_spec  # noqa: E402

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass
class Row:
    name: str
    what: str
    model: str = "int8"                    # "source", "fp32" (build_fp32 output) or "int8"
    options: dict = field(default_factory=dict)   # QuantOptions fields
    level: str = "all"
    config: dict = field(default_factory=dict)    # session config entries
    disabled_optimizers: tuple = ()
    nncf: dict | None = None                      # model="nncf": int8_nncf_onnx.build options


def graph_facts(source: Path) -> dict[str, list[str]]:
    """Node-name groups of the fixture detector for the mixed-precision rows."""
    import onnx

    graph = onnx.load(str(source)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    resizes = [n.name for n in graph.node if n.op_type == "Resize"]
    # MobileNetV3 backbone: its nodes carry the scope name, except tf2onnx's renamed depthwise convs (Conv__NNN),
    # which belong to the block of the node that consumes them.
    consumers: dict[str, list] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    def scope(node) -> str:
        if "/MobilenetV3/" in node.name:
            return node.name.split("/MobilenetV3/")[1].split("/")[0]
        if node.name.startswith("Conv__"):
            for consumer in consumers[node.output[0]]:
                if "/MobilenetV3/" in consumer.name:
                    return consumer.name.split("/MobilenetV3/")[1].split("/")[0]
        return ""
    scopes = {n.name: scope(n) for n in graph.node}
    backbone = [name for name, s in scopes.items() if s]
    early = [name for name, s in scopes.items() if s in ("Conv", "expanded_conv") or
             s in {f"expanded_conv_{i}" for i in range(1, 6)}]
    return {"first_conv": [convs[0].name], "depthwise": depthwise, "resize": resizes, "backbone": backbone,
            "early": early, "head": list(ov.default_head_exclusions(source))}


def rows(facts: dict[str, list[str]]) -> list[Row]:
    # Base: QDQ, U8S8, per-channel, asymmetric activations, minmax (QuantOptions' default "entropy" builds the
    # byte-identical model through quantize_static, see docs/INT8.md, and takes longer to calibrate).
    base = {"calibration": "minmax"}
    head = facts["head"]
    return [
        Row("fp32", "FP32 source, ORT_ENABLE_ALL (baseline)", model="source"),
        Row("fp32-file", "build_fp32 output (BASIC offline), ALL at load", model="fp32"),
        Row("fp32@extended", "FP32, ORT_ENABLE_EXTENDED (no NCHWc)", model="source", level="extended"),
        Row("fp32@basic", "FP32, ORT_ENABLE_BASIC", model="source", level="basic"),
        Row("u8s8", "QDQ U8S8 per-channel minmax", options=base),
        Row("u8s8@extended", "same file, ORT_ENABLE_EXTENDED", options=base, level="extended"),
        Row("u8s8@basic", "same file, ORT_ENABLE_BASIC (no QDQ fusion)", options=base, level="basic"),
        Row("u8s8-no-nhwc", "same file, ALL minus NhwcTransformer", options=base,
            disabled_optimizers=("NhwcTransformer",)),
        Row("u8s8-qdq-cleanup", "same file, session.enable_quant_qdq_cleanup=1", options=base,
            config={"session.enable_quant_qdq_cleanup": "1"}),
        Row("qoperator", "QOperator format", options={**base, "quant_format": "qoperator"}),
        Row("per-tensor", "per-tensor weights", options={**base, "per_channel": False}),
        Row("s8s8", "int8 activations (S8S8)", options={**base, "activation_type": "int8"}),
        Row("s8s8-sym", "int8 symmetric activations (TensorRT style)",
            options={**base, "activation_type": "int8", "symmetric_activations": True}),
        Row("u8u8-pt", "uint8 weights (U8U8; per-channel cannot run)",
            options={**base, "weight_type": "uint8", "per_channel": False}),
        Row("reduce-range", "7-bit weights", options={**base, "reduce_range": True}),
        Row("qop-rr", "QOperator + 7-bit weights", options={**base, "quant_format": "qoperator", "reduce_range": True}),
        Row("head-float", "decode tail float (default_head_exclusions)", options={**base, "exclude_nodes": head}),
        Row("head-float-pct", "head float, percentile 99.999 calibration",
            options={"calibration": "percentile", "exclude_nodes": head}),
        Row("first-conv-float", "head + first conv (3 channels) float", options={**base, "exclude_nodes": head + facts["first_conv"]}),
        Row("resize-float", "head + Resize nodes excluded", options={**base, "exclude_nodes": head + facts["resize"]}),
        Row("depthwise-float", "head + all 26 depthwise convs excluded", options={**base, "exclude_nodes": head + facts["depthwise"]}),
        Row("conv-only", "only Conv quantized, all else float",
            options={**base, "exclude_op_types": tuple(sorted(set(ov.op_types_to_quantize(())) - {"Conv"}))}),
        Row("early-float", "head + stem..block 5 float (percentile)",
            options={"calibration": "percentile", "exclude_nodes": head + facts["early"]}),
        Row("backbone-float", "whole backbone + tail float, FPN/heads INT8 (percentile)",
            options={"calibration": "percentile", "exclude_nodes": head + facts["backbone"]}),
        # NNCF's ONNX backend, run by ORT (head ignored, as build_openvino_int8 does)
        Row("nncf-as-written", "NNCF QDQ as written (per-channel dw activations, int8 zp, float bias)", model="nncf",
            nncf={"fix_for_ort": False, "per_channel_activations": True}),
        Row("nncf", "NNCF, per-tensor activations, uint8 zp + int32 bias for ORT", model="nncf", nncf={}),
        Row("nncf-performance", "same, preset performance (symmetric activations)", model="nncf",
            nncf={"preset": "performance"}),
        Row("nncf-mean-quantile", "same, NNCF MEAN_QUANTILE activation ranges", model="nncf",
            nncf={"range_estimator": "mean_quantile"}),
        Row("nncf-no-bias-corr", "same as nncf, fast bias correction off", model="nncf",
            nncf={"fast_bias_correction": False}),
        # the FAST_INT8 recipe of builder/optimize/ort_variants.py, one part at a time
        Row("minmax-mulfold", "head float, minmax, scalar Muls folded", options={**base, "exclude_nodes": head,
                                                                                 "fold_scalar_muls": True}),
        Row("mean-quantile", "head float, mean-quantile ranges", options={"calibration": "mean-quantile",
                                                                          "exclude_nodes": head}),
        Row("mq-resize-f32", "head float, mean-quantile, Resize float",
            options={"calibration": "mean-quantile", "float_resize": True, "exclude_nodes": head}),
        Row("mq-resize-mulfold", "head float, mean-quantile, Resize float, scalar Muls folded",
            options={**ov.FAST_INT8, "peaks_on_logits": False, "exclude_nodes": head}),
        Row("fast", "FAST_INT8: mean-quantile, Resize float, scalar Muls folded, peak test on logits (int8-mean-quantile)",
            options={**ov.FAST_INT8, "exclude_nodes": head}),
        Row("fast-mean-minmax", "fast with outlier_prob 0 (mean of per-image min/max)",
            options={**ov.FAST_INT8, "outlier_prob": 0.0, "exclude_nodes": head}),
        Row("fast-q1e-3", "fast with outlier_prob 1e-3", options={**ov.FAST_INT8, "outlier_prob": 1e-3, "exclude_nodes": head}),
        Row("fast-q1e-5", "fast with outlier_prob 1e-5", options={**ov.FAST_INT8, "outlier_prob": 1e-5, "exclude_nodes": head}),
        Row("fast-stem-float", "fast + first conv float", options={**ov.FAST_INT8, "exclude_nodes": head + facts["first_conv"]}),
    ]


def session(path: Path, row: Row, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = LEVELS[row.level]
    options.log_severity_level = 3
    for key, value in row.config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(row.disabled_optimizers) or None)


def executed_counts(path: Path, row: Row) -> dict:
    """quantized_op_counts-style counts of what this row's session executes (its level, config, disabled optimizers)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = LEVELS[row.level]
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        for key, value in row.config.items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(row.disabled_optimizers) or None)
        return count_ops(onnx.load(options.optimized_model_filepath).graph, executed=True)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def agreement(reference: list, got: list, min_iou: float = 0.8) -> dict:
    """Images with the same class set; reference boxes matched one-to-one by same-class boxes with IoU > min_iou."""
    same_classes = matched = total = extra = 0
    for (rb, rs, rc), (gb, gs, gc) in zip(reference, got):
        same_classes += set(rc.tolist()) == set(gc.tolist())
        used: set[int] = set()
        for i in np.argsort(-rs, kind="stable"):
            best, best_iou = None, min_iou
            for j in range(len(gb)):
                if j not in used and gc[j] == rc[i] and iou(rb[i], gb[j]) > best_iou:
                    best, best_iou = j, iou(rb[i], gb[j])
            if best is not None:
                used.add(best)
                matched += 1
        total += len(rb)
        extra += len(gb) - len(used)
    return {"same_classes": same_classes, "images": len(reference), "matched": matched, "boxes": total, "extra": extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"),
                        help="calibration and evaluation images (the fixture photos)")
    parser.add_argument("--calibration-count", type=int, default=None, help="first N images for calibration (all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (each runs every session once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="comma list of row names (fp32 is always measured)")
    parser.add_argument("--out", default=str(ROOT / "build" / "int8_explore"), help="variant cache folder")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--profile", default="", help="row name: print ORT per-op kernel time, FP32 vs that row")
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    parser.add_argument("--heatmap", default="tower_0/keypoints",
                        help="a dense output compared by correlation with fp32 (skipped if the model lacks it)")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    images = image_files(Path(args.images))
    calibration = load_calibration_set(Path(args.images), spec.input, spec.limits, args.calibration_count)
    prepared = evaluate.prepare_images(spec, images)
    inputs = [(tensor, transform) for tensor, transform, _, _ in prepared]
    facts = graph_facts(spec.model_path)
    table = rows(facts)
    if args.only:
        wanted = {"fp32", *args.only.split(",")}
        unknown = wanted - {r.name for r in table}
        if unknown:
            parser.error(f"unknown row(s) {sorted(unknown)}; known: {[r.name for r in table]}")
        table = [r for r in table if r.name in wanted]

    out = Path(args.out)
    paths: dict[str, Path] = {}
    built: dict[str, float] = {}
    for row in table:
        if row.model == "source":
            paths[row.name] = spec.model_path
            continue
        if row.model == "nncf":
            target = out / row.name
            if args.rebuild or not (target / ov.MODEL_FILE).is_file():
                start = time.perf_counter()
                try:
                    int8_nncf_onnx.build(spec.model_path, target, list(calibration.tensors), spec.input_name,
                                         facts["head"], **row.nncf)
                except Exception as exc:  # noqa: BLE001 - a row that cannot be built is a finding, not a crash
                    print(f"{row.name}: NNCF failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                built[row.name] = time.perf_counter() - start
                print(f"built {row.name} (NNCF) in {built[row.name]:.1f} s", file=sys.stderr)
            paths[row.name] = target / ov.MODEL_FILE
            continue
        if row.model == "fp32":
            target = out / "fp32"
            if args.rebuild or not (target / ov.MODEL_FILE).is_file():
                ov.build_fp32(spec.model_path, target)
            paths[row.name] = target / ov.MODEL_FILE
            continue
        options = ov.QuantOptions(**row.options)
        target = out / options.name
        if args.rebuild or not (target / ov.MODEL_FILE).is_file():
            start = time.perf_counter()
            try:
                ov.build_int8(spec.model_path, target, calibration, spec.input_name, options)
            except Exception as exc:  # noqa: BLE001 - a row that cannot be built is a finding, not a crash
                print(f"{row.name}: build failed: {exc}", file=sys.stderr)
                continue
            built[row.name] = time.perf_counter() - start
            print(f"built {row.name} ({options.name}) in {built[row.name]:.1f} s", file=sys.stderr)
        paths[row.name] = target / ov.MODEL_FILE
    table = [r for r in table if r.name in paths]

    sessions = {}
    for r in table:
        try:
            sessions[r.name] = session(paths[r.name], r, args.threads)
        except Exception as exc:  # noqa: BLE001 - a row ORT cannot load is a finding, not a crash
            print(f"{r.name}: ONNX Runtime cannot load it: {str(exc).strip().splitlines()[0][:200]}", file=sys.stderr)
    table = [r for r in table if r.name in sessions]
    feed_name, output = spec.input_name, spec.output.name

    # fidelity: every image through every session, postprocessed with the shipped thresholds
    post = dict(num_classes=len(spec.classes), score_threshold=spec.thresholds.score, iou_threshold=spec.thresholds.iou,
                max_detections=spec.thresholds.max_detections, class_agnostic=spec.thresholds.class_agnostic)
    detections, heatmaps, low = {}, {}, {}
    heatmap = args.heatmap if args.heatmap in [o.name for o in sessions["fp32"].get_outputs()] else None
    for name, sess in sessions.items():
        raw = [sess.run([output] + ([heatmap] if heatmap else []), {feed_name: t[None]}) for t, _ in inputs]
        detections[name] = [postprocess_image(r[0][0], spec.output.format, tr, **post) for r, (_, tr) in zip(raw, inputs)]
        low[name] = [evaluate.ImageDetections(*postprocess_image(r[0][0], spec.output.format, tr,
                                                                 **{**post, "score_threshold": evaluate.MAP_SCORE_THRESHOLD}),
                                              width, height, p.name)
                     for r, (_, tr, width, height), p in zip(raw, prepared, images)]
        heatmaps[name] = [r[1] for r in raw] if heatmap else []

    # latency: rotating order per round, batch 1, the same mid-sized image for all
    x = inputs[len(inputs) // 2][0][None]
    names = list(sessions)
    load_before = os.getloadavg()[0]
    for name in names:
        for _ in range(args.warmup):
            sessions[name].run([output], {feed_name: x})
    times = {name: [] for name in names}
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run([output], {feed_name: x})
            times[name].append(time.perf_counter() - start)

    base = np.asarray(times["fp32"])
    results = []
    for row in table:
        t = np.asarray(times[row.name])
        counts = executed_counts(paths[row.name], row)
        fid = agreement(detections["fp32"], detections[row.name])
        fid["map50"] = evaluate.fidelity_map(low["fp32"], low[row.name],
                                             reference_score_threshold=spec.thresholds.score)["map50"]
        fid["heatmap_corr"] = float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1]
                                             for a, b in zip(heatmaps["fp32"], heatmaps[row.name])])) if heatmap else float("nan")
        results.append({
            "name": row.name, "what": row.what, "level": row.level,
            "median_ms": float(np.median(t) * 1e3), "min_ms": float(t.min() * 1e3),
            "speedup": float(np.median(base / t)), "speedup_of_medians": float(np.median(base) / np.median(t)),
            "qlinearconv": counts["integer_ops"].get("QLinearConv", 0), "float_conv": counts["float_conv"],
            "q": counts["QuantizeLinear"], "dq": counts["DequantizeLinear"], **fid,
        })

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
          f"{args.threads} thread(s), {args.runs} rounds, batch 1, load avg before {load_before:.2f}; "
          f"calibration {len(calibration)} images; fidelity on {len(images)} images vs fp32\n")
    header = ("| row | what | median ms | min ms | speedup | QLinearConv / float Conv | Q / DQ run "
              "| mAP@0.5 | heatmap corr | same classes | boxes IoU>0.8 | extra |")
    print(header)
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        print(f"| {r['name']} | {r['what']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup']:.2f}x "
              f"| {r['qlinearconv']} / {r['float_conv']} | {r['q']} / {r['dq']} | {r['map50']:.3f} | {r['heatmap_corr']:.3f} "
              f"| {r['same_classes']}/{r['images']} | {r['matched']}/{r['boxes']} | {r['extra']} |")
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}; speedup = median over rounds of fp32/row "
          "(paired); heatmap corr = mean Pearson r of tower_0/keypoints vs fp32 over the images")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "build_s": built}, indent=2) + "\n")

    if args.profile:
        if args.profile not in paths:
            parser.error(f"--profile {args.profile}: not a measured row")
        kinds = conv_kinds(spec.model_path)
        for name in ("fp32", args.profile):
            row = next(r for r in table if r.name == name)
            ops, convs = profile(paths[name], row, args.threads, feed_name, output, x, args.runs, kinds)
            print(f"\nper-op kernel time, {name} (ms per run, {args.runs} runs):")
            for op, ms, n in ops:
                print(f"  {op:<26} {ms:7.2f}  n={n}")
            print("  conv kernels by kind: " + ", ".join(f"{kind} {ms:.2f}" for kind, ms in convs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
