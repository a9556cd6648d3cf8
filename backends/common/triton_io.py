"""Small helpers the Python-backend model.py files share. Imported only inside Triton's stub."""
from __future__ import annotations

import json
import traceback
from typing import Any, Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common.tensors import CONFIG_PARAMETER
from backends.errors import BackendError, CloudUnavailableError


def model_settings(args: dict) -> dict[str, Any]:
    """The JSON settings the builder put in the model's `config` parameter."""
    model_config = json.loads(args["model_config"])
    raw = model_config.get("parameters", {}).get(CONFIG_PARAMETER, {}).get("string_value")
    if raw is None:
        raise pb_utils.TritonModelException(f"model {args['model_name']} has no '{CONFIG_PARAMETER}' parameter; re-render the repository")
    return json.loads(raw)


def error_response(exc: Exception) -> "pb_utils.InferenceResponse":
    """One request's error: the caller's fault is INVALID_ARG, an unreachable dependency UNAVAILABLE."""
    if isinstance(exc, CloudUnavailableError):
        code = pb_utils.TritonError.UNAVAILABLE
    elif isinstance(exc, BackendError):
        code = pb_utils.TritonError.INVALID_ARG
    else:
        code = pb_utils.TritonError.INTERNAL
        pb_utils.Logger.log_error("".join(traceback.format_exception(exc)))
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code))


def respond_each(requests: list, handle: Callable[[Any], list]) -> list:
    """Exactly one response per request; an exception in one request fails only that request."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except Exception as exc:  # noqa: BLE001 - every failure must become that request's response
            responses.append(error_response(exc))
    return responses


def input_array(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise BackendError(f"request has no input tensor {name!r}")
    return tensor.as_numpy()


def output(name: str, array: np.ndarray) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, array)
