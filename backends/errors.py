"""The root of every error the project raises on purpose, and the errors of the backends' plain functions.

The root lives here because backends/ is copied alone into each rendered model repository and may import
nothing outside itself; edgestack.errors re-exports it.

EdgestackError                 (this module; edgestack.errors re-exports it)
 +-- BackendError              (this module) a backend step refuses one request
 |    +-- InvalidImageError    the request's image cannot be used (empty, undecodable, truncated, too small/large)
 |    +-- InvalidTensorError   a tensor has the wrong dtype, shape or contents
 |    +-- CloudUnavailableError  the cloud endpoint failed, timed out or is shut off by the circuit breaker
 |    +-- BusyError            the step refuses work it cannot take now (a large image while another decodes)
 +-- SettingsError             (this module) a step's settings (backends.common.settings) are missing or invalid
 +-- BuilderError              (builder.errors) a spec, config, target or model variant cannot be built
 +-- SidecarError              (sidecar.errors) trust, bundles, deltas, downloads, Triton control, gate, state
 +-- FleetError                (fleet.errors) bus documents, NATS transport, registry, rollout strategy and commands
 +-- ServerError, ClientError  (edgestack.errors) tritonserver or a detection request failed
 +-- LoadTestError             (edgestack.load) the load test could not be run

edgestack.cli.main catches EdgestackError once: `edgestack <command>: error: <message>`, exit code 2.
model.py files map BackendError to pb_utils.TritonError codes for one request; anything else is a server bug.
"""


class EdgestackError(Exception):
    """Root of every error the project raises on purpose; anything else is a bug."""


class BackendError(EdgestackError):
    """Base of every error the backends raise on purpose."""


class InvalidImageError(BackendError):
    """The encoded image cannot be turned into a model input."""


class InvalidTensorError(BackendError):
    """A tensor does not have the dtype, shape or values the step expects."""


class BusyError(BackendError):
    """The step is busy with work of this kind and refuses more for now; the caller may retry (UNAVAILABLE)."""


class CloudUnavailableError(BackendError):
    """The cloud endpoint did not answer in time, answered with an error, or is shut off."""


class SettingsError(EdgestackError, ValueError):
    """The settings the builder wrote for a step (backends.common.settings) are missing or invalid.

    A ValueError too, so code that validates values (the spec loader) treats it as one."""
