"""builder.optimize.ort_variants: ONNX Runtime FP32/INT8/FP16 variants of the fixture detector.

INT8 builds use 3 fixture images (a few seconds each, the entropy KL search tens of seconds); they are built once
per test session and shared with test_int8_served and test_int8_emulated (tests/variants.py).
Findings these tests pin down are explained in docs/INT8.md.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from backends.postprocess.pipeline import postprocess_image
from backends.preprocess.image_ops import decode_image, prepare_input
from builder.device_class import host_class
from builder.errors import BuilderError
from builder.optimize import evaluate
from builder.optimize import ort_variants as ov
from builder.optimize.int8_classes import SATURATING_X86, exact_classes, settings_for
from builder.optimize.pipeline import DEFAULT_ACCURACY_FLOOR
from builder.optimize.manifest import sha256_file
from builder.optimize.calibration import CalibrationSet
from builder.optimize.variants import Variant
from builder.spec import load_spec
from tests.conftest import IMAGES, MODEL, SPEC
from tests.variants import ORT_CALIBRATION_IMAGES

CALIBRATION_IMAGES = ORT_CALIBRATION_IMAGES  # 3
BUILD_SECONDS: dict[str, float] = {}
HOST_ISA = settings_for(host_class()).ort  # what `edgestack optimize` builds for this machine's CPU class
PORTABLE_ISA = settings_for(SATURATING_X86[-1]).ort  # the settings of x86 classes without VNNI


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def calibration(shared_variants) -> CalibrationSet:
    return shared_variants.calibration(CALIBRATION_IMAGES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ort_variants")


def head_float_options(**fields) -> ov.QuantOptions:
    """QuantOptions as `edgestack optimize` builds them here: decode tail float, this CPU class's settings."""
    return ov.QuantOptions(**fields, **HOST_ISA, exclude_nodes=ov.default_head_exclusions(MODEL))


@pytest.fixture(scope="module")
def int8_builds(shared_variants):
    """One INT8 variant per ORT calibration method, as `edgestack optimize` builds it (head_float_options: the
    same builds test_int8_served serves), built once per session; seconds until ready recorded."""
    built = {}
    for method in ov.ORT_CALIBRATION_METHODS:
        start = time.perf_counter()
        built[method] = shared_variants.ort_int8(head_float_options(calibration=method), CALIBRATION_IMAGES)
        BUILD_SECONDS[method] = time.perf_counter() - start
    return built


@pytest.fixture(scope="module")
def int8_minmax_whole_graph(shared_variants):
    """ORT's min/max with QuantOptions' defaults otherwise: every node quantized, the decode tail too (the negative
    control of test_int8_served)."""
    return shared_variants.ort_int8(ov.QuantOptions(calibration="minmax"), CALIBRATION_IMAGES)


@pytest.fixture(scope="module")
def int8_head_float(int8_builds):
    """ORT's own min/max calibration, per-channel, decode tail in float, this CPU class's settings."""
    return int8_builds["minmax"]


def _fast(shared_variants, isa: dict):
    options = ov.QuantOptions(**ov.FAST_INT8, **isa, exclude_nodes=ov.default_head_exclusions(MODEL))
    return shared_variants.ort_int8(options, CALIBRATION_IMAGES)


@pytest.fixture(scope="module")
def fast_int8(shared_variants):
    """The FAST_INT8 recipe as `edgestack optimize` builds it here (int8-mean-quantile, this CPU class's settings)."""
    return _fast(shared_variants, HOST_ISA)


@pytest.fixture(scope="module")
def fast_int8_portable(shared_variants):
    """The recipe with the settings of x86 without VNNI (7-bit weights): exact on every CPU class, so its fidelity
    here is its fidelity on AVX2."""
    return _fast(shared_variants, PORTABLE_ISA)


@pytest.fixture(scope="module")
def fast_int8_full_range(shared_variants):
    """Full-range U8S8 weights, the x86-vnni settings: only a CPU whose kernels compute it exactly can judge it."""
    if host_class() not in exact_classes(ov.QuantOptions(**ov.FAST_INT8)):
        pytest.skip(f"full-range U8S8 saturates in the U8S8 kernels of {host_class()} (no VNNI): measured only where "
                    "it is exact (docs/INT8.md)")
    return _fast(shared_variants, {})


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def image_input(spec, name: str):
    return prepare_input(decode_image((IMAGES / name).read_bytes(), spec.limits), spec.input)


