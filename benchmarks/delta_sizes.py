"""Delta sizes benchmark: each delta method against the full file and the zstd-compressed full file.

Realistic changes of the fixture detector (and of its rendered config.pbtxt), one run, same machine:
config edit, metadata only, head-only fine-tune, full fine-tune, re-quantization (ONNX Runtime dynamic
with two settings; static QDQ with two calibration sets; dynamic of the base vs of the retrained model).
For each method: delta size (header included) and the time to make and to apply it; every applied
delta is checked to rebuild the new file byte for byte.

Where a method's Python package (bsdiff4, zstandard) is missing, the zstd methods are measured with the
zstd command-line tool at the same level instead (marked †): `zstd --patch-from` for zstd-patch-from,
and sidecar.delta_onnx's own onnx-tensor container compressed by the CLI for onnx-tensor. bsdiff4 has no
stand-in and shows n/a.

Then whole bundles: for each change, the rendered detector version folder (model.py, backends/, model.onnx)
as a full signed bundle and as a delta bundle against the base folder (sidecar.bundle.create_bundle with
base_dir: the bundler picks per file the smallest delta that verifies, or ships it whole); every delta
bundle is verified and rebuilt on top of the base as a device would (verify_bundle with base_dirs) and
checked byte for byte. Not a test: it prints Markdown tables (appended to a file with --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar import delta as D  # noqa: E402
from sidecar import delta_onnx  # noqa: E402
from sidecar.errors import DeltaError  # noqa: E402

MODEL = ROOT.parent / "shared" / "fixtures" / "models" / "centernet_mb3_coco.onnx"


def perturbed(base: bytes, names: set[str] | None, scale: float = 1e-2, seed: int = 0) -> bytes:
    """Gaussian noise of `scale` x each tensor's std on the named float weights (all when None)."""
    model = onnx.load_from_string(base)
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and t.raw_data and (names is None or t.name in names):
            a = np.frombuffer(t.raw_data, np.float32)
            t.raw_data = (a + rng.normal(0, scale * (float(a.std()) + 1e-6), a.shape)).astype(np.float32).tobytes()
    return model.SerializeToString()


def head_initializers(model: onnx.ModelProto, count: int = 6) -> set[str]:
    """Float weights (>= 64 elements) feeding the last nodes before the outputs, nearest first."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) >= 256}
    frontier, seen, found = [o.name for o in model.graph.output], set(), []
    while frontier and len(found) < count:
        node = producers.get(frontier.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in node.input:
            if name in weights and name not in found:
                found.append(name)
            elif name in producers:
                frontier.append(name)
    return set(found)


def config_pair() -> tuple[bytes, bytes]:
    from builder.repository import render_repository, target_for
    from builder.spec import load_spec
    spec = load_spec(ROOT / "specs" / "centernet_coco.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        texts = [(render_repository(spec, Path(tmp) / str(i), target_for(spec, **kw)) / "detect_detector" / "config.pbtxt").read_bytes()
                 for i, kw in enumerate([{}, {"detector_instances": 4, "intra_op_threads": 2}])]
    return texts[0], texts[1]


def quantized(tmp: Path, src: Path, name: str, static_seed: int | None = None, **kwargs) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static
    out = tmp / f"{name}.onnx"
    if static_seed is None:
        quantize_dynamic(str(src), str(out), **kwargs)
        return out.read_bytes()
    model = onnx.load(str(src))
    graph_input = model.graph.input[0]
    shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    rng = np.random.default_rng(static_seed)
    samples = iter([{graph_input.name: rng.uniform(0, 255, shape).astype(np.float32)} for _ in range(2)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(samples, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, **kwargs)
    return out.read_bytes()


def build_cases(tmp: Path) -> dict[str, tuple[bytes, bytes]]:
    base = MODEL.read_bytes()
    model = onnx.load_from_string(base)
    model.doc_string = "CenterNet MobileNetV3, retrained 2026-11"
    model.metadata_props.add(key="edgestack.version", value="1.4.0")
    retrained = perturbed(base, None)
    (tmp / "retrained.onnx").write_bytes(retrained)
    return {
        "config.pbtxt edit (instances, threads)": config_pair(),
        "model metadata only (doc string)": (base, model.SerializeToString()),
        "head-only fine-tune (6 head tensors)": (base, perturbed(base, head_initializers(model))),
        "full fine-tune (noise on every float weight)": (base, retrained),
        "re-quantize dynamic: int8 -> int8 reduce_range": (quantized(tmp, MODEL, "d0"), quantized(tmp, MODEL, "d1", reduce_range=True)),
        "re-calibrate static QDQ: calibration A -> B": (quantized(tmp, MODEL, "s0", 1), quantized(tmp, MODEL, "s1", 2)),
        "retrain + re-quantize dynamic int8": (quantized(tmp, MODEL, "d0"), quantized(tmp, tmp / "retrained.onnx", "d2")),
    }


def changed_share(base: bytes, new: bytes) -> str:
    """Share of the new file's initializer bytes that differ from the same-named base tensor."""
    try:
        old = delta_onnx._base_tensors(base)
        total = changed = 0
        for t in delta_onnx._initializers(new):
            if t.start < 0:
                continue
            data, o = new[t.start:t.end], old.get(t.name)
            ref = base[o.start:o.end] if o else b""
            total += len(data)
            changed += len(data) if len(ref) != len(data) else int(np.count_nonzero(
                np.frombuffer(data, np.uint8) != np.frombuffer(ref, np.uint8)))
        return f"{100 * changed / total:.1f}%" if total else "-"
    except (ValueError, DeltaError):
        return "-"


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def zstd_cli(args: list[str], data: bytes | None = None) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, capture_output=True, check=True).stdout


