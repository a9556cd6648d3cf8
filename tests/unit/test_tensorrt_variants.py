"""TensorRT plans build only where TensorRT and a GPU exist: elsewhere a clear error, nothing written."""
import pytest

from builder.errors import TargetError
from builder.optimize.tensorrt_variants import build_tensorrt, tensorrt_unavailable_reason
from tests.conftest import MODEL


def test_says_clearly_why_no_plan_is_built_here(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are available: the GPU test builds a real plan")
    with pytest.raises(TargetError, match="cannot build a TensorRT plan on this machine") as info:
        build_tensorrt(MODEL, tmp_path / "trt-fp16", "fp16")
    assert reason in str(info.value)
    assert not (tmp_path / "trt-fp16").exists()


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(TargetError, match="precision"):
        build_tensorrt(MODEL, tmp_path / "x", "fp8")


@pytest.mark.gpu
def test_fp16_plan_builds_on_a_gpu(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    variant = build_tensorrt(MODEL, tmp_path / "trt-fp16", "fp16")
    assert variant.path.is_file() and variant.path.stat().st_size > 1_000_000
