"""`edgestack sidecar` client commands: the failures that never reach a daemon (the daemon itself is driven
through these commands in tests/integration/test_sidecar_crash.py)."""
from __future__ import annotations

from edgestack.cli import main
from edgestack.server import free_port


def test_no_daemon_is_a_clear_error(capsys):
    api = f"http://127.0.0.1:{free_port()}"
    assert main(["sidecar", "status", "--api", api, "--timeout-s", "5"]) == 2
    assert f"no sidecar daemon answers at {api}" in capsys.readouterr().err


def test_installing_from_a_url_needs_the_bundle_hash_and_size(capsys):
    assert main(["sidecar", "install", "http://registry.local/v2.bundle", "--api", "http://127.0.0.1:1"]) == 2
    assert "a URL needs --sha256 and --size" in capsys.readouterr().err


def test_rollback_needs_a_reason(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["sidecar", "rollback"])
    assert exit_.value.code == 2 and "--reason" in capsys.readouterr().err


def test_daemon_trusts_the_image_root_on_first_start_and_answers_the_cli(tmp_path, capsys):
    """`python -m sidecar --root` initializes an empty trust store (trust on first use), and serves its API even
    while Triton is unreachable (the recovery is retried by the watch); without a root it refuses to start."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from sidecar.keys import generate_key
    from sidecar.trust import TrustStore, expires_in, make_root, sign
    from tests.conftest import ROOT

    root_keys, bundle_keys = [generate_key()], [generate_key()]
    root = sign(make_root(version=1, expires=expires_in(30), root_keys=root_keys, root_threshold=1,
                          bundle_keys=bundle_keys, bundle_threshold=1), root_keys)
    (tmp_path / "root.json").write_text(json.dumps(root))
    (tmp_path / "models" / "detect_detector" / "1").mkdir(parents=True)
    port = free_port()
    base = [sys.executable, "-m", "sidecar", "--repository", str(tmp_path / "models"), "--triton-http",
            f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"), "--trust-dir",
            str(tmp_path / "trust"), "--port", str(port), "--watch-s", "0"]
    refused = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "start with --root ROOT_JSON" in refused.stderr

    daemon = subprocess.Popen(base + ["--root", str(tmp_path / "root.json")], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline, code = time.monotonic() + 60, 2
        while code != 0 and time.monotonic() < deadline:
            assert daemon.poll() is None, "the daemon exited"
            time.sleep(0.2)
            code = main(["sidecar", "status", "--api", f"http://127.0.0.1:{port}", "--timeout-s", "5"])
            out = capsys.readouterr().out
        assert code == 0 and json.loads(out)["state"] == "IDLE"
        assert TrustStore(tmp_path / "trust").root.version == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    assert not os.path.exists(tmp_path / "models" / "detect_detector" / "2")


def test_unblock_needs_a_reason(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["sidecar", "unblock", "abcdef0123"])
    assert exit_.value.code == 2 and "--reason" in capsys.readouterr().err