def measure(method: str, base: bytes, new: bytes, tmp: Path, level: int) -> tuple[int, float, float, bool] | str:
    """(delta size, make s, apply s, CLI stand-in?) or why it could not be measured."""
    if method in D.available_methods():
        try:
            delta, make_s = timed(D.make_delta, base, new, method)
        except DeltaError as exc:
            return "n/a (not ONNX)" if "initializer" in str(exc) or "protobuf" in str(exc) else f"failed: {exc}"
        result, apply_s = timed(D.apply_delta, base, delta)
        assert result == new
        return len(delta), make_s, apply_s, False
    if method == D.BSDIFF4 or not shutil.which("zstd"):
        return "n/a (not installed)"
    header = len(D._frame(method, base, new, b""))
    (tmp / "base").write_bytes(base)
    (tmp / "new").write_bytes(new)
    if method == D.ZSTD_PATCH_FROM:
        payload, make_s = timed(zstd_cli, [f"-{level}", f"--patch-from={tmp / 'base'}", str(tmp / "new")])
        (tmp / "delta").write_bytes(payload)
        result, apply_s = timed(zstd_cli, ["-d", f"--patch-from={tmp / 'base'}", str(tmp / "delta")])
    else:
        try:
            t0 = time.perf_counter()
            payload = zstd_cli([f"-{level}"], delta_onnx._tensor_pack(base, new))
            make_s = time.perf_counter() - t0
        except (ValueError, DeltaError):
            return "n/a (not ONNX)"
        t0 = time.perf_counter()
        result = delta_onnx._tensor_unpack(base, zstd_cli(["-d"], payload))
        apply_s = time.perf_counter() - t0
    assert result == new, f"{method} stand-in did not rebuild the file"
    return header + len(payload), make_s, apply_s, True


