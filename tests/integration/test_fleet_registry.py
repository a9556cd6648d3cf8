"""The registry behind real servers: `mlflow server --serve-artifacts` (SQLite backend, then PostgreSQL), bundles
pushed through its artifact proxy, resolved, and downloaded by the sidecar's downloader from the proxied URL,
whole and resumed with Range. Every server runs on a free loopback port and is stopped by PID."""
from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from builder.device_class import ArtifactClasses
from edgestack.server import free_port
from fleet.mlflow_server import MlflowServer
from fleet.registry import Registry
from sidecar.bundle import create_bundle
from sidecar.download import download, part_path
from sidecar.keys import generate_key
from sidecar.trust import format_time

pytestmark = pytest.mark.integration

POSTGRES_BIN = Path(os.environ.get("EDGESTACK_POSTGRES_BIN", "/usr/local/bin"))
UNPRIVILEGED = "nobody"  # initdb and postgres refuse to run as root


def assert_group_gone(pid: int) -> None:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return
    os.killpg(pid, signal.SIGKILL)
    pytest.fail(f"processes of group {pid} were still running after stop()")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bundles")
    folder = tmp / "detect_detector" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(3 << 20))
    keys, expires = [generate_key()], format_time(datetime.now(timezone.utc) + timedelta(days=30))
    made = {}
    for name, semver, classes in (("x86", "2.0.0", ("x86-avx2", "x86-vnni")), ("arm", "2.0.0", ("arm64-neon",)),
                                  ("next", "2.1.0", ("x86-avx2",))):
        made[name] = create_bundle(folder, tmp / f"detector-{semver}-{name}.tar", model_name="detect_detector",
                                   model_version=semver, target="cpu", metadata_version=1, keys=keys,
                                   expires=expires, device_classes=ArtifactClasses(classes))
    return made


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def push_resolve_download(server: MlflowServer, bundles: dict[str, Path], tmp: Path) -> None:
    registry = Registry(server.url)
    started = time.perf_counter()
    record = registry.push([bundles["x86"], bundles["arm"]], changelog="through the proxy",
                           metrics={"x86-vnni": {"p99_ms": 30.0}})
    pushed = bundles["x86"].stat().st_size + bundles["arm"].stat().st_size
    print(f"push of 2 bundles ({pushed / 2**20:.1f} MiB) through "
          f"{server.backend_store_uri.split(':')[0]}: {time.perf_counter() - started:.2f} s")
    assert record.artifact_uri.startswith("mlflow-artifacts:/")
    registry.push([bundles["next"]])
    registry.promote("detect_detector", "2.0.0", "production")

    release = Registry(server.url).resolve("detect_detector", "production")
    assert (release.version, release.registry_version, release.metrics) == ("2.0.0", "1", {"x86-vnni": {"p99_ms": 30.0}})
    ref = release.bundle_for(("x86-vnni",))
    assert ref.url.startswith(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/")
    assert (ref.sha256, ref.size) == (sha256(bundles["x86"]), bundles["x86"].stat().st_size)
    with urllib.request.urlopen(ref.url, timeout=30) as response:
        assert response.read() == bundles["x86"].read_bytes()

    whole = download(ref.url, tmp / "whole.tar", expected_size=ref.size, expected_sha256=ref.sha256)
    assert sha256(whole) == ref.sha256

    resumed = tmp / "resumed.tar"
    half = ref.size // 2
    part_path(resumed).write_bytes(bundles["x86"].read_bytes()[:half])  # a download cut off half way
    received: list[int] = []
    download(ref.url, resumed, expected_size=ref.size, expected_sha256=ref.sha256, chunk=64 << 10,
             progress=lambda have, total: received.append(have))
    assert received[0] == half + (64 << 10), "the server ignored Range: the download started over"
    assert sha256(resumed) == ref.sha256

    arm = release.bundle_for(("arm64-neon",))
    assert sha256(download(arm.url, tmp / "arm.tar", expected_size=arm.size, expected_sha256=arm.sha256)) \
        == sha256(bundles["arm"])
    assert [(r.semver, r.aliases) for r in registry.list("detect_detector")] == [("2.1.0", ()),
                                                                                  ("2.0.0", ("production",))]


def test_registry_behind_mlflow_server_with_sqlite(bundles, tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", workdir=tmp_path / "work",
                          log_path=tmp_path / "mlflow.log")
    started = time.perf_counter()
    with server:
        print(f"mlflow server (SQLite) ready in {time.perf_counter() - started:.1f} s")
        pid = server.pid
        push_resolve_download(server, bundles, tmp_path)
        stored = list((tmp_path / "artifacts").rglob("detector-2.0.0-x86.tar"))
        assert len(stored) == 1 and stored[0].read_bytes() == bundles["x86"].read_bytes()
    assert_group_gone(pid)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []  # nothing written to the working folder


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder on a free port, run as an unprivileged user; its URI."""
    import psycopg2

    if not (POSTGRES_BIN / "initdb").is_file():
        pytest.skip(f"no PostgreSQL binaries in {POSTGRES_BIN} (EDGESTACK_POSTGRES_BIN)")
    folder = Path(tempfile.mkdtemp(prefix="edgestack-pg-"))  # not under pytest's 0700 root-owned tmp
    as_user = []
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        os.chown(folder, user.pw_uid, user.pw_gid)
    port = free_port()
    process = None
    try:
        initdb = subprocess.run([*as_user, str(POSTGRES_BIN / "initdb"), "-D", str(folder / "data"), "-U",
                                 "edgestack", "--auth=trust", "-E", "UTF8", "--no-sync"], capture_output=True,
                                cwd=folder, text=True)
        assert initdb.returncode == 0, f"initdb failed: {initdb.stderr}"
        with open(folder / "postgres.log", "wb") as log:
            process = subprocess.Popen(
                [*as_user, str(POSTGRES_BIN / "postgres"), "-D", str(folder / "data"), "-p", str(port),
                 "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=20",
                 "-c", "shared_buffers=16MB", "-c", "fsync=off"],
                stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "postgres.log").read_text()
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=port, user="edgestack", dbname="postgres")
                break
            except psycopg2.OperationalError:
                assert time.monotonic() < deadline, "PostgreSQL did not accept connections within 60 s"
                time.sleep(0.2)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        # the driver named: SQLAlchemy 2.1's default for postgresql:// is psycopg 3, psycopg2 is what is installed
        yield f"postgresql+psycopg2://edgestack@127.0.0.1:{port}/mlflow"
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            assert_group_gone(process.pid)
        shutil.rmtree(folder, ignore_errors=True)


def test_registry_behind_mlflow_server_with_postgresql(postgres, bundles, tmp_path):
    server = MlflowServer(postgres, tmp_path / "artifacts", log_path=tmp_path / "mlflow.log")
    started = time.perf_counter()
    with server:
        print(f"mlflow server (PostgreSQL) ready in {time.perf_counter() - started:.1f} s")
        pid = server.pid
        push_resolve_download(server, bundles, tmp_path)
    assert_group_gone(pid)
