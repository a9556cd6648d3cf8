"""Triton Python-backend model: the detector on CPU with explicit threads, run by ONNX Runtime
(settings "runtime": "onnxruntime", the default) or OpenVINO ("runtime": "openvino", the intel target)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common.settings import DetectorSettings  # noqa: E402
from backends.common.triton_io import error_response, input_array, model_settings  # noqa: E402
from backends.detector.onnx_runner import run_requests  # noqa: E402
from backends.detector.runners import make_detector  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args, DetectorSettings)
        model_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), settings.model_file)
        self.input_name = settings.input_name
        self.output_names = settings.output_names
        self.detector = make_detector(settings, model_path)

    def execute(self, requests):
        batches = []
        for request in requests:
            try:
                batches.append(input_array(request, self.input_name))
            except Exception as exc:  # noqa: BLE001
                batches.append(exc)
        responses = []
        for result in run_requests(self.detector.run_outputs, batches):
            if isinstance(result, Exception):
                responses.append(error_response(result))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, array) for name, array in zip(self.output_names, result)]))
        return responses
