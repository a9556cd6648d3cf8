"""The sidecar's local HTTP API (stdlib ThreadingHTTPServer, JSON in and out, 127.0.0.1 only).

  GET  /status                      the agent's state, candidate, committed versions, last error
  GET  /versions                    {"current", "previous", "kept", "on_disk", "candidate", "serving", "loaded"}
  GET  /history                     the persisted history (transitions, gate reports, rollbacks with reasons)
  POST /install  {"bundle": PATH}   or {"url": URL, "sha256": HEX, "size": N}; add "wait": true to answer
                                    when the install ends (200, or 422 with the error); else 202 at once
  POST /rollback {"reason": TEXT}   stops an install in flight, or rolls back to the previous committed version
  POST /root {"root": ENVELOPE}     key rotation: trust the next root.json (signed by the current root's
                                    threshold and by its own), made by `edgestack keys rotate`
  GET  /blocked                     bundles refused because an install verified them bad (sha256, reason, ...)
  POST /unblock {"sha256": PREFIX, "reason": TEXT}
                                    let a blocked bundle be installed again; recorded in the history
Errors: 400 bad request, 404 unknown path, 409 busy or an interrupted install, 422 the install, rollback or
unblock failed (the body says why), 500 anything else.
"""
from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sidecar.agent import Agent, AgentBusyError
from sidecar.errors import SidecarError, StateError
from sidecar.state import TERMINAL, State
from sidecar.triton_control import TritonControl

MAX_BODY = 64 << 10


class _BadRequest(Exception):
    pass


def _error_status(exc: Exception) -> HTTPStatus:
    if isinstance(exc, (AgentBusyError, StateError)):
        return HTTPStatus.CONFLICT
    if isinstance(exc, SidecarError):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    return HTTPStatus.INTERNAL_SERVER_ERROR


class SidecarAPI:
    def __init__(self, agent: Agent, port: int = 0):
        self.agent = agent
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._jobs: list[threading.Thread] = []

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- endpoints --------------------------------------------------------------------------------------

    def live_versions(self) -> dict[str, Any]:
        """What Triton runs now (a fresh client: handler threads are short-lived)."""
        control = TritonControl(self.agent.control.url, self.agent.repository, self.agent.control.detector_model,
                                self.agent.control.ensemble_model, timeout_s=5)
        try:
            return {"serving": control.pinned_version(), "loaded": control.ready_versions()}
        except SidecarError as exc:
            return {"serving": None, "loaded": None, "triton_error": str(exc)}
        finally:
            control.close()

    def install(self, body: dict[str, Any]) -> tuple[HTTPStatus, dict[str, Any]]:
        source = body.get("bundle") or body.get("url")
        if not isinstance(source, str) or not source:
            raise _BadRequest('install needs {"bundle": path} or {"url": url, "sha256": hex, "size": bytes}')
        size = body.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise _BadRequest("size must be a non-negative integer")
        kwargs = {"sha256": body.get("sha256"), "size": size}
        if body.get("wait"):
            return HTTPStatus.OK, self.agent.install(source, **kwargs)
        status = self.agent.status()
        if status["busy"]:
            raise AgentBusyError(f"the agent is busy ({status['busy']})")
        if State(status["state"]) not in TERMINAL:
            raise StateError(f"an install was interrupted in {status['state']}: the agent recovers first")

        def job() -> None:
            try:
                self.agent.install(source, **kwargs)
            except Exception:  # noqa: BLE001 - recorded in the state, history and last_error
                pass

        thread = threading.Thread(target=job, name="sidecar-install", daemon=True)
        thread.start()
        self._jobs = [t for t in self._jobs if t.is_alive()] + [thread]
        return HTTPStatus.ACCEPTED, {"accepted": True, "bundle": source}

    def route(self, method: str, path: str, body: dict[str, Any]) -> tuple[HTTPStatus, Any]:
        if method == "GET" and path == "/status":
            return HTTPStatus.OK, self.agent.status()
        if method == "GET" and path == "/versions":
            return HTTPStatus.OK, {**self.agent.versions(), **self.live_versions()}
        if method == "GET" and path == "/history":
            return HTTPStatus.OK, self.agent.history()
        if method == "GET" and path == "/blocked":
            return HTTPStatus.OK, self.agent.blocked()
        if method == "POST" and path == "/unblock":
            prefix, reason = body.get("sha256"), body.get("reason")
            if not isinstance(prefix, str) or not isinstance(reason, str) or not reason.strip():
                raise _BadRequest('unblock needs {"sha256": "hex prefix", "reason": "why"}')
            return HTTPStatus.OK, self.agent.unblock(prefix, reason)
        if method == "POST" and path == "/install":
            return self.install(body)
        if method == "POST" and path == "/root":
            if not isinstance(body.get("root"), dict):
                raise _BadRequest('root needs {"root": <signed root.json>}')
            return HTTPStatus.OK, self.agent.update_root(body["root"])
        if method == "POST" and path == "/rollback":
            reason = body.get("reason")
            if not isinstance(reason, str) or not reason.strip():
                raise _BadRequest('rollback needs {"reason": "why"}')
            return HTTPStatus.OK, self.agent.rollback(reason)
        return HTTPStatus.NOT_FOUND, {"error": f"no {method} {path}"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgestack-sidecar"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the agent logs JSON
                pass

            def _send(self, status: HTTPStatus, payload: Any) -> None:
                data = json.dumps(payload, default=str).encode() + b"\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                try:
                    body: Any = {}
                    if method == "POST":
                        length = int(self.headers.get("Content-Length") or 0)
                        if length > MAX_BODY:
                            raise _BadRequest(f"body over {MAX_BODY} bytes")
                        raw = self.rfile.read(length) if length else b"{}"
                        try:
                            body = json.loads(raw or b"{}")
                        except ValueError as exc:
                            raise _BadRequest(f"body is not JSON: {exc}") from exc
                        if not isinstance(body, dict):
                            raise _BadRequest("body must be a JSON object")
                    status, payload = api.route(method, self.path.split("?", 1)[0], body)
                except _BadRequest as exc:
                    status, payload = HTTPStatus.BAD_REQUEST, {"error": str(exc)}
                except Exception as exc:  # noqa: BLE001 - every request gets a JSON answer
                    status, payload = _error_status(exc), {"error": str(exc), "type": type(exc).__name__}
                self._send(status, payload)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        return Handler
