"""Triton Python-backend model: the parallel pipeline's fusion step, several detectors' boxes -> one answer per
image (Weighted Boxes Fusion, backends/fusion/wbf.py). Inputs <PREFIX>_EDGE_* per model and the TRANSFORM of the
first model's preprocess (for the image size); outputs EDGE_* like a postprocess, for the router."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends.common import tensors as T  # noqa: E402
from backends.common.detections import pack, unpack  # noqa: E402
from backends.common.pipeline_settings import FusionSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, output, respond_each  # noqa: E402
from backends.fusion.wbf import fuse, member_prefixes  # noqa: E402

EDGE = (T.EDGE_BOXES, T.EDGE_SCORES, T.EDGE_CLASS_IDS, T.EDGE_CLASS_NAMES, T.EDGE_NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        self.settings = model_settings(args, FusionSettings)
        self.prefixes = member_prefixes(len(self.settings.weights))

    def _handle(self, request):
        s = self.settings
        members = [unpack(*(input_array(request, f"{p}_{name}") for name in EDGE)) for p in self.prefixes]
        transforms = input_array(request, T.TRANSFORM)
        fused = [fuse([m[i] for m in members], s.weights, int(round(transforms[i][0])), int(round(transforms[i][1])),
                      s.iou, s.skip_score, s.max_detections) for i in range(len(transforms))]
        return [output(name, array) for name, array in zip(EDGE, pack(fused, s.classes))]

    def execute(self, requests):
        return respond_each(requests, self._handle)
