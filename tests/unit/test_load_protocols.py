"""edgestack.client's load protocols: an unknown one is refused with the list of known ones, before any connection."""
from __future__ import annotations

import pytest

from edgestack.client import LOAD_PROTOCOLS, make_client, sender_factory
from edgestack.errors import ClientError


class _Server:
    http_url = "127.0.0.1:1"
    grpc_url = "127.0.0.1:2"


def test_the_default_load_protocol_is_the_keepalive_client():
    assert LOAD_PROTOCOLS[0] == "http-keepalive" and {"grpc", "http"} <= set(LOAD_PROTOCOLS)


@pytest.mark.parametrize("make", [make_client, sender_factory])
def test_an_unknown_protocol_is_refused(make):
    with pytest.raises(ClientError, match="unknown protocol 'quic'.*http-keepalive"):
        make(_Server(), "quic")


def test_the_keepalive_client_connects_lazily_to_the_server_http_port():
    client = make_client(_Server(), "http-keepalive", model="m")
    assert (client._conn.host, client._conn.port, client.model) == ("127.0.0.1", 1, "m")
    client.close()


def test_edgestack_tune_loads_over_keepalive_http_unless_told():
    from edgestack.cli import make_parser

    parser = make_parser()
    assert parser.parse_args(["tune", "--images", "imgs"]).protocol == "http-keepalive"
    assert parser.parse_args(["tune", "--images", "imgs", "--protocol", "grpc"]).protocol == "grpc"
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--images", "imgs", "--protocol", "quic"])