def bundle_rows(tmp: Path, cases: dict[str, tuple[bytes, bytes]]) -> list[str]:
    """Full vs delta bundle of the detector version folder for each change (config edit: same files, new
    config.pbtxt in the signed metadata)."""
    from datetime import timedelta, timezone

    from builder.repository import render_repository
    from builder.spec import load_spec
    from sidecar.bundle import create_bundle, verify_bundle
    from sidecar.keys import generate_key
    from sidecar.trust import TrustStore, format_time, make_root, sign

    root, key = generate_key(), generate_key()
    expires = format_time(datetime.datetime.now(timezone.utc) + timedelta(days=1))
    rendered = render_repository(load_spec(ROOT / "specs" / "centernet_coco.yaml"), tmp / "repo") / "detect_detector" / "1"
    lines = ["| change | full bundle | delta bundle | share | how model.onnx travels | bundler s | device s |",
             "|---|--:|--:|--:|---|--:|--:|"]
    for n, (name, (base, new)) in enumerate(cases.items()):
        config_only = not base.startswith(b"\x08")  # the config.pbtxt pair is text, not an ONNX protobuf
        v1, v2 = tmp / f"b{n}" / "v1", tmp / f"b{n}" / "v2"
        for folder, model in ((v1, MODEL.read_bytes() if config_only else base), (v2, MODEL.read_bytes() if config_only else new)):
            shutil.copytree(rendered, folder, ignore=shutil.ignore_patterns("__pycache__"))
            (folder / "model.onnx").write_bytes(model)
        common = dict(model_name="detect_detector", model_version="1.1.0", target="cpu", metadata_version=n + 1,
                      keys=[key], expires=expires, config_pbtxt=new.decode() if config_only else None)
        full = create_bundle(v2, tmp / f"b{n}" / "full.bundle", **common)
        delta, bundler_s = timed(lambda: create_bundle(v2, tmp / f"b{n}" / "delta.bundle", base_dir=v1,
                                                       base_model_version="1.0.0", **common))
        trust = TrustStore(tmp / f"b{n}" / "trust")
        trust.initialize(sign(make_root(version=1, expires=expires, root_keys=[root], root_threshold=1,
                                        bundle_keys=[key], bundle_threshold=1), [root]))
        result, device_s = timed(lambda: verify_bundle(delta, trust, tmp / f"b{n}" / "staging", base_dirs=[v1]))
        assert all(path.read_bytes() == (v2 / rel).read_bytes() for rel, path in result.files.items())
        size_full, size_delta = full.stat().st_size, delta.stat().st_size
        lines.append(f"| {name} | {size_full:,} | {size_delta:,} | {100 * size_delta / size_full:.1f}% | "
                     f"{result.delivery['model.onnx']} | {bundler_s:.1f} | {device_s:.2f} |")
        print(f"bundled: {name}", file=sys.stderr)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", type=int, default=D.FULL_LEVEL, help="zstd level for every zstd step")
    parser.add_argument("--out", help="append the results as a Markdown section to this file")
    args = parser.parse_args()
    D.PATCH_LEVEL = D.FULL_LEVEL = delta_onnx.TENSOR_LEVEL = args.level
    have_zstd = D.ZSTD_PATCH_FROM in D.available_methods()

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = build_cases(tmp)
        bundles = bundle_rows(tmp, cases) if have_zstd and D.BSDIFF4 in D.available_methods() else []
        for name, (base, new) in cases.items():
            if have_zstd:
                full, full_s = timed(D.full_file_size, new)
            else:
                full = len(zstd_cli([f"-{args.level}"], new))
            cells, best = [], ("full file", full)
            for method in D.ALL:
                got = measure(method, base, new, tmp, args.level)
                if isinstance(got, str):
                    cells.append((got, "-"))
                    continue
                size, make_s, apply_s, stand_in = got
                mark = "†" if stand_in else ""
                cells.append((f"{size:,}{mark} ({100 * size / len(new):.1f}%)", f"{make_s:.2f} / {apply_s:.2f}"))
                if size < best[1]:
                    best = (method, size)
            rows.append((name, len(new), changed_share(base, new), full, cells, best))
            print(f"measured: {name}", file=sys.stderr)

    methods = " | ".join(D.ALL)
    lines = [f"## Model delta sizes ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, zstd level {args.level})",
             "", "Fixture detector (8.2 MB fp32 ONNX; its dynamic int8 quantization is 2.4 MB). Sizes in bytes, delta "
             "header included, with the share of the new file; *weights changed* is the share of initializer bytes "
             "that differ from the same-named base tensor.", "",
             f"| change | new file | weights changed | zstd full file | {methods} | smallest |",
             "|---|---|---|---|" + "---|" * len(D.ALL) + "---|"]
    for name, size, share, full, cells, best in rows:
        lines.append(f"| {name} | {size:,} | {share} | {full:,} ({100 * full / size:.1f}%) | "
                     + " | ".join(c[0] for c in cells) + f" | {best[0]} |")
    lines += ["", "Time to make / apply each delta (seconds, one run):", "",
              f"| change | {methods} |", "|---|" + "---|" * len(D.ALL)]
    for name, _, _, _, cells, _ in rows:
        lines.append(f"| {name} | " + " | ".join(c[1] for c in cells) + " |")
    if bundles:
        lines += ["", "Whole bundles of the detector version folder (model.py, backends/, model.onnx; uncompressed "
                  "signed tar), full vs delta against the base version; *bundler s* includes trying every method, "
                  "*device s* is verify_bundle rebuilding v2 on top of v1 (checked byte for byte):", ""] + bundles
    installed = {"bsdiff4": D.BSDIFF4 in D.available_methods(), "zstandard": have_zstd}
    missing = [m for m, ok in installed.items() if not ok]
    if missing:
        notes.append(f"Not installed here: {', '.join(missing)}. † = measured with the zstd CLI "
                     f"({zstd_cli(['--version']).decode().strip() if shutil.which('zstd') else 'absent'}) at the same "
                     "level: `zstd --patch-from` for zstd-patch-from, sidecar.delta_onnx's onnx-tensor container piped "
                     "through `zstd` (without the structure dictionary) for onnx-tensor, and the zstd full file; "
                     "times include the CLI's process start and file I/O.")
    lines += ([""] + notes if notes else []) + ["", f"Command: `{' '.join(['python', 'benchmarks/delta_sizes.py', *sys.argv[1:]])}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