def detect(spec, sess: ort.InferenceSession, name: str):
    tensor, transform = image_input(spec, name)
    raw = sess.run([spec.output.name], {spec.input_name: tensor[None]})[0]
    return postprocess_image(raw[0], spec.output.format, transform, num_classes=len(spec.classes),
                             score_threshold=spec.thresholds.score, iou_threshold=spec.thresholds.iou,
                             max_detections=spec.thresholds.max_detections, class_agnostic=spec.thresholds.class_agnostic)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- QuantOptions


def test_default_options_and_name():
    options = ov.QuantOptions()
    assert (options.calibration, options.per_channel, options.quant_format) == ("entropy", True, "qdq")
    assert (options.activation_type, options.weight_type, options.symmetric_activations) == ("uint8", "int8", False)
    assert options.name == "int8-entropy-pc"


@pytest.mark.parametrize("changes,name", [
    ({"calibration": "minmax", "per_channel": False}, "int8-minmax-pt"),
    ({"calibration": "percentile"}, "int8-percentile-pc"),
    ({"calibration": "percentile", "percentile": 99.99}, "int8-p99.99-pc"),
    ({"quant_format": "qoperator"}, "int8-entropy-pc-qop"),
    ({"activation_type": "int8", "symmetric_activations": True}, "int8-entropy-pc-s8-sym"),
    ({"weight_type": "uint8", "reduce_range": True}, "int8-entropy-pc-wu8-rr"),
    ({"calibration": "mean-quantile"}, "int8-mean-quantile-pc"),
    ({"calibration": "mean-quantile", "outlier_prob": 1e-3}, "int8-mean-quantile0.001-pc"),
    (ov.FAST_INT8, "int8-mean-quantile-pc-resizef32-mulfold-peaklogits"),
    ({"fold_scalar_muls": True}, "int8-entropy-pc-mulfold"),
])
def test_names_say_what_changed(changes, name):
    assert replace(ov.QuantOptions(), **changes).name == name


def test_names_are_filesystem_safe_and_distinct_per_exclusion_set():
    a = ov.QuantOptions(exclude_nodes=("tower_0/TopKV2", "tower_0/Sigmoid"))
    b = ov.QuantOptions(exclude_nodes=["tower_0/Sigmoid", "tower_0/TopKV2", "tower_0/Sigmoid"])
    c = ov.QuantOptions(exclude_nodes=("tower_0/TopKV2",))
    d = ov.QuantOptions(exclude_op_types=("Resize",))
    assert a == b and a.name == b.name  # order and duplicates do not matter
    assert len({a.name, c.name, d.name, ov.QuantOptions().name}) == 4
    for options in (a, c, d):
        assert "/" not in options.name and " " not in options.name
        Variant(options.name, "onnxruntime", "int8", Path("m.onnx"))  # the variant contract accepts the name


def test_as_dict_round_trips():
    options = ov.QuantOptions(calibration="percentile", percentile=99.9, exclude_nodes=("b", "a"), reduce_range=True,
                              fold_scalar_muls=True)
    data = options.as_dict()
    assert data["exclude_nodes"] == ["a", "b"] and data["percentile"] == 99.9
    assert ov.QuantOptions(**data) == options


@pytest.mark.parametrize("changes,message", [
    ({"calibration": "kl"}, "calibration"),
    ({"quant_format": "qnn"}, "quant_format"),
    ({"activation_type": "int16"}, "activation_type"),
    ({"weight_type": "fp8"}, "weight_type"),
    ({"per_channel": "yes"}, "per_channel"),
    ({"reduce_range": 1}, "reduce_range"),
    ({"symmetric_activations": None}, "symmetric_activations"),
    ({"percentile": 101.0}, "percentile"),
    ({"percentile": 10}, "percentile"),
    ({"percentile": True}, "percentile"),
    ({"exclude_nodes": "tower_0/TopKV2"}, "exclude_nodes"),
    ({"exclude_nodes": ("",)}, "exclude_nodes"),
    ({"exclude_op_types": (3,)}, "exclude_op_types"),
    ({"activation_type": "int8", "weight_type": "uint8"}, "S8U8"),
    ({"float_resize": True}, "needs calibration='mean-quantile'"),
    ({"calibration": "mean-quantile", "float_resize": True, "quant_format": "qoperator"}, "must be 'qdq'"),
    ({"fold_scalar_muls": True, "quant_format": "qoperator"}, "must be 'qdq'"),
    ({"fold_scalar_muls": 1}, "fold_scalar_muls"),
    ({"peaks_on_logits": True, "quant_format": "qoperator"}, "must be 'qdq'"),
    ({"peaks_on_logits": "yes"}, "peaks_on_logits"),
    ({"outlier_prob": 0.2}, "outlier_prob"),
    ({"outlier_prob": -1e-4}, "outlier_prob"),
])
def test_invalid_options_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ov.QuantOptions(**changes)


