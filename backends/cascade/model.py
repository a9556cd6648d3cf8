"""Triton Python-backend model: the cascade, a BLS model (ensembles cannot branch). Each image goes to the first
stage's model (a Triton ensemble of preprocess, detector, postprocess); those it answers below min_confidence go
to the next. Outputs EDGE_* for the router (the cloud, last), STAGE (the stage that answered) and STATUS."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.cascade.stages import run_cascade  # noqa: E402
from backends.common import tensors as T  # noqa: E402
from backends.common.detections import pack, unpack  # noqa: E402
from backends.common.pipeline_settings import CascadeSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, output, respond_each  # noqa: E402
from backends.errors import CloudUnavailableError, InvalidImageError  # noqa: E402

EDGE = (T.EDGE_BOXES, T.EDGE_SCORES, T.EDGE_CLASS_IDS, T.EDGE_CLASS_NAMES, T.EDGE_NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        self.settings = model_settings(args, CascadeSettings)

    def _ask(self, images):
        def ask(stage, indices):
            request = pb_utils.InferenceRequest(model_name=self.settings.stages[stage],
                                                requested_output_names=[*EDGE, T.STATUS],
                                                inputs=[pb_utils.Tensor(T.IMAGE, images[indices])])
            response = request.exec()
            if response.has_error():
                message = response.error().message()
                if response.error().code() == pb_utils.TritonError.INVALID_ARG:
                    raise InvalidImageError(message)
                raise CloudUnavailableError(f"cascade stage {self.settings.stage_names[stage]}: {message}")
            arrays = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in (*EDGE, T.STATUS)}
            statuses = [s.decode() if isinstance(s, bytes) else str(s) for s in arrays[T.STATUS].reshape(-1)]
            # the stage numbers images within its own request: name them by their index in this request
            statuses = [s.replace(f"image {j}:", f"image {indices[j]}:", 1) if s else "" for j, s in enumerate(statuses)]
            return unpack(*(arrays[name] for name in EDGE)), statuses
        return ask

    def _handle(self, request):
        images = input_array(request, T.IMAGE).reshape(-1, 1)
        s = self.settings
        detections, stages, statuses = run_cascade(len(images), s.stage_names, s.min_confidence, self._ask(images))
        return [output(name, array) for name, array in zip(EDGE, pack(detections, ()))] + [
            output(T.STAGE, np.array([[n.encode()] for n in stages], dtype=object).reshape(-1, 1)),
            output(T.STATUS, np.array([[m.encode()] for m in statuses], dtype=object).reshape(-1, 1)),
        ]

    def execute(self, requests):
        return respond_each(requests, self._handle)
