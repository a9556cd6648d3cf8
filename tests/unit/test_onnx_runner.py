"""backends.detector.onnx_runner: request batching with error isolation, and the real fixture graph."""
from __future__ import annotations


import numpy as np
import pytest

from backends.detector.onnx_runner import OnnxDetector, make_session, run_requests
from backends.errors import InvalidTensorError
from tests.conftest import MODEL

FIXTURE_MODEL = MODEL
INPUT_NAME = "tower_0/images:0"
OUTPUT_NAME = "tower_0/detections"


class Recorder:
    """run_outputs(): two outputs, its input doubled and each row's sum; raises for any batch holding a negative
    value. Records every call."""

    def __init__(self):
        self.calls: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls.append(batch.copy())
        if (batch < 0).any():
            raise ValueError(f"negative input in batch of {len(batch)}")
        return [batch * 2, batch.sum(axis=1)]


def assert_outputs(result: list[np.ndarray], batch: np.ndarray) -> None:
    """result is Recorder's two outputs for batch."""
    assert len(result) == 2
    np.testing.assert_array_equal(result[0], batch * 2)
    np.testing.assert_array_equal(result[1], batch.sum(axis=1))


def rows(n: int, start: float, width: int = 3) -> np.ndarray:
    return np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)


# --- run_requests -------------------------------------------------------------------------------


def test_run_requests_combines_into_one_run_and_splits_in_order():
    run = Recorder()
    batches = [rows(2, 0), rows(1, 100), rows(3, 200)]
    results = run_requests(run, batches)
    assert len(run.calls) == 1
    assert run.calls[0].shape == (6, 3)
    assert len(results) == 3
    for batch, result in zip(batches, results):
        assert_outputs(result, batch)


def test_run_requests_single_request():
    run = Recorder()
    batch = rows(4, 10)
    [result] = run_requests(run, [batch])
    assert len(run.calls) == 1
    assert_outputs(result, batch)


def test_run_requests_isolates_the_offending_request():
    run = Recorder()
    bad = rows(2, 50)
    bad[1, 0] = -1.0
    batches = [rows(1, 0), bad, rows(2, 10)]
    results = run_requests(run, batches)
    assert isinstance(results[1], ValueError)
    assert "negative" in str(results[1])
    assert_outputs(results[0], batches[0])
    assert_outputs(results[2], batches[2])
    # one failed combined run, then one run per request
    assert [len(c) for c in run.calls] == [5, 1, 2, 2]


def test_run_requests_isolates_a_request_that_cannot_be_concatenated():
    def run(batch: np.ndarray) -> list[np.ndarray]:
        if batch.shape[1:] != (3,):
            raise InvalidTensorError(f"bad shape {batch.shape}")
        return [batch + 1]

    batches = [rows(1, 0), rows(2, 10, width=5), rows(1, 20)]
    results = run_requests(run, batches)
    assert isinstance(results[1], InvalidTensorError)
    np.testing.assert_array_equal(results[0][0], batches[0] + 1)
    np.testing.assert_array_equal(results[2][0], batches[2] + 1)


def test_run_requests_passes_existing_errors_through():
    run = Recorder()
    earlier = KeyError("input missing")
    batches = [rows(1, 0), earlier, rows(2, 10)]
    results = run_requests(run, batches)
    assert results[1] is earlier
    assert len(run.calls) == 1 and run.calls[0].shape == (3, 3)
    assert_outputs(results[0], batches[0])
    assert_outputs(results[2], batches[2])


def test_run_requests_all_errors_never_runs():
    run = Recorder()
    errors = [ValueError("a"), RuntimeError("b")]
    assert run_requests(run, errors) == errors
    assert run.calls == []


def test_run_requests_every_request_bad():
    run = Recorder()
    batches = [-rows(1, 1), -rows(1, 5)]
    results = run_requests(run, batches)
    assert all(isinstance(r, ValueError) for r in results)


