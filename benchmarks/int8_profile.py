"""ORT's profiler for benchmarks/int8_explore.py --profile ROW: kernel time per op type, convs split by kind."""
from __future__ import annotations

import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def conv_kinds(source: Path) -> dict[str, str]:
    """Source Conv name -> stem | depthwise | pointwise | other."""
    import onnx

    kinds = {}
    convs = [n for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"]
    for i, node in enumerate(convs):
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
        kinds[node.name] = ("stem" if i == 0 else "depthwise" if group > 1 else
                            "pointwise" if kernel == [1, 1] else "other")
    return kinds


def _conv_kind(event: dict, kinds: dict[str, str]) -> str:
    """Kind of a profiled conv kernel: by source name (QLinearConv keeps it), else by the FP32 weight shape."""
    base = re.sub(r"(_token_\d+|:0_nchwc|_nchwc)$", "", event["name"][:-len("_kernel_time")])
    if base in kinds:
        return kinds[base]
    shapes = [list(d.values())[0] for d in event["args"].get("input_type_shape", [])]
    if len(shapes) > 1 and len(shapes[1]) == 4:
        out_c, in_c, kh, kw = shapes[1]
        if in_c == 1 and out_c > 1:
            return "depthwise"
        if (kh, kw) == (1, 1):
            return "pointwise"
        if in_c == 3:
            return "stem"
    return "other"


def profile(path: Path, row, threads: int, feed_name: str, output: str, x: np.ndarray, runs: int,
            kinds: dict[str, str]):
    """ORT's own profiler: kernel ms per run by op type, and conv kernels split by kind."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = LEVELS[row.level]
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        for key, value in row.config.items():
            options.add_session_config_entry(key, value)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(row.disabled_optimizers) or None)
        for _ in range(runs):
            sess.run([output], {feed_name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    total, count, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            total[op] += e["dur"]
            count[op] += 1
            if op in ("Conv", "FusedConv", "QLinearConv"):
                by_kind[_conv_kind(e, kinds)] += e["dur"]
    rows_out = [(op, us / runs / 1e3, count[op] // runs) for op, us in total.most_common()]
    rows_out.append(("TOTAL", sum(total.values()) / runs / 1e3, sum(count.values()) // runs))
    return rows_out, {kind: us / runs / 1e3 for kind, us in by_kind.most_common()}