# ------------------------------------------------------------------------------------------- INT8


@pytest.mark.parametrize("method", ov.ORT_CALIBRATION_METHODS)
def test_int8_builds_with_each_calibration_method(int8_builds, calibration, method):
    variant = int8_builds[method]
    assert variant.name == head_float_options(calibration=method).name and variant.name.startswith(f"int8-{method}-pc-")
    assert (variant.runtime, variant.precision, variant.targets) == ("onnxruntime", "int8", ("cpu",))
    assert variant.path.name == "model.onnx" and variant.path.is_file()
    assert leftovers(variant.path.parent) == ["model.onnx"]
    options = variant.options
    assert options["calibration"] == method
    assert options["calibration_sha256"] == calibration.sha256
    assert options["calibration_count"] == CALIBRATION_IMAGES
    assert options["calibration_images"] == [p.name for p in calibration.paths]
    assert options["per_channel"] is True and options["ort_extra_options"]["WeightSymmetric"] is True
    assert options["exclude_nodes"] == list(ov.default_head_exclusions(MODEL))
    assert options["reduce_range"] is bool(HOST_ISA.get("reduce_range"))
    assert options["sha256"] == sha256_file(variant.path)
    assert json.loads(json.dumps(options)) == options  # save_variant writes it as JSON
    print(f"build_int8 {method}: {BUILD_SECONDS[method]:.1f} s with {CALIBRATION_IMAGES} images")


def test_entropy_is_a_kl_search_not_minmax(int8_builds):
    """Through quantize_static alone ORT 1.22's entropy is min/max (128 bins = 128 quantized bins, one candidate);
    build_int8 runs the KL search over 2048-bin histograms and hands quantize_static the ranges."""
    entropy = int8_builds["entropy"].options
    assert entropy["sha256"] != int8_builds["minmax"].options["sha256"]
    assert entropy["sha256"] != int8_builds["percentile"].options["sha256"]
    assert "KL divergence over 2048-bin histograms" in entropy["calibration_effective"]
    assert entropy["range_overrides"]["tensors"] > 200  # every calibrated tensor gets its KL range


