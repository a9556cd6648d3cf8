"""Triton Python-backend model: raw detector output -> thresholded, NMS'd boxes on original pixels."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends.common import tensors as T  # noqa: E402
from backends.common.detections import Detections, pack  # noqa: E402
from backends.common.geometry import Transform  # noqa: E402
from backends.common.triton_io import input_array, model_settings, output, respond_each  # noqa: E402
from backends.errors import InvalidTensorError  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402

EDGE_OUTPUTS = (T.EDGE_BOXES, T.EDGE_SCORES, T.EDGE_CLASS_IDS, T.EDGE_CLASS_NAMES, T.EDGE_NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args)
        self.format = settings["format"]
        self.classes = tuple(settings["classes"])
        thresholds = settings["thresholds"]
        self.options = dict(
            num_classes=len(self.classes),
            score_threshold=float(thresholds["score"]),
            iou_threshold=float(thresholds["iou"]),
            max_detections=int(thresholds["max_detections"]),
            class_agnostic=bool(thresholds["class_agnostic"]),
        )

    def _handle(self, request):
        raw = input_array(request, T.RAW_OUTPUT)
        transforms = input_array(request, T.TRANSFORM)
        if len(raw) != len(transforms):
            raise InvalidTensorError(f"{len(raw)} detector outputs but {len(transforms)} transforms")
        per_image = [
            Detections(*postprocess_image(raw[i], self.format, Transform.from_array(transforms[i]), **self.options))
            for i in range(len(raw))
        ]
        return [output(name, array) for name, array in zip(EDGE_OUTPUTS, pack(per_image, self.classes))]

    def execute(self, requests):
        return respond_each(requests, self._handle)
