"""Triton Python-backend model (copied as model.py by loop.pipeline_step): the sampling side path.

Beside postprocess: IMAGE, the detector's raw outputs, TRANSFORM and STATUS in; SAMPLED (bool per image) and
STATUS (handed on to the router, unchanged) out. The detections are computed here with postprocess's own function
(so this step runs beside postprocess, not after it); the math is in loop.sampler. This step never fails a
request: anything that goes wrong is logged and answered SAMPLED=false, so sampling can cost samples, never answers.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common import tensors as T  # noqa: E402
from backends.common.geometry import Transform  # noqa: E402
from backends.common.settings import PostprocessSettings  # noqa: E402
from backends.common.triton_io import input_array, output, respond_each  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402
from loop.sampler import SampleSink, candidates, judge  # noqa: E402
from loop.settings import SamplingSettings  # noqa: E402

SAMPLED = "SAMPLED"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        data = json.loads(config["parameters"][T.CONFIG_PARAMETER]["string_value"])
        self.settings = SamplingSettings.from_dict(data["sampling"])
        self.post = PostprocessSettings.from_dict(data["postprocess"])
        self.raw_outputs = T.raw_outputs(self.post.roles)
        self.classes = tuple(self.post.classes)
        self.options = self.post.options()
        self.sink = SampleSink(self.settings, self.classes, data["model_version"])
        self.errors = 0

    def _one(self, image, raws, transform) -> bool:
        try:
            transform = Transform.from_array(transform)
            found = postprocess_image(raws, self.post.format, transform, **self.options)  # what postprocess answers
            cands = candidates(raws, transform, self.post.format, len(self.classes), self.settings.candidate_score,
                               self.post.decode)
            return self.sink.offer(image, found, judge(found, cands, self.settings, self.classes))
        except Exception as exc:  # noqa: BLE001 - sampling must never fail inference
            self.errors += 1
            if self.errors <= 3:
                pb_utils.Logger.log_warn(f"sampler: image not sampled: {type(exc).__name__}: {exc}")
            return False

    def _handle(self, request):
        images = [bytes(x) for x in input_array(request, T.IMAGE).reshape(-1)]
        try:
            raws = [input_array(request, name) for name in self.raw_outputs]
            transforms = input_array(request, T.TRANSFORM)
            sampled = [self._one(images[i], [raw[i] for raw in raws], transforms[i])
                       for i in range(len(images))]
        except Exception as exc:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"sampler: batch not sampled: {type(exc).__name__}: {exc}")
            sampled = [False] * len(images)
        status = input_array(request, T.STATUS)
        return [output(SAMPLED, np.array([[s] for s in sampled], dtype=bool)), output(T.STATUS, status)]

    def execute(self, requests):
        return respond_each(requests, self._handle)

    def finalize(self):
        self.sink.close()
