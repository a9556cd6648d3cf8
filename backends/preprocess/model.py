"""Triton Python-backend model: encoded image bytes -> model input tensor + transform (per image).

Instances on KIND_GPU resize and normalise with CuPy and hand the tensor over by DLPack; KIND_CPU
instances use NumPy/OpenCV. Both follow one function contract (backends/preprocess/*_ops.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common import tensors as T  # noqa: E402
from backends.common.settings import PreprocessSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, respond_each  # noqa: E402
from backends.errors import InvalidImageError  # noqa: E402
from backends.preprocess.image_ops import decode_image, prepare_input  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args, PreprocessSettings)
        self.spec = settings.input
        self.limits = settings.limits
        self.on_gpu = args.get("model_instance_kind") == "GPU"
        self.device_id = int(args.get("model_instance_device_id", 0))
        if self.on_gpu:
            from backends.preprocess.gpu_ops import prepare_input_gpu

            self.prepare = lambda rgb: prepare_input_gpu(rgb, self.spec, self.device_id)
        else:
            self.prepare = lambda rgb: prepare_input(rgb, self.spec)

    def _handle(self, request):
        images = input_array(request, T.IMAGE).reshape(-1)
        tensors, transforms = [], []
        for index, encoded in enumerate(images):
            if not isinstance(encoded, (bytes, np.bytes_)):
                raise InvalidImageError(f"image {index}: expected encoded bytes, got {type(encoded).__name__}")
            tensor, transform = self.prepare(decode_image(bytes(encoded), self.limits))
            tensors.append(tensor)
            transforms.append(transform.to_array())
        transform_out = pb_utils.Tensor(T.TRANSFORM, np.stack(transforms))
        if self.on_gpu:
            import cupy

            batch = cupy.stack(tensors)
            return [pb_utils.Tensor.from_dlpack(T.PREPROCESSED, batch.toDlpack()), transform_out]
        return [pb_utils.Tensor(T.PREPROCESSED, np.stack(tensors)), transform_out]

    def execute(self, requests):
        return respond_each(requests, self._handle)
