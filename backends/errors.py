"""Errors raised by the backends' plain functions.

BackendError
 +-- InvalidImageError   the request's image cannot be used (empty, undecodable, truncated, too small/large)
 +-- InvalidTensorError  a tensor has the wrong dtype, shape or contents
 +-- CloudUnavailableError  the cloud endpoint failed, timed out or is shut off by the circuit breaker

model.py files map these to pb_utils.TritonError codes for one request; anything else is a server bug.
"""


class BackendError(Exception):
    """Base of every error the backends raise on purpose."""


class InvalidImageError(BackendError):
    """The encoded image cannot be turned into a model input."""


class InvalidTensorError(BackendError):
    """A tensor does not have the dtype, shape or values the step expects."""


class CloudUnavailableError(BackendError):
    """The cloud endpoint did not answer in time, answered with an error, or is shut off."""
