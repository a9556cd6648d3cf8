"""Triton Python-backend model: the detector, run by ONNX Runtime on CPU with explicit threads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common.triton_io import error_response, input_array, model_settings  # noqa: E402
from backends.detector.onnx_runner import OnnxDetector, make_session, run_requests  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args)
        model_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), settings["model_file"])
        session = make_session(model_path, intra_op_threads=int(settings["intra_op_threads"]))
        self.input_name = settings["input_name"]
        self.output_name = settings["output_name"]
        self.detector = OnnxDetector(session, self.input_name, self.output_name, settings["fixed_batch"])

    def execute(self, requests):
        batches = []
        for request in requests:
            try:
                batches.append(input_array(request, self.input_name))
            except Exception as exc:  # noqa: BLE001
                batches.append(exc)
        responses = []
        for result in run_requests(self.detector.run, batches):
            if isinstance(result, Exception):
                responses.append(error_response(result))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, result)]))
        return responses
