"""Triton Python-backend model: the detector on CPU with explicit threads, run by ONNX Runtime
(settings "runtime": "onnxruntime", the default) or OpenVINO ("runtime": "openvino", the intel target)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common.triton_io import error_response, input_array, model_settings  # noqa: E402
from backends.detector.onnx_runner import run_requests  # noqa: E402

RUNTIMES = ("onnxruntime", "openvino")


def make_detector(settings: dict, model_path: str):
    """The runner the settings name; each imports only its own runtime."""
    runtime = settings.get("runtime", "onnxruntime")
    threads = int(settings["intra_op_threads"])
    if runtime == "onnxruntime":
        from backends.detector.onnx_runner import OnnxDetector, make_session

        session = make_session(model_path, intra_op_threads=threads)
        return OnnxDetector(session, settings["input_name"], settings["output_name"], settings["fixed_batch"])
    if runtime == "openvino":
        from backends.detector.openvino_runner import OpenVinoDetector

        return OpenVinoDetector(model_path, settings["input_name"], settings["output_name"], threads,
                                device=settings.get("device", "CPU"), uint8_input=bool(settings.get("uint8_input", False)),
                                input_spec=settings.get("input_spec"),
                                inference_precision=settings.get("inference_precision", "f32"))
    raise pb_utils.TritonModelException(f"detector runtime {runtime!r} is not one of {RUNTIMES}; re-render the repository")


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args)
        model_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), settings["model_file"])
        self.input_name = settings["input_name"]
        self.output_name = settings["output_name"]
        self.detector = make_detector(settings, model_path)

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
