"""Triton Python-backend model: raw detector output -> thresholded, NMS'd boxes on original pixels."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends.common import tensors as T  # noqa: E402
from backends.common.detections import Detections, pack  # noqa: E402
from backends.common.geometry import Transform  # noqa: E402
from backends.common.settings import PostprocessSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, output, respond_each  # noqa: E402
from backends.errors import InvalidTensorError  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402

EDGE_OUTPUTS = (T.EDGE_BOXES, T.EDGE_SCORES, T.EDGE_CLASS_IDS, T.EDGE_CLASS_NAMES, T.EDGE_NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args, PostprocessSettings)
        self.format = settings.format
        self.classes = settings.classes
        self.raw_outputs = T.raw_outputs(settings.roles)
        self.options = settings.options()

    def _handle(self, request):
        raws = [input_array(request, name) for name in self.raw_outputs]
        transforms = input_array(request, T.TRANSFORM)
        for name, raw in zip(self.raw_outputs, raws):
            if len(raw) != len(transforms):
                raise InvalidTensorError(f"{len(raw)} detector outputs in {name} but {len(transforms)} transforms")
        per_image = [
            Detections(*postprocess_image([raw[i] for raw in raws], self.format, Transform.from_array(transforms[i]),
                                          **self.options))
            for i in range(len(transforms))
        ]
        return [output(name, array) for name, array in zip(EDGE_OUTPUTS, pack(per_image, self.classes))]

    def execute(self, requests):
        return respond_each(requests, self._handle)
