"""Triton Python-backend model: confidence-based edge/cloud router, the pipeline's last step.

Without a cloud endpoint it passes the edge result through (SOURCE=edge, DEGRADED=false). It passes on each image's
STATUS from preprocess (IMAGE_STATUS: a failed image gets no detections and no cloud call) and a cascade's STAGE.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from backends.common import tensors as T  # noqa: E402
from backends.common.detections import pack, unpack  # noqa: E402
from backends.common.settings import RouterSettings  # noqa: E402
from backends.common.triton_io import input_array, model_settings, output, respond_each  # noqa: E402
from backends.router.breaker import CircuitBreaker  # noqa: E402
from backends.router.routing import Router  # noqa: E402

EDGE_INPUTS = (T.EDGE_BOXES, T.EDGE_SCORES, T.EDGE_CLASS_IDS, T.EDGE_CLASS_NAMES, T.EDGE_NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        settings = model_settings(args, RouterSettings)
        self.logger = pb_utils.Logger
        cloud_call, breaker = None, None
        if settings.cloud_url:
            from backends.router.cloud import CloudDetector

            cloud_call = CloudDetector(settings.cloud_url, settings.cloud_model, settings.deadline_ms / 1000.0)
            breaker = CircuitBreaker(settings.failure_threshold, float(settings.cooldown_s))
        self.cloud = cloud_call
        self.router = Router(float(settings.min_confidence), cloud_call, breaker)

    def _handle(self, request):
        images = [bytes(x) for x in input_array(request, T.IMAGE).reshape(-1)]
        edge = unpack(*(input_array(request, name) for name in EDGE_INPUTS))
        status = pb_utils.get_input_tensor_by_name(request, T.IMAGE_STATUS)  # preprocess's, per image
        statuses = status.as_numpy().reshape(-1, 1) if status is not None else np.full((len(edge), 1), b"", dtype=object)
        failed = [bool(s) for s in statuses.reshape(-1)]
        routed = self.router.route(images, edge, failed)
        for item in routed:
            if item.reason:
                self.logger.log_warn(f"router: edge answer used, {item.reason}")
        packed = pack([r.detections for r in routed], ())
        sources = np.array([[r.source.encode()] for r in routed], dtype=object)
        degraded = np.array([[r.degraded] for r in routed], dtype=bool)
        stage = pb_utils.get_input_tensor_by_name(request, T.IMAGE_STAGE)  # a cascade's, passed on
        return [output(name, array) for name, array in zip(T.DETECTION_OUTPUTS, packed)] + [
            output(T.SOURCE, sources),
            output(T.DEGRADED, degraded),
            output(T.STATUS, statuses.astype(object)),
        ] + ([output(T.STAGE, stage.as_numpy().reshape(-1, 1))] if stage is not None else [])

    def execute(self, requests):
        return respond_each(requests, self._handle)

    def finalize(self):
        self.router.close()
        if self.cloud is not None:
            self.cloud.close()
