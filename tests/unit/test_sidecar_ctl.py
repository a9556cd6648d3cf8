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
