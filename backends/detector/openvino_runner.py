"""OpenVINO on CPU (or AUTO) with explicit thread settings; the same run() contract as OnnxDetector.

With uint8_input the compiled model takes the resized uint8 pixels and converts them itself
(openvino.preprocess: convert -> multiply(scale) -> subtract(mean) -> divide(std), each only where it
changes values), so the image crosses the Python backend's shared memory as uint8 - the same idea as
builder/input_fusion.py for ONNX Runtime.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import openvino as ov

from backends.detector.runners import concatenate_outputs, output_name_list, single_output
from backends.errors import InvalidTensorError

DEVICES = ("CPU", "AUTO")
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")


def compile_config(device: str, threads: int, pin_threads: bool = False, inference_precision: str = "f32",
                   streams: int = 1) -> dict[str, Any]:
    """Latency-oriented settings: one stream, `threads` inference threads (0: OpenVINO decides); with `streams` > 1
    that many streams sharing the threads (throughput-oriented: one image per stream at a time).

    inference_precision is pinned to f32 by default: on CPUs with AVX512-BF16/AMX the plugin otherwise
    runs every float op in bf16, which rounds CenterNet's box coordinates (up to 512) to whole pixels
    or coarser and shifts scores in the second decimal. INT8 layers stay INT8 either way.
    """
    if inference_precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"inference precision {inference_precision!r} is not one of {INFERENCE_PRECISIONS}")
    if streams < 1:
        raise ValueError(f"OpenVINO streams must be >= 1, got {streams}")
    cpu: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        "NUM_STREAMS": int(streams),
        "INFERENCE_PRECISION_HINT": inference_precision,
        # Several detector instances (separate processes) each pin to "their" first core otherwise,
        # which is the same core for all of them.
        "ENABLE_CPU_PINNING": bool(pin_threads),
    }
    if threads > 0:
        cpu["INFERENCE_NUM_THREADS"] = int(threads)
    if device == "CPU":
        return cpu
    return {"PERFORMANCE_HINT": cpu["PERFORMANCE_HINT"], "DEVICE_PROPERTIES": {"CPU": cpu}}


def _spec_value(spec: Any, name: str, default: Any) -> Any:
    if spec is None:
        return default
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def add_uint8_input(model: "ov.Model", input_name: str, input_spec: Any = None) -> "ov.Model":
    """The model with input `input_name` taking uint8 and converting it inside, per the spec's
    value = (pixel * scale - mean) / std (input_spec: an InputSpec or its dict; None: plain cast)."""
    from openvino import opset13 as ops
    from openvino.preprocess import PrePostProcessor

    names = [n for port in model.inputs for n in port.get_names()]
    if input_name not in names:
        raise InvalidTensorError(f"model has no input {input_name!r}; its inputs: {sorted(names)}")
    element = model.input(input_name).get_element_type()
    if not element.is_real():
        raise InvalidTensorError(f"model input {input_name!r} is {element}, not float; nothing to convert")
    scale = float(_spec_value(input_spec, "scale", 1.0))
    mean = [float(v) for v in _spec_value(input_spec, "mean", (0.0, 0.0, 0.0))]
    std = [float(v) for v in _spec_value(input_spec, "std", (1.0, 1.0, 1.0))]
    layout = str(_spec_value(input_spec, "layout", "NHWC"))

    ppp = PrePostProcessor(model)
    port = ppp.input(input_name)
    port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout(layout))
    port.model().set_layout(ov.Layout(layout))
    steps = port.preprocess()
    steps.convert_element_type(element)
    if scale != 1.0:
        constant = ops.constant(np.asarray(scale, dtype=np.float32)).output(0)
        if element != ov.Type.f32:
            constant = ops.convert(constant, element).output(0)
        steps.custom(lambda node: ops.multiply(node, constant).output(0))
    if any(m != 0.0 for m in mean):
        steps.mean(mean)
    if any(s != 1.0 for s in std):
        steps.scale(std)
    return ppp.build()


class OpenVinoDetector:
    """Runs the named outputs of an OpenVINO model on batches; a graph fixed at batch 1 is run image by image.

    With `streams` > 1 the model is compiled a second time with that many streams sharing the threads: a batch of
    several images (dynamic batching under concurrent load) runs that many images at once, one per stream, while a
    single image (one camera, concurrency 1) still gets every thread of the one-stream model. One Triton instance
    then serves both cases, which otherwise need two layouts (1 instance x N threads, N instances x 1 thread).
    """

    def __init__(self, model_xml: str, input_name: str, output_names: str | Sequence[str], threads: int, device: str = "CPU",
                 uint8_input: bool = False, input_spec: Any = None, pin_threads: bool = False,
                 inference_precision: str = "f32", streams: int = 1):
        if device not in DEVICES:
            raise ValueError(f"OpenVINO device {device!r} is not one of {DEVICES}")
        if streams < 1:
            raise ValueError(f"OpenVINO streams must be >= 1, got {streams}")
        self.core = ov.Core()
        model = self.core.read_model(str(model_xml))
        if uint8_input:
            model = add_uint8_input(model, input_name, input_spec)
        self.input_name = input_name
        self.output_names = output_name_list(output_names)
        self.uint8_input = uint8_input
        self.compiled = self.core.compile_model(model, device, compile_config(device, threads, pin_threads, inference_precision))
        self.request = self.compiled.create_infer_request()
        self.streams = streams
        self.parallel = None  # the several-stream model and its requests, one per stream
        if streams > 1:
            parallel = self.core.compile_model(model, device, compile_config(device, threads, pin_threads,
                                                                             inference_precision, streams))
            self.parallel = ov.AsyncInferQueue(parallel, streams)
            self.parallel_ports = [parallel.output(name) for name in self.output_names]
            self.parallel_input = parallel.input(input_name)
        self.input_port = self.compiled.input(input_name)
        self.output_ports = [self.compiled.output(name) for name in self.output_names]
        shape = self.input_port.get_partial_shape()
        self.item_shape = tuple(d.get_length() if d.is_static else -1 for d in list(shape)[1:])
        batch = shape[0]
        self.fixed_batch = batch.get_length() if batch.is_static else None
        self.dtype = self.input_port.get_element_type().to_dtype()

    def _check(self, batch: np.ndarray) -> None:
        if self.uint8_input and batch.dtype != np.uint8:
            raise InvalidTensorError(f"detector input is {batch.dtype}; this model takes uint8 pixels")
        shape = batch.shape[1:]
        if batch.ndim < 1 or len(shape) != len(self.item_shape) or any(e not in (-1, a) for e, a in zip(self.item_shape, shape)):
            raise InvalidTensorError(f"detector input has shape {batch.shape}; the model needs [N, {self.item_shape}]")

    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        self.request.infer({self.input_port: np.ascontiguousarray(batch, dtype=self.dtype)}, share_inputs=True)
        return [self.request.get_tensor(port).data.copy() for port in self.output_ports]

    def _infer_parallel(self, parts: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Each part on its own stream, as many at once as there are streams; outputs in part order."""
        results: list = [None] * len(parts)

        def done(request, index: int) -> None:
            results[index] = [request.get_tensor(port).data.copy() for port in self.parallel_ports]

        self.parallel.set_callback(done)
        for index, part in enumerate(parts):
            self.parallel.start_async({self.parallel_input: np.ascontiguousarray(part, dtype=self.dtype)}, index,
                                      share_inputs=True)
        self.parallel.wait_all()
        return results

    def _parts(self, batch: np.ndarray) -> list[np.ndarray]:
        """The batch in the pieces the graph takes: its fixed batch, or one piece per stream for a dynamic graph."""
        if self.fixed_batch is None:
            pieces = min(len(batch), self.streams if self.parallel is not None else 1)
            return np.array_split(batch, max(pieces, 1))
        step = self.fixed_batch
        if len(batch) % step:
            raise InvalidTensorError(f"batch of {len(batch)} is not a multiple of the model's fixed batch {step}")
        return [batch[i:i + step] for i in range(0, len(batch), step)]

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every named output for the batch, in output_names order."""
        self._check(batch)
        parts = self._parts(batch)
        if self.parallel is None or len(parts) < 2:
            return concatenate_outputs([self._infer(part) for part in parts])
        # Whole waves on the streams; one image left over gets every thread rather than one stream's share.
        spread = len(parts) - 1 if len(parts) % self.streams == 1 else len(parts)
        outputs = self._infer_parallel(parts[:spread]) + [self._infer(part) for part in parts[spread:]]
        return concatenate_outputs(outputs)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return single_output(self.run_outputs(batch), self.output_names)
