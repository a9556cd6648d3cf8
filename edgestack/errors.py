"""Errors of the edgestack command-line and client package.

EdgestackError
 +-- ServerError     tritonserver could not be found, started, or did not become ready
 +-- ClientError     a detection request failed (the server's message is kept; tritonclient errors are mapped here)

Builder errors (builder.errors.BuilderError) pass through the CLI unchanged and are reported the same way.
"""


class EdgestackError(Exception):
    """Base of the edgestack package's errors."""


class ServerError(EdgestackError):
    """tritonserver could not be started, or stopped unexpectedly."""


class ClientError(EdgestackError):
    """A request to the server failed; `status` is Triton's status string when there is one."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status
