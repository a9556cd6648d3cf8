"""Triton Python-backend model: encoded image bytes -> model input tensor + transform + status (per image).

Instances on KIND_GPU resize and normalise with CuPy and hand the tensor over by DLPack; KIND_CPU
instances use NumPy/OpenCV and decode large JPEGs at reduced size; images over limits.large_pixels are decoded
one at a time across the model's instances (backends/preprocess/large_images.py). Both follow one function contract
(backends/preprocess/*_ops.py); backends/preprocess/batch.py fails a bad image alone (STATUS).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common import tensors as T  # noqa: E402
from backends.common.settings import PreprocessSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, respond_each  # noqa: E402
from backends.preprocess.batch import cpu_prepare, draft_side, prepare_batch  # noqa: E402
from backends.preprocess.large_images import LargeImageGate  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args, PreprocessSettings)
        self.spec = settings.input
        self.limits = settings.limits
        self.on_gpu = args.get("model_instance_kind") == "GPU"
        self.device_id = int(args.get("model_instance_device_id", 0))
        self.min_side = None if self.on_gpu else draft_side(self.spec)
        self.large_gate = LargeImageGate.for_model(args["model_name"], self.limits.large_pixels)
        if self.on_gpu:
            from backends.preprocess.gpu_ops import prepare_input_gpu

            self.prepare = lambda decoded: prepare_input_gpu(decoded.rgb, self.spec, self.device_id)
        else:
            self.prepare = cpu_prepare(self.spec)

    def _handle(self, request, large_gate):
        images = input_array(request, T.IMAGE).reshape(-1)
        batch = prepare_batch(images, self.prepare, self.spec, self.limits, self.min_side, large_gate)
        extra = [pb_utils.Tensor(T.TRANSFORM, batch.transforms), pb_utils.Tensor(T.STATUS, batch.status_array)]
        if self.on_gpu:
            import cupy

            stacked = cupy.stack(batch.tensors)
            return [pb_utils.Tensor.from_dlpack(T.PREPROCESSED, stacked.toDlpack()), *extra]
        return [pb_utils.Tensor(T.PREPROCESSED, np.stack(batch.tensors)), *extra]

    def execute(self, requests):
        gate = self.large_gate if len(requests) == 1 else self.large_gate.refusing()
        return respond_each(requests, lambda request: self._handle(request, gate))
