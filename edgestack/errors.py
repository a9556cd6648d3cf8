"""Errors of the edgestack command-line and client package, and the project's root EdgestackError
(defined in backends.errors, the one package every other may import; the whole tree is drawn there).

EdgestackError
 +-- ServerError     tritonserver could not be found, started, or did not become ready
 +-- ClientError     a detection request failed (the server's message is kept; tritonclient errors are mapped here)
 +-- BackendError, BuilderError, SidecarError, LoadTestError: see backends.errors

edgestack.cli.main reports every EdgestackError as `edgestack <command>: error: <message>` with exit code 2.
"""
from backends.errors import EdgestackError

__all__ = ["EdgestackError", "ServerError", "ClientError"]


class ServerError(EdgestackError):
    """tritonserver could not be started, or stopped unexpectedly."""


class ClientError(EdgestackError):
    """A request to the server failed; `status` is Triton's status string when there is one."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status
