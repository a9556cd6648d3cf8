"""builder.targets: profile defaults and the overrides each profile refuses."""
from __future__ import annotations

import pytest

from builder.errors import BuilderError, TargetError
from builder.targets import (
    TARGET_PROFILES,
    CpuTarget,
    JetsonTarget,
    NvidiaGpuTarget,
    TargetProfile,
    make_target,
)


def test_known_profiles():
    assert set(TARGET_PROFILES) == {"cpu", "intel", "nvidia-gpu", "jetson"}
    assert issubclass(TargetError, BuilderError)


def test_cpu_defaults():
    target = make_target("cpu")
    assert isinstance(target, CpuTarget)
    assert target.name == "cpu"
    assert target.detector_engine == "python_onnxruntime"
    assert target.instance_kind == "KIND_CPU"
    assert target.on_gpu is False
    assert target.detector_instances == 2
    assert target.preprocess_instances == 1
    assert target.postprocess_instances == 1
    assert target.router_instances == 1
    assert target.intra_op_threads == 1
    assert target.max_batch_size == 8
    assert target.max_queue_delay_us == 0
    assert target.precision == "fp32"
    assert target.gpus == ()
    assert target.max_workspace_bytes == 0


def test_nvidia_gpu_defaults():
    target = make_target("nvidia-gpu")
    assert isinstance(target, NvidiaGpuTarget)
    assert target.name == "nvidia-gpu"
    assert target.detector_engine == "onnxruntime_onnx"
    assert target.instance_kind == "KIND_GPU"
    assert target.on_gpu is True
    assert target.precision == "fp16"
    assert target.gpus == (0,)
    assert target.max_workspace_bytes == 1 << 30
    assert target.max_batch_size == 8
    assert target.detector_instances == 1
    assert target.preprocess_instances == 1
    assert target.max_queue_delay_us == 0


def test_jetson_defaults():
    target = make_target("jetson")
    assert isinstance(target, JetsonTarget) and isinstance(target, NvidiaGpuTarget)
    assert target.name == "jetson"
    assert target.detector_engine == "onnxruntime_onnx"
    assert target.instance_kind == "KIND_GPU"
    assert target.precision == "fp16"
    assert target.gpus == (0,)
    assert target.max_batch_size == 4
    assert target.max_workspace_bytes == 256 << 20
    assert target.detector_instances == 1


def test_valid_overrides_apply():
    target = make_target("cpu", detector_instances=4, intra_op_threads=2, max_batch_size=16, max_queue_delay_us=500)
    assert (target.detector_instances, target.intra_op_threads, target.max_batch_size, target.max_queue_delay_us) == (4, 2, 16, 500)
    gpu = make_target("nvidia-gpu", detector_engine="tensorrt_plan", gpus=(0, 1), precision="int8")
    assert (gpu.detector_engine, gpu.gpus, gpu.precision) == ("tensorrt_plan", (0, 1), "int8")


def test_none_overrides_are_ignored():
    assert make_target("jetson", max_batch_size=None, detector_instances=None) == make_target("jetson")


def test_profiles_are_frozen():
    target = make_target("cpu")
    with pytest.raises(Exception):
        target.max_batch_size = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("cpu", {"instance_kind": "KIND_GPU"}),
        ("cpu", {"precision": "fp16"}),
        ("cpu", {"detector_engine": "onnxruntime_onnx"}),
        ("cpu", {"detector_engine": "tensorrt_plan"}),
        ("nvidia-gpu", {"detector_engine": "python_onnxruntime"}),
        ("jetson", {"detector_engine": "python_onnxruntime"}),
        ("nvidia-gpu", {"instance_kind": "KIND_CPU"}),
        ("nvidia-gpu", {"gpus": ()}),
        ("jetson", {"max_workspace_bytes": 0}),
        ("cpu", {"detector_instances": 0}),
        ("cpu", {"preprocess_instances": 0}),
        ("nvidia-gpu", {"postprocess_instances": 0}),
        ("jetson", {"router_instances": 0}),
        ("cpu", {"max_queue_delay_us": -1}),
        ("nvidia-gpu", {"max_queue_delay_us": -100}),
        ("cpu", {"max_batch_size": 0}),
        ("cpu", {"intra_op_threads": -1}),
        ("nvidia-gpu", {"precision": "fp8"}),
        ("nvidia-gpu", {"detector_engine": "openvino"}),
        ("cpu", {"no_such_knob": 1}),
    ],
)
def test_invalid_overrides(name, overrides):
    with pytest.raises(TargetError) as info:
        make_target(name, **overrides)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["tpu", "gpu", "CPU", ""])
def test_unknown_target_name(name):
    with pytest.raises(TargetError) as info:
        make_target(name)
    message = str(info.value)
    assert repr(name) in message
    for known in TARGET_PROFILES:
        assert known in message


def test_base_profile_validates_directly():
    with pytest.raises(TargetError):
        TargetProfile(name="x", detector_engine="python_onnxruntime", instance_kind="KIND_CPU", router_instances=0)
