"""ONNX Runtime on CPU with explicit thread settings, batching around graphs with a fixed batch."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import onnxruntime as ort

from backends.detector.runners import concatenate_outputs, output_name_list, single_output
from backends.errors import InvalidTensorError


def make_session(model_path: str, intra_op_threads: int, inter_op_threads: int = 1,
                 spinning: bool = False) -> ort.InferenceSession:
    """spinning: ONNX Runtime's intra-op threads busy-wait for work between operators (its default). Off here: the
    detector shares the cores with preprocess, postprocess and its other instances, and spinning threads take
    them from those (2 threads on a busy core: 10 img/s spinning, 16 not; BENCHMARKS.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxDetector:
    """Runs the named outputs of a model on batches; a graph fixed at batch 1 is run image by image.

    run_outputs(batch) gives every named output; run(batch) the output of a runner with one."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_names: Union[str, Sequence[str]],
                 fixed_batch: int | None):
        self.session = session
        self.input_name = input_name
        self.output_names = output_name_list(output_names)
        self.fixed_batch = fixed_batch
        model_input = next(i for i in session.get_inputs() if i.name == input_name)
        self.item_shape = tuple(d if isinstance(d, int) else -1 for d in model_input.shape[1:])

    def _check(self, batch: np.ndarray) -> None:
        shape = batch.shape[1:]
        if len(shape) != len(self.item_shape) or any(e not in (-1, a) for e, a in zip(self.item_shape, shape)):
            raise InvalidTensorError(f"detector input has shape {batch.shape}; the model needs [N, {self.item_shape}]")

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every named output for the batch, in output_names order."""
        self._check(batch)
        if self.fixed_batch is None:
            return self.session.run(self.output_names, {self.input_name: batch})
        step = self.fixed_batch
        if len(batch) % step:
            raise InvalidTensorError(f"batch of {len(batch)} is not a multiple of the model's fixed batch {step}")
        parts = [self.session.run(self.output_names, {self.input_name: batch[i:i + step]}) for i in range(0, len(batch), step)]
        return concatenate_outputs(parts)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return single_output(self.run_outputs(batch), self.output_names)


def run_requests(run_outputs, batches: list) -> list:
    """Outputs (a list of arrays, as run_outputs gives them, or the exception) per request: one combined run,
    or one run each if that fails.

    Items of `batches` that are already exceptions pass through, so one bad request never fails the others.
    """
    results: list = list(batches)
    good = [i for i, b in enumerate(batches) if not isinstance(b, Exception)]
    if not good:
        return results
    try:
        arrays = [batches[i] for i in good]
        combined = run_outputs(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        for n, i in enumerate(good):
            results[i] = [output[offsets[n]:offsets[n + 1]] for output in combined]
    except Exception:  # noqa: BLE001 - isolate the request that broke the combined run
        for i in good:
            try:
                results[i] = run_outputs(batches[i])
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
    return results