def test_kl_search_is_orts_entropy_threshold():
    """ort_entropy.kl_threshold (array operations) picks the range ORT's EntropyCalibrater (Python loops) picks."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from builder.optimize.ort_entropy import kl_threshold

    rng = np.random.default_rng(0)
    samples = [rng.normal(size=20000), np.maximum(rng.standard_t(3, size=30000), 0), rng.exponential(size=5000) - 0.2]
    for data in samples:
        collector = HistogramCollector("entropy", False, 2048, 128, 99.999, "same")
        collector.collect_value({"t": data.astype(np.float32)})
        histogram = collector.histogram_dict["t"]
        expected = collector.get_entropy_threshold(histogram, 128)
        got = kl_threshold(histogram[0], histogram[1], float(histogram[2]), float(histogram[3]))
        assert got == pytest.approx((float(expected[0]), float(expected[1])), rel=1e-6)
        assert got != pytest.approx((float(data.min()), float(data.max())))  # a real search: not min/max


def test_integer_kernels_are_what_ort_executes(int8_minmax_whole_graph):
    counts = ov.quantized_op_counts(int8_minmax_whole_graph.path)
    assert counts == int8_minmax_whole_graph.options["quantized_ops"]
    in_file, executed = counts["file"], counts["executed"]
    # QDQ file: Q/DQ pairs around float ops, no integer op written yet
    assert in_file["QuantizeLinear"] > 100 and in_file["DequantizeLinear"] > 100 and in_file["integer_total"] == 0
    assert in_file["float_conv"] == 0  # every Conv is fed by DequantizeLinear on both data and weights
    # what runs: ORT fused every DQ -> Conv -> Q into QLinearConv; no float Conv is left
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(MODEL)).graph.node)
    assert executed["integer_ops"]["QLinearConv"] == convs == 89
    assert executed["float_conv"] == 0
    assert executed["QuantizeLinear"] + executed["DequantizeLinear"] < 30  # only at the float islands


def test_fp32_counts_show_no_integer_kernels():
    counts = ov.quantized_op_counts(MODEL)
    assert counts["executed"]["integer_total"] == 0 and counts["executed"]["float_conv"] == 89
    with pytest.raises(ValueError, match="level"):
        ov.quantized_op_counts(MODEL, level="ORT_ENABLE_BASIC")


def test_same_variant_twice_gives_the_same_bytes(spec, calibration, int8_minmax_whole_graph, workdir):
    again = ov.build_int8(MODEL, workdir / "minmax-again", calibration, spec.input_name,
                          ov.QuantOptions(calibration="minmax"))
    assert again.options["sha256"] == int8_minmax_whole_graph.options["sha256"]
    assert again.path.read_bytes() == int8_minmax_whole_graph.path.read_bytes()


def test_head_exclusions_are_the_decode_tail():
    tail = ov.default_head_exclusions(MODEL)
    graph = onnx.load(str(MODEL)).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert set(tail) <= set(ops) and list(tail) == sorted(tail)
    kinds = {ops[name] for name in tail}
    assert {"TopK", "Gather", "Sigmoid", "MaxPool", "Equal", "Concat"} <= kinds
    assert "Conv" not in kinds
    producers = {o: n.name for n in graph.node for o in n.output}
    assert {producers[o.name] for o in graph.output} <= set(tail)  # every output is produced by the tail


def test_head_float_variant_keeps_the_tail_float(int8_head_float):
    executed = int8_head_float.options["quantized_ops"]["executed"]
    assert executed["integer_ops"]["QLinearConv"] == 89  # the convs feeding the heads stay INT8
    assert int8_head_float.options["exclude_nodes"] == list(ov.default_head_exclusions(MODEL))
    assert int8_head_float.options["exclusions_requantized_by_ort"] == []


CONFIDENT = 0.6  # FP32 classes this sure must survive INT8; nearer the 0.35 threshold they may go (china.jpg's 0.51 bird)


def fidelity(spec, path: Path, images: list[Path]) -> float:
    detections = [evaluate.detect_images(onnx_detector(spec, p), spec, images) for p in (MODEL, path)]
    return evaluate.fidelity_map(*detections, reference_score_threshold=spec.thresholds.score)["map50"]


def onnx_detector(spec, path: Path):
    from backends.detector.onnx_runner import OnnxDetector

    return OnnxDetector(session(path), spec.input_name, spec.output.name, 1)


def all_images() -> list[Path]:
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))


@pytest.mark.slow  # the variant fixtures are requested by name: the shared_variants marking cannot see them
@pytest.mark.parametrize("variant", ["fast_int8", "fast_int8_portable", "fast_int8_full_range"])
def test_fast_int8_keeps_fp32s_confident_classes_and_meets_the_floor(request, spec, variant):
    """Expectations from FP32 on this machine: on each photo INT8 finds every class FP32 finds with score >=
    CONFIDENT, and its fidelity mAP@0.5 on the 14 photos (which weighs the boxes) meets `edgestack optimize`'s
    default floor. fast_int8_portable is exact on every CPU class, so this is its result on AVX2 too."""
    path = request.getfixturevalue(variant).path
    fp32, int8 = session(MODEL), session(path)
    checked = 0
    for image in all_images():
        _, scores, classes = detect(spec, fp32, image.name)
        confident = {spec.classes[c] for c in classes[scores >= CONFIDENT]}
        found = {spec.classes[c] for c in detect(spec, int8, image.name)[2]}
        assert confident <= found, f"{variant} loses FP32's {sorted(confident - found)} on {image.name}"
        checked += len(confident)
    assert checked >= 3  # enough confident objects for the check to mean something
    measured = fidelity(spec, path, all_images())
    print(f"{variant}: fidelity mAP@0.5 {measured:.3f} on {len(all_images())} photos")
    assert measured >= DEFAULT_ACCURACY_FLOOR


@pytest.mark.slow
def test_an_excluded_conv_between_quantized_neighbours_is_requantized_by_ort(spec, calibration, workdir):
    """ORT's WeightBiasQuantization gives a float Conv between DQ and Q per-tensor int8 weights at load.

    Seen in ORT 1.22 on the bias-less separable depthwise convs of the head; convs with a bias stay float."""
    lone = "tower_0/CenternetHead/c2_reverse/3x3/separable_conv2d/depthwise"
    one_image = CalibrationSet(calibration.paths[:1], calibration.tensors[:1], "one-image")
    variant = ov.build_int8(MODEL, workdir / "lone", one_image, spec.input_name,
                            ov.QuantOptions(calibration="minmax", exclude_nodes=(lone,)))
    assert variant.options["exclusions_requantized_by_ort"] == [lone]
    assert variant.options["quantized_ops"]["file"]["float_conv"] == 1  # float in the file ...
    assert variant.options["quantized_ops"]["executed"]["float_conv"] == 0  # ... integer when it runs


# ------------------------------------------------------------------------------------------- FAST_INT8 recipe


def test_fast_recipe_runs_every_conv_in_int8_and_the_resizes_in_float(fast_int8):
    options = fast_int8.options
    assert fast_int8.name.startswith("int8-mean-quantile-pc-") and "-resizef32-mulfold-peaklogits-x" in fast_int8.name
    assert options["reduce_range"] is bool(HOST_ISA.get("reduce_range"))
    assert options["peak_pools_on_logits"] == ["tower_0/max_pooling2d/MaxPool"]
    executed = options["quantized_ops"]["executed"]
    assert executed["integer_ops"]["QLinearConv"] == 89 and executed["float_conv"] == 0
    assert options["resize_executed"] == {"float": 3, "integer": 0}
    assert options["float_resize_nodes"] == ["Resize__387", "Resize__412", "Resize__437"]
    # x * 1/6 of 20 hard-swishes and 8 squeeze-excite hard-sigmoids: all became scale changes
    assert len(options["folded_muls"]) == 28
    assert all(n.endswith(("hard_swish/mul", "squeeze_excite/Conv_1/mul")) for n in options["folded_muls"])
    assert executed["integer_ops"]["QLinearMul"] == 57 - 28
    assert executed["QuantizeLinear"] + executed["DequantizeLinear"] <= 12  # the float islands only
    assert options["range_overrides"]["tensors"] > 200
    assert "mean over images" in options["calibration_effective"]
    assert json.loads(json.dumps(options)) == options


def test_fast_recipe_scores_are_not_capped_at_the_float_tails_seam(spec, fast_int8_portable):
    """The class logits handed to the float decode tail take the extremes of the calibration images: with mean
    quantiles their uint8 range ended at 0 and every detection above sigmoid(0) scored exactly 0.5."""
    seam = "tower_0/CenternetHead/centernet_cls_output/BiasAdd_BiasAdd__107:0"
    assert seam in fast_int8_portable.options["float_tail_inputs"]
    fp32, int8 = session(MODEL), session(fast_int8_portable.path)
    fp32_best = max(float(detect(spec, fp32, p.name)[1].max(initial=0)) for p in all_images())
    int8_scores = np.concatenate([detect(spec, int8, p.name)[1] for p in all_images()])
    assert fp32_best > 0.55, "the check needs FP32 detections well above 0.5"
    assert int8_scores.max() > 0.52 and np.count_nonzero(int8_scores == np.float32(0.5)) <= 1


def test_fast_recipe_is_closer_to_fp32_than_orts_minmax(spec, fast_int8, int8_head_float):
    """Same calibration images, same decode tail kept float, same CPU-class settings: only the ranges and the
    rewrites differ, and they are what keeps the detections (docs/INT8.md)."""
    images = all_images()
    assert fidelity(spec, fast_int8.path, images) > fidelity(spec, int8_head_float.path, images)


def test_optimize_builds_the_same_fast_recipe_bytes(spec, calibration, fast_int8, tmp_path):
    """`edgestack optimize --variants int8-mean-quantile` builds this recipe, and the build is reproducible."""
    from builder.optimize.pipeline import KNOWN_VARIANTS, OptimizeSettings, _builders

    assert "int8-mean-quantile" in KNOWN_VARIANTS
    settings = OptimizeSettings(calibration_dir=IMAGES, eval_dir=IMAGES, out_dir=tmp_path, variants=("int8-mean-quantile",))
    again = _builders(spec, settings, calibration)["int8-mean-quantile"](tmp_path / "int8-mean-quantile")
    assert again.name == fast_int8.name
    assert again.path.read_bytes() == fast_int8.path.read_bytes()


# ------------------------------------------------------------------------------------------- failures


def test_failing_build_leaves_nothing(spec, calibration, tmp_path):
    wrong = CalibrationSet(calibration.paths[:1], (np.zeros((1, 32, 32, 3), np.float32),), "wrong-shape")
    out = tmp_path / "variants" / "int8"
    with pytest.raises(ov.QuantizationError, match="could not quantize"):
        ov.build_int8(MODEL, out, wrong, spec.input_name, ov.QuantOptions(calibration="minmax"))
    assert not out.exists()
    assert leftovers(tmp_path / "variants") == []  # no staging folder left beside it either


def test_failing_rebuild_keeps_the_previous_variant(spec, calibration, tmp_path):
    out = tmp_path / "int8"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous complete build")
    wrong = CalibrationSet(calibration.paths[:1], (np.zeros((1, 32, 32, 3), np.float32),), "wrong-shape")
    with pytest.raises(ov.QuantizationError):
        ov.build_int8(MODEL, out, wrong, spec.input_name, ov.QuantOptions(calibration="minmax"))
    assert (out / "model.onnx").read_bytes() == b"previous complete build"
    assert leftovers(tmp_path) == ["int8"]


@pytest.mark.parametrize("kwargs,error,message", [
    ({"input_name": "images"}, BuilderError, "has no input 'images'"),
    ({"options": ov.QuantOptions(exclude_nodes=("no/such/node",))}, BuilderError, "no/such/node"),
])
def test_bad_arguments_fail_before_any_work(spec, calibration, tmp_path, kwargs, error, message):
    arguments = {"input_name": spec.input_name, "options": ov.QuantOptions(), **kwargs}
    with pytest.raises(error, match=message):
        ov.build_int8(MODEL, tmp_path / "int8", calibration, **arguments)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_uint8_per_channel_weights_that_ort_cannot_run_are_refused(spec, calibration, tmp_path):
    """ORT gives all-zero weight channels zero point 0 and the others 127; QLinearConv refuses mixed zero points."""
    one_image = CalibrationSet(calibration.paths[:1], calibration.tensors[:1], "one-image")
    with pytest.raises(ov.QuantizationError, match="cannot run"):
        ov.build_int8(MODEL, tmp_path / "u8u8", one_image, spec.input_name,
                      ov.QuantOptions(calibration="minmax", weight_type="uint8"))
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- FP32 / FP16


def test_fp32_equals_the_source(spec, tmp_path):
    variant = ov.build_fp32(MODEL, tmp_path / "fp32")
    assert (variant.name, variant.precision, variant.targets) == ("fp32", "fp32", ("cpu", "nvidia-gpu", "jetson"))
    assert variant.options["optimization_level"] == "ORT_ENABLE_BASIC"
    assert leftovers(tmp_path / "fp32") == ["model.onnx"]
    source, built = session(MODEL), session(variant.path)
    for image in ("dog.jpg", "horses.jpg", "camera.png"):
        tensor, _ = image_input(spec, image)
        for a, b in zip(source.run(None, {spec.input_name: tensor[None]}), built.run(None, {spec.input_name: tensor[None]})):
            np.testing.assert_array_equal(a, b)


def test_fp16_runs_on_cpu_close_to_fp32(spec, tmp_path):
    variant = ov.build_fp16(MODEL, tmp_path / "fp16")
    assert (variant.precision, variant.targets) == ("fp16", ("nvidia-gpu", "jetson"))
    assert variant.options["keep_io_types"] is True and variant.options["converter"]
    model = onnx.load(str(variant.path))
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) > 80
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*model.graph.input, *model.graph.output])
    source, half = session(MODEL), session(variant.path)
    for image in ("dog.jpg", "horses.jpg"):
        tensor, _ = image_input(spec, image)
        wh, keypoints, _ = source.run(None, {spec.input_name: tensor[None]})
        wh16, keypoints16, _ = half.run(None, {spec.input_name: tensor[None]})
        np.testing.assert_allclose(keypoints16, keypoints, atol=5e-3)
        np.testing.assert_allclose(wh16, wh, atol=0.5, rtol=1e-2)
        boxes, scores, classes = detect(spec, source, image)
        boxes16, scores16, classes16 = detect(spec, half, image)
        np.testing.assert_array_equal(classes16, classes)
        np.testing.assert_allclose(scores16, scores, atol=5e-3)
        np.testing.assert_allclose(boxes16, boxes, atol=2.0)
