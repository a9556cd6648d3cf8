"""DetectionClient's split of the ensemble's padded outputs into one result per image, with each image's STATUS."""
from __future__ import annotations

import numpy as np

from backends.common import tensors as T
from edgestack.client import results_from_arrays


def arrays(statuses: list[bytes] | None) -> dict[str, np.ndarray]:
    out = {
        T.NUM_DETECTIONS: np.array([[1], [0]], np.int32),
        T.BOXES: np.array([[[1, 2, 3, 4]], [[0, 0, 0, 0]]], np.float32),
        T.SCORES: np.array([[0.9], [0.0]], np.float32),
        T.CLASS_IDS: np.array([[17], [0]], np.int32),
        T.CLASS_NAMES: np.array([[b"cat"], [b""]], dtype=object),
        T.SOURCE: np.array([[b"edge"], [b"edge"]], dtype=object),
        T.DEGRADED: np.array([[False], [False]]),
    }
    if statuses is not None:
        out[T.STATUS] = np.array([[s] for s in statuses], dtype=object)
    return out


def test_each_image_gets_its_detections_or_its_error():
    good, bad = results_from_arrays(arrays([b"", b"image 1: image is truncated or corrupt"]))
    assert good.ok and good.class_names == ["cat"] and good.detections[0].box == (1.0, 2.0, 3.0, 4.0)
    assert not bad.ok and bad.error == "image 1: image is truncated or corrupt" and bad.detections == ()
    assert bad.to_dict() == {"error": "image 1: image is truncated or corrupt"}
    assert good.to_dict()["detections"][0]["class_name"] == "cat"


def test_a_server_without_status_reads_as_every_image_ok():
    assert [r.ok for r in results_from_arrays(arrays(None))] == [True, True]
