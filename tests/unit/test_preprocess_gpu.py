"""prepare_input_gpu against the CPU prepare_input on real photographs; needs CuPy and a CUDA device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.preprocess.gpu_ops import gpu_available, prepare_input_gpu
from backends.preprocess.image_ops import DecodeLimits, InputSpec, decode_image, prepare_input

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
if not gpu_available():
    pytest.skip("CuPy sees no CUDA device", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = next(
    (p for p in (REPO / "shared/fixtures/images", REPO.parent / "shared/fixtures/images") if p.is_dir()), None
)
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "dog.jpg", "grace_hopper.jpg", "horses.jpg"]
SPECS = {
    "yolo": dict(scale=1 / 255),
    "imagenet_bgr_fp16": dict(
        channel_order="BGR", dtype="float16", scale=1 / 255, mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229)
    ),
    "raw_uint8": dict(dtype="uint8"),
}


@pytest.mark.skipif(FIXTURES is None, reason="fixture photographs not found")
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_gpu_matches_cpu(name, mode, layout, kind):
    rgb = decode_image((FIXTURES / name).read_bytes(), DecodeLimits())
    spec = InputSpec(384, 640, layout=layout, resize=mode, **SPECS[kind])
    cpu, t_cpu = prepare_input(rgb, spec)
    gpu, t_gpu = prepare_input_gpu(rgb, spec)
    assert isinstance(gpu, cupy.ndarray) and gpu.flags.c_contiguous
    assert t_gpu == t_cpu and gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    lsb = spec.scale / min(spec.std)  # one uint8 step after scaling
    diff = np.abs(cupy.asnumpy(gpu).astype(np.float64) - cpu)
    assert diff.max() <= lsb * 1.01 + 2e-3
