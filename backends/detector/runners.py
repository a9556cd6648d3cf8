"""The runner a detector's settings name (make_detector), and what both runners share: their output names,
and the outputs of a batch run in parts."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from backends.common.settings import DetectorSettings


def make_detector(settings: DetectorSettings, model_path: str):
    """An OnnxDetector or OpenVinoDetector, as the settings say; each imports only its own runtime."""
    if settings.runtime == "openvino":
        from backends.detector.openvino_runner import OpenVinoDetector

        return OpenVinoDetector(model_path, settings.input_name, settings.output_names, settings.intra_op_threads,
                                device=settings.device, uint8_input=settings.uint8_input, input_spec=settings.input_spec,
                                inference_precision=settings.inference_precision, streams=settings.streams)
    from backends.detector.onnx_runner import OnnxDetector, make_session

    session = make_session(model_path, intra_op_threads=settings.intra_op_threads, spinning=settings.intra_op_spinning)
    return OnnxDetector(session, settings.input_name, settings.output_names, settings.fixed_batch)


def output_name_list(output_names: Union[str, Sequence[str]]) -> list[str]:
    """One output name, or several in order, as a list."""
    names = [output_names] if isinstance(output_names, str) else list(output_names)
    if not names:
        raise ValueError("a detector needs at least one output name")
    return names


def concatenate_outputs(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The outputs of consecutive sub-batches, joined along the batch dimension output by output."""
    if len(parts) == 1:
        return list(parts[0])
    return [np.concatenate(arrays) for arrays in zip(*parts)]


def single_output(outputs: list[np.ndarray], names: list[str]) -> np.ndarray:
    if len(outputs) != 1:
        raise ValueError(f"run() gives the output of a one-output detector; this one has {names}: use run_outputs()")
    return outputs[0]
