"""builder.triton_config (dataclasses) -> triton_config_render (Triton protobuf, config.pbtxt) and back with
triton_config_parse."""
from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.errors import BuilderError, ConfigError, SpecError, TargetError
from builder.triton_config import (
    DynamicBatching,
    EnsembleStep,
    ExecutionAccelerator,
    InstanceGroup,
    ModelConfig,
    ModelWarmup,
    Optimization,
    TensorConfig,
    WarmupInput,
    triton_dtype,
)
from builder.triton_config_parse import parse
from builder.triton_config_render import dict_to_proto, render, to_dict, to_proto, write_config


def raw(text: str) -> model_config_pb2.ModelConfig:
    """Parse with protobuf alone, so the checks do not depend on our own parser."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def python_model() -> ModelConfig:
    return ModelConfig(
        name="preprocess",
        backend="python",
        max_batch_size=16,
        inputs=(
            TensorConfig("IMAGE", "BYTES", (1,)),
            TensorConfig("ROI", "float32", (4,), optional=True),
        ),
        outputs=(
            TensorConfig("TENSOR", "FP32", (3, 640, 640)),
            TensorConfig("TRANSFORM", "TYPE_FP32", (6,)),
        ),
        instance_groups=(InstanceGroup("KIND_CPU", 4), InstanceGroup("KIND_GPU", 1, (0, 1))),
        dynamic_batching=DynamicBatching((4, 8), 500, preserve_ordering=True),
        parameters={"resize_mode": "letterbox", "EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env.tar.gz"},
        warmup=(
            ModelWarmup("zeros", 4, {"IMAGE": WarmupInput("BYTES", (1,), input_data_file="sample.jpg"),
                                     "ROI": WarmupInput("FP32", (4,), zero_data=True)}),
            ModelWarmup("random", 1, {"ROI": WarmupInput("float32", (4,), random_data=True)}),
        ),
        default_model_filename="model.py",
        version_policy_latest=2,
    )


def onnx_model() -> ModelConfig:
    return ModelConfig(
        name="detector_onnx",
        platform="onnxruntime_onnx",
        max_batch_size=8,
        inputs=(TensorConfig("images", "FP32", (3, 640, 640)),),
        outputs=(TensorConfig("output0", "FP32", (84, -1)),),
        instance_groups=(InstanceGroup("KIND_GPU", 1),),
        optimization=Optimization(
            gpu_accelerators=(ExecutionAccelerator("tensorrt", {"precision_mode": "FP16",
                                                                "max_workspace_size_bytes": "1073741824"}),),
            cpu_accelerators=(ExecutionAccelerator("openvino", {}),),
        ),
        default_model_filename="model.onnx",
    )


def trt_model() -> ModelConfig:
    return ModelConfig(
        name="detector_trt",
        platform="tensorrt_plan",
        max_batch_size=4,
        inputs=(TensorConfig("images", "FP16", (3, 640, 640)),),
        outputs=(TensorConfig("output0", "FP16", (84, 8400)),),
        instance_groups=(InstanceGroup("KIND_GPU", 2, (0,)),),
        dynamic_batching=DynamicBatching(),
    )


def ensemble(**overrides) -> ModelConfig:
    steps = (
        EnsembleStep("preprocess", {"IMAGE": "RAW_IMAGE"}, {"TENSOR": "tensor", "TRANSFORM": "transform"}),
        EnsembleStep("detector", {"images": "tensor"}, {"output0": "raw_detections"}, model_version=1),
        EnsembleStep("postprocess", {"RAW": "raw_detections", "TRANSFORM": "transform"},
                     {"DETECTIONS": "DETECTIONS"}),
    )
    fields = dict(
        name="detect",
        platform="ensemble",
        max_batch_size=8,
        inputs=(TensorConfig("RAW_IMAGE", "BYTES", (1,)),),
        outputs=(TensorConfig("DETECTIONS", "FP32", (-1, 6)),),
        ensemble_steps=steps,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [python_model, onnx_model, trt_model, ensemble])
def test_round_trip(factory):
    config = factory()
    text = render(config)
    assert parse(text) == config
    assert render(parse(text)) == text


def test_python_model_rendered_fields():
    message = raw(render(python_model()))
    assert message.backend == "python" and message.platform == ""
    assert message.max_batch_size == 16
    assert [i.name for i in message.input] == ["IMAGE", "ROI"]
    assert message.input[0].data_type == model_config_pb2.TYPE_STRING
    assert message.input[1].data_type == model_config_pb2.TYPE_FP32
    assert message.input[1].optional is True
    assert list(message.output[0].dims) == [3, 640, 640]
    assert [(g.kind, g.count, list(g.gpus)) for g in message.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 4, []),
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [0, 1]),
    ]
    assert list(message.dynamic_batching.preferred_batch_size) == [4, 8]
    assert message.dynamic_batching.max_queue_delay_microseconds == 500
    assert message.dynamic_batching.preserve_ordering is True
    assert message.parameters["resize_mode"].string_value == "letterbox"
    assert message.model_warmup[0].batch_size == 4
    warm = message.model_warmup[0].inputs
    assert warm["IMAGE"].input_data_file == "sample.jpg"
    assert warm["ROI"].WhichOneof("input_data_type") == "zero_data"
    assert message.model_warmup[1].inputs["ROI"].WhichOneof("input_data_type") == "random_data"
    assert message.version_policy.latest.num_versions == 2
    assert message.default_model_filename == "model.py"


def test_onnx_model_with_tensorrt_accelerator():
    message = raw(render(onnx_model()))
    assert message.platform == "onnxruntime_onnx" and message.backend == ""
    gpu = message.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in gpu] == ["tensorrt"]
    assert dict(gpu[0].parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}
    cpu = message.optimization.execution_accelerators.cpu_execution_accelerator
    assert [a.name for a in cpu] == ["openvino"]
    assert list(message.output[0].dims) == [84, -1]


def test_tensorrt_plan_on_gpu():
    message = raw(render(trt_model()))
    assert message.platform == "tensorrt_plan"
    assert message.input[0].data_type == model_config_pb2.TYPE_FP16
    group = message.instance_group[0]
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (group.count, list(group.gpus)) == (2, [0])
    assert message.HasField("dynamic_batching")


def test_tensorrt_refuses_cpu_instances():
    with pytest.raises(ConfigError, match="KIND_GPU"):
        dataclasses.replace(trt_model(), instance_groups=(InstanceGroup("KIND_CPU"),))


def test_ensemble_rendered_fields():
    message = raw(render(ensemble()))
    assert message.platform == "ensemble" and message.backend == ""
    assert message.WhichOneof("scheduling_choice") == "ensemble_scheduling"
    steps = message.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", "detector", "postprocess"]
    assert [s.model_version for s in steps] == [-1, 1, -1]
    assert dict(steps[2].input_map) == {"RAW": "raw_detections", "TRANSFORM": "transform"}
    assert dict(steps[0].output_map) == {"TENSOR": "tensor", "TRANSFORM": "transform"}
    assert len(message.instance_group) == 0


def test_to_dict_layout():
    d = to_dict(python_model())
    assert d["max_batch_size"] == 16
    assert d["input"][0] == {"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1]}
    assert d["instance_group"][1] == {"kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}
    assert d["parameters"]["resize_mode"] == {"string_value": "letterbox"}
    assert d["version_policy"] == {"latest": {"num_versions": 2}}
    assert d["model_warmup"][0]["inputs"]["ROI"] == {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}
    assert to_dict(ensemble())["ensemble_scheduling"]["step"][1]["model_name"] == "detector"
    assert to_dict(onnx_model())["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0][
        "name"] == "tensorrt"
    assert isinstance(to_proto(trt_model()), model_config_pb2.ModelConfig)


def test_scalar_reshape_round_trips():
    config = ModelConfig(name="m", backend="python", max_batch_size=2,
                         inputs=(TensorConfig("X", "INT64", (1,), reshape=()),),
                         outputs=(TensorConfig("Y", "INT64", (1,), reshape=(1, 1)),))
    message = raw(render(config))
    assert message.input[0].HasField("reshape") and list(message.input[0].reshape.shape) == []
    assert list(message.output[0].reshape.shape) == [1, 1]
    assert parse(render(config)) == config


def test_write_config(tmp_path):
    path = write_config(trt_model(), tmp_path / "detector_trt")
    assert path == tmp_path / "detector_trt" / "config.pbtxt"
    assert parse(path.read_text()) == trt_model()
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.pbtxt"]


# -- normalisation -------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("TYPE_FP32", "TYPE_FP32"), ("FP32", "TYPE_FP32"), ("float32", "TYPE_FP32"), ("fp16", "TYPE_FP16"),
    ("float16", "TYPE_FP16"), ("BYTES", "TYPE_STRING"), ("TYPE_STRING", "TYPE_STRING"),
    ("object", "TYPE_STRING"), ("BOOL", "TYPE_BOOL"), ("bool", "TYPE_BOOL"), ("INT32", "TYPE_INT32"),
    ("int64", "TYPE_INT64"), ("UINT8", "TYPE_UINT8"), ("float64", "TYPE_FP64"), ("BF16", "TYPE_BF16"),
])
def test_dtype_names(given, expected):
    assert triton_dtype(given) == expected
    assert TensorConfig("T", given, (1,)).data_type == expected


def test_numpy_dtype_objects():
    np = pytest.importorskip("numpy")
    assert triton_dtype(np.float32) == "TYPE_FP32"
    assert triton_dtype(np.dtype("uint8")) == "TYPE_UINT8"


def test_lists_become_tuples_and_kinds_normalise():
    tensor = TensorConfig("T", "FP32", [1, -1], reshape=[2])
    assert tensor.dims == (1, -1) and tensor.reshape == (2,)
    assert InstanceGroup("gpu", 1, [0]).kind == "KIND_GPU"
    assert InstanceGroup("KIND_AUTO").kind == "KIND_AUTO"


def test_kind_auto_round_trips():
    config = dataclasses.replace(python_model(), instance_groups=(InstanceGroup("KIND_AUTO", 3),))
    assert parse(render(config)).instance_groups == (InstanceGroup("KIND_AUTO", 3),)


# -- validation ----------------------------------------------------------------------------------

def test_error_tree():
    for error in (SpecError, ConfigError, TargetError):
        assert issubclass(error, BuilderError)


@pytest.mark.parametrize("dtype", ["float", "TYPE_INVALID", "complex64", "FP8", ""])
def test_bad_dtype(dtype):
    with pytest.raises(ConfigError, match="unknown data type"):
        TensorConfig("T", dtype, (1,))


@pytest.mark.parametrize("dims, message", [((0,), "positive or -1"), ((-2,), ">= -1"), ((), "must not be empty"),
                                           ((1.5,), "integer"), ("3", "sequence")])
def test_bad_dims(dims, message):
    with pytest.raises(ConfigError, match=message):
        TensorConfig("T", "FP32", dims)


def test_duplicate_tensor():
    with pytest.raises(ConfigError, match="duplicate input tensor name 'IMAGE'"):
        dataclasses.replace(python_model(), inputs=(TensorConfig("IMAGE", "BYTES", (1,)),
                                                    TensorConfig("IMAGE", "FP32", (3,))))
    with pytest.raises(ConfigError, match="duplicate output tensor name 'Y'"):
        ModelConfig(name="m", backend="python", outputs=(TensorConfig("Y", "FP32", (1,)),) * 2)


def test_ensemble_step_reads_missing_tensor():
    config = ensemble()
    steps = list(config.ensemble_steps)
    steps[1] = EnsembleStep("detector", {"images": "tensr"}, {"output0": "raw_detections"})
    with pytest.raises(ConfigError, match=r"step 1 \(detector\) reads 'tensr' for its input 'images'.*"
                                          r"neither an ensemble input"):
        ensemble(ensemble_steps=tuple(steps))


def test_ensemble_output_nobody_produces():
    with pytest.raises(ConfigError, match="ensemble output 'SCORES' is not produced by any step"):
        ensemble(outputs=(TensorConfig("DETECTIONS", "FP32", (-1, 6)), TensorConfig("SCORES", "FP32", (-1,))))


def test_ensemble_tensor_produced_twice():
    config = ensemble()
    extra = EnsembleStep("other", {"images": "tensor"}, {"out": "raw_detections"})
    with pytest.raises(ConfigError, match=r"'raw_detections' is produced twice: by step 1 \(detector\) and step 3"):
        ensemble(ensemble_steps=config.ensemble_steps + (extra,))


def test_ensemble_step_overwrites_input():
    bad = EnsembleStep("x", {"a": "RAW_IMAGE"}, {"b": "RAW_IMAGE"})
    with pytest.raises(ConfigError, match="already an ensemble input"):
        ensemble(ensemble_steps=ensemble().ensemble_steps + (bad,))


def test_ensemble_cycle():
    steps = (EnsembleStep("a", {"i": "RAW_IMAGE", "j": "from_b"}, {"o": "from_a"}),
             EnsembleStep("b", {"i": "from_a"}, {"o": "from_b"}),
             EnsembleStep("c", {"i": "from_b"}, {"o": "DETECTIONS"}))
    with pytest.raises(ConfigError, match="cycle"):
        ensemble(ensemble_steps=steps)


def test_ensemble_rules():
    with pytest.raises(ConfigError, match="cannot have instance groups or dynamic batching"):
        ensemble(instance_groups=(InstanceGroup(),))
    with pytest.raises(ConfigError, match="cannot have instance groups or dynamic batching"):
        ensemble(dynamic_batching=DynamicBatching())
    with pytest.raises(ConfigError, match='needs platform "ensemble"'):
        ensemble(platform=None, backend="python")
    with pytest.raises(ConfigError, match="at least one ensemble step"):
        ensemble(ensemble_steps=())
    with pytest.raises(ConfigError, match="input_map must not be empty"):
        EnsembleStep("x", {}, {"o": "t"})


def test_preferred_batch_above_max():
    with pytest.raises(ConfigError, match=r"preferred_batch_size \[32\] exceeds max_batch_size 16"):
        dataclasses.replace(python_model(), dynamic_batching=DynamicBatching((8, 32)))


def test_dynamic_batching_needs_batching_model():
    with pytest.raises(ConfigError, match="dynamic batching needs max_batch_size > 0"):
        ModelConfig(name="m", backend="python", max_batch_size=0, dynamic_batching=DynamicBatching())


def test_backend_and_platform():
    with pytest.raises(ConfigError, match="exactly one of backend or platform.*'onnxruntime'.*'onnxruntime_onnx'"):
        ModelConfig(name="m", backend="onnxruntime", platform="onnxruntime_onnx")
    with pytest.raises(ConfigError, match="exactly one of backend or platform"):
        ModelConfig(name="m")


def test_other_rules():
    with pytest.raises(ConfigError, match="exactly one of zero_data, random_data, input_data_file"):
        WarmupInput("FP32", (1,), zero_data=True, random_data=True)
    with pytest.raises(ConfigError, match="exactly one of zero_data"):
        WarmupInput("FP32", (1,))
    with pytest.raises(ConfigError, match="not a model input"):
        dataclasses.replace(python_model(), warmup=(ModelWarmup("w", 1, {"NOPE": WarmupInput("FP32", (1,),
                                                                                              zero_data=True)}),))
    with pytest.raises(ConfigError, match="batch_size 32 exceeds max_batch_size 16"):
        dataclasses.replace(python_model(), warmup=(ModelWarmup("w", 32, {"ROI": WarmupInput("FP32", (4,),
                                                                                              zero_data=True)}),))
    with pytest.raises(ConfigError, match="kind must be one of"):
        InstanceGroup("KIND_TPU")
    with pytest.raises(ConfigError, match="only be given with KIND_GPU"):
        InstanceGroup("KIND_CPU", 1, (0,))
    with pytest.raises(ConfigError, match="count must be >= 1"):
        InstanceGroup("KIND_CPU", 0)
    with pytest.raises(ConfigError, match="cannot be optional"):
        ModelConfig(name="m", backend="python", outputs=(TensorConfig("Y", "FP32", (1,), optional=True),))
    with pytest.raises(ConfigError, match="empty reshape needs max_batch_size > 0"):
        ModelConfig(name="m", backend="python", inputs=(TensorConfig("X", "FP32", (1,), reshape=()),))
    with pytest.raises(ConfigError, match=r"parameters\['k'\] must be a string"):
        ModelConfig(name="m", backend="python", parameters={"k": 1})


# -- protobuf boundary ---------------------------------------------------------------------------

def test_unknown_field_in_dict_maps_to_config_error():
    data = to_dict(python_model())
    data["input"][0]["colour"] = "blue"
    with pytest.raises(ConfigError, match="Triton's ModelConfig schema.*colour"):
        dict_to_proto(data)


def test_bad_enum_in_dict_maps_to_config_error(monkeypatch):
    import builder.triton_config_render as tc

    def broken(config):
        data = to_dict(config)
        data["instance_group"][0]["kind"] = "KIND_TPU"
        return data

    monkeypatch.setattr(tc, "to_dict", broken)
    with pytest.raises(ConfigError, match="KIND_TPU"):
        tc.render(python_model())


@pytest.mark.parametrize("text, message", [
    ('name: "m" backend: "python" bogus_field: 1', "not a valid Triton model configuration"),
    ('name: "m" backend: "python" input { name: "X" data_type: TYPE_NOPE dims: 1 }', "not a valid Triton"),
    ('name: "m" backend: "python" sequence_batching { }', r"\['sequence_batching'\] are not supported"),
    ('name: "m" backend: "python" version_policy { all { } }', "only 'latest' is supported"),
    ('name: "m" backend: "python" input { name: "X" dims: 1 }', "unknown data type 'TYPE_INVALID'"),
    ('name: "m" platform: "ensemble"', "at least one ensemble step"),
])
def test_parse_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_parse_hand_written_config():
    text = """
    name: "detector"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [ { name: "images", data_type: TYPE_FP32, dims: [ 3, 640, 640 ] } ]
    output [ { name: "output0", data_type: TYPE_FP32, dims: [ 84, -1 ] } ]
    instance_group [ { kind: KIND_GPU, count: 1 } ]
    dynamic_batching { max_queue_delay_microseconds: 100 }
    optimization { execution_accelerators { gpu_execution_accelerator : [ {
        name : "tensorrt"
        parameters { key: "precision_mode" value: "FP16" } } ] } }
    """
    config = parse(text)
    assert config.inputs == (TensorConfig("images", "FP32", (3, 640, 640)),)
    assert config.instance_groups == (InstanceGroup("KIND_GPU", 1),)
    assert config.dynamic_batching == DynamicBatching(max_queue_delay_microseconds=100)
    assert config.optimization.gpu_accelerators == (ExecutionAccelerator("tensorrt", {"precision_mode": "FP16"}),)