def test_run_requests_does_not_modify_input_list():
    run = Recorder()
    batches = [rows(1, 0), rows(1, 3)]
    snapshot = list(batches)
    run_requests(run, batches)
    assert all(a is b for a, b in zip(batches, snapshot))


# --- OnnxDetector on the fixture graph (fixed batch of 1) ------------------------------------------


@pytest.fixture(scope="module")
def detector() -> OnnxDetector:
    if not FIXTURE_MODEL.is_file():
        pytest.skip("fixture model missing")
    session = make_session(str(FIXTURE_MODEL), 1)
    return OnnxDetector(session, INPUT_NAME, OUTPUT_NAME, fixed_batch=1)


def test_detector_reads_item_shape(detector):
    assert detector.item_shape == (512, 512, 3)
    assert detector.fixed_batch == 1


def test_detector_runs_batch_of_two_through_fixed_batch_graph(detector):
    batch = np.zeros((2, 512, 512, 3), dtype=np.float32)
    out = detector.run(batch)
    assert out.shape == (2, 100, 6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], out[1])  # identical images, identical answers


def test_detector_batch_rows_match_single_runs(detector):
    rng = np.random.default_rng(0)
    batch = np.stack([np.zeros((512, 512, 3), np.float32), rng.uniform(0, 255, (512, 512, 3)).astype(np.float32)])
    out = detector.run(batch)
    single = [detector.run(batch[i:i + 1]) for i in range(2)]
    assert single[0].shape == (1, 100, 6)
    np.testing.assert_allclose(out[0], single[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], single[1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [(2, 640, 640, 3), (2, 3, 512, 512), (2, 512, 512), (1, 512, 512, 3, 1), (1, 512, 512, 4)],
)
def test_detector_rejects_wrong_shape(detector, shape):
    with pytest.raises(InvalidTensorError) as info:
        detector.run(np.zeros(shape, dtype=np.float32))
    assert str(shape) in str(info.value)


def test_detector_rejects_batch_not_multiple_of_fixed_batch():
    if not FIXTURE_MODEL.is_file():
        pytest.skip("fixture model missing")
    session = make_session(str(FIXTURE_MODEL), 1)
    det = OnnxDetector(session, INPUT_NAME, OUTPUT_NAME, fixed_batch=2)
    with pytest.raises(InvalidTensorError) as info:
        det.run(np.zeros((3, 512, 512, 3), dtype=np.float32))
    assert "fixed batch 2" in str(info.value)


def test_make_session_sets_threads():
    session = make_session(str(FIXTURE_MODEL), 2, inter_op_threads=1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_detector_with_run_requests(detector):
    good = np.zeros((1, 512, 512, 3), dtype=np.float32)
    wrong = np.zeros((1, 256, 256, 3), dtype=np.float32)
    results = run_requests(detector.run_outputs, [good, wrong, good])
    assert [r.shape for r in results[0]] == [(1, 100, 6)] and [r.shape for r in results[2]] == [(1, 100, 6)]
    assert isinstance(results[1], InvalidTensorError)


def test_sessions_do_not_spin_unless_asked(tmp_path):
    """Intra-op threads that busy-wait take the cores the detector shares with preprocess and postprocess."""
    from backends.common.settings import DetectorSettings
    from backends.detector.onnx_runner import make_session
    from backends.detector.runners import make_detector
    from tests.conftest import MODEL

    def spinning(session) -> str:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(make_session(str(MODEL), 2)) == "0"
    assert spinning(make_session(str(MODEL), 2, spinning=True)) == "1"
    settings = DetectorSettings(model_file="model.onnx", input_name="tower_0/images:0",
                                output_names=("tower_0/detections",), intra_op_threads=2, intra_op_spinning=True)
    assert spinning(make_detector(settings, str(MODEL)).session) == "1"
    assert DetectorSettings.from_json(settings.to_json()).intra_op_spinning is True
    with pytest.raises(Exception, match="intra_op_spinning"):
        DetectorSettings(model_file="m", input_name="i", output_names=("o",), intra_op_threads=1, intra_op_spinning="yes")
