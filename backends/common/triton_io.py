"""Small helpers the Python-backend model.py files share. Imported only inside Triton's stub."""
from __future__ import annotations

import traceback
from typing import Any, Callable, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common.settings import JsonSettings
from backends.errors import BackendError, BusyError, CloudUnavailableError

S = TypeVar("S", bound=JsonSettings)


def model_settings(args: dict, settings_class: type[S]) -> S:
    """The settings the builder put in the model's `config` parameter (backends.common.settings); a
    SettingsError, which fails the model's load, when they are missing or invalid."""
    return settings_class.from_model_config(args["model_config"], args["model_name"])


def error_response(exc: Exception) -> "pb_utils.InferenceResponse":
    """One request's error: the caller's fault is INVALID_ARG, an unreachable dependency UNAVAILABLE."""
    if isinstance(exc, (CloudUnavailableError, BusyError)):
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
