"""The OpenVINO runner with several streams: a batch runs one image per stream, with the same outputs as one by one."""
from __future__ import annotations

import numpy as np
import pytest

from backends.detector.openvino_runner import OpenVinoDetector, compile_config
from builder.spec import load_spec
from tests.conftest import MODEL, SPEC


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def batch(spec):
    rng = np.random.default_rng(3)
    return rng.random((3, *spec.input_shape), dtype=np.float32)


def test_streams_give_the_outputs_of_one_image_at_a_time(spec, batch):
    one = OpenVinoDetector(str(MODEL), spec.input_name, spec.output.names, threads=2)
    two = OpenVinoDetector(str(MODEL), spec.input_name, spec.output.names, threads=2, streams=2)
    assert one.parallel is None and two.parallel is not None and two.fixed_batch == 1  # the fixture is fixed at 1
    expected = one.run_outputs(batch)
    got = two.run_outputs(batch)
    assert [a.shape for a in got] == [a.shape for a in expected] and got[0].shape[0] == 3
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # images keep their places: each row is that image's own answer, not a neighbour's
    for i in range(3):
        np.testing.assert_allclose(two.run_outputs(batch[i:i + 1])[0], expected[0][i:i + 1], rtol=1e-4, atol=1e-4)
    # two images: one wave on the streams; three: a wave, then the one left over on every thread
    np.testing.assert_allclose(two.run_outputs(batch[:2])[0], expected[0][:2], rtol=1e-4, atol=1e-4)
    reordered = two.run_outputs(batch[::-1].copy())
    np.testing.assert_allclose(reordered[0], expected[0][::-1], rtol=1e-4, atol=1e-4)


def test_stream_settings():
    assert compile_config("CPU", 2)["NUM_STREAMS"] == 1 and compile_config("CPU", 2)["PERFORMANCE_HINT"] == "LATENCY"
    several = compile_config("CPU", 2, streams=2)
    assert several["NUM_STREAMS"] == 2 and several["INFERENCE_NUM_THREADS"] == 2
    auto = compile_config("AUTO", 2, streams=2)
    assert auto["PERFORMANCE_HINT"] == "THROUGHPUT" and auto["DEVICE_PROPERTIES"]["CPU"]["NUM_STREAMS"] == 2
    assert compile_config("AUTO", 2)["PERFORMANCE_HINT"] == "LATENCY"
    with pytest.raises(ValueError, match="streams"):
        compile_config("CPU", 2, streams=0)
    with pytest.raises(ValueError, match="streams"):
        OpenVinoDetector(str(MODEL), "x", "y", threads=1, streams=0)
