"""Resumable downloads against a real HTTP server on 127.0.0.1 that drops connections on purpose."""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sidecar.download import download, part_path
from sidecar.errors import DownloadError

DATA = bytes(range(256)) * 1200  # 307,200 bytes
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Behaviour:
    drop_first: int = 0  # the first K responses ...
    drop_after: int = 0  # ... are cut after this many body bytes
    ignore_range: bool = False  # answer 200 with the whole file to Range requests
    extra: bytes = b""  # served after the file
    declare_length: bool = True
    status: int | None = None  # answer every request with this error status
    ranges: list = field(default_factory=list)  # the Range header of each request (None when absent)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        b: Behaviour = self.server.behaviour
        number = len(b.ranges)
        requested = self.headers.get("Range")
        b.ranges.append(requested)
        if b.status:
            self.send_error(b.status)
            return
        body, start = DATA + b.extra, 0
        if requested and not b.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if b.declare_length:
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if number < b.drop_first:
            self.wfile.write(payload[:b.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-body
        else:
            self.wfile.write(payload)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(httpd, path="/model.onnx") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def fetch(httpd, dest, **kwargs):
    options = dict(expected_size=len(DATA), expected_sha256=SHA, backoff_s=0, timeout_s=5, chunk=16 * 1024)
    options.update(kwargs)
    return download(url(httpd), dest, **options)


def test_resumes_with_range_after_dropped_connections(server, tmp_path):
    server.behaviour.drop_first, server.behaviour.drop_after = 2, 100_000
    seen = []
    dest = fetch(server, tmp_path / "model.onnx", progress=lambda got, total: seen.append((got, total)))
    assert dest.read_bytes() == DATA
    assert server.behaviour.ranges == [None, "bytes=100000-", "bytes=200000-"]
    assert not part_path(dest).exists()
    assert seen[-1] == (len(DATA), len(DATA)) and all(got <= total for got, total in seen)


def test_server_ignoring_range_restarts_from_zero_and_completes(server, tmp_path):
    server.behaviour.drop_first, server.behaviour.drop_after, server.behaviour.ignore_range = 1, 100_000, True
    dest = fetch(server, tmp_path / "model.onnx")
    assert dest.read_bytes() == DATA
    assert server.behaviour.ranges == [None, "bytes=100000-"]


@pytest.mark.parametrize("declare_length", [True, False])
def test_longer_body_is_refused_without_writing_past_the_expected_size(server, tmp_path, declare_length):
    server.behaviour.extra, server.behaviour.declare_length = b"x" * 50_000, declare_length
    written = [0]
    dest = tmp_path / "model.onnx"
    with pytest.raises(DownloadError, match="declares|longer"):
        fetch(server, dest, progress=lambda got, total: written.append(got))
    assert max(written) <= len(DATA)
    assert max(written) == (0 if declare_length else len(DATA))  # with a length, refused before any byte
    assert not dest.exists() and not part_path(dest).exists()
    assert len(server.behaviour.ranges) == 1  # wrong content is not retried


def test_gives_up_after_max_tries_then_a_later_call_resumes(server, tmp_path):
    server.behaviour.drop_first, server.behaviour.drop_after = 10 ** 6, 50_000
    dest = tmp_path / "model.onnx"
    with pytest.raises(DownloadError) as info:
        fetch(server, dest, max_tries=3)
    message = str(info.value)
    assert "after 3 attempts" in message and f"150000 of {len(DATA)} bytes" in message
    assert "connection closed" in message
    assert part_path(dest).stat().st_size == 150_000 and not dest.exists()
    server.behaviour.drop_first = 0
    assert fetch(server, dest).read_bytes() == DATA
    assert server.behaviour.ranges == [None, "bytes=50000-", "bytes=100000-", "bytes=150000-"]


def test_hash_mismatch_is_refused_and_not_renamed_into_place(server, tmp_path):
    dest = tmp_path / "model.onnx"
    with pytest.raises(DownloadError, match="sha256"):
        fetch(server, dest, expected_sha256="0" * 64)
    assert not dest.exists() and not part_path(dest).exists()


def test_connection_refused_is_retried_and_reported(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(DownloadError, match="after 2 attempts: 0 of"):
        download(f"http://127.0.0.1:{port}/m", tmp_path / "m", expected_size=len(DATA), expected_sha256=SHA,
                 max_tries=2, backoff_s=0, timeout_s=2)


def test_http_404_is_not_retried(server, tmp_path):
    server.behaviour.status = 404
    with pytest.raises(DownloadError, match="404"):
        fetch(server, tmp_path / "m")
    assert len(server.behaviour.ranges) == 1
