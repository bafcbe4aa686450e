"""The API reads where it listens from the kernel: a wildcard bind is seen as beyond loopback."""
from __future__ import annotations

import socket

import pytest

from api.listen import beyond_loopback, is_loopback, listening_addresses


def _listener(host: str, family=socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen()
    return s


@pytest.mark.parametrize("host,family,reachable", [
    ("127.0.0.1", socket.AF_INET, False),
    ("0.0.0.0", socket.AF_INET, True),
    ("::1", socket.AF_INET6, False),
    ("::", socket.AF_INET6, True),
])
def test_listening_addresses_see_this_processs_own_sockets(host, family, reachable):
    s = _listener(host, family)
    try:
        port = s.getsockname()[1]
        addrs = listening_addresses()
        assert addrs is not None
        mine = [(a, p) for a, p in addrs if p == port]
        assert mine and all(socket.inet_pton(family, a) == socket.inet_pton(family, host) for a, _ in mine), mine
        assert bool(beyond_loopback(mine)) is reachable
    finally:
        s.close()
    assert all(p != port for _, p in listening_addresses())  # closed: gone from the table


def test_a_client_socket_is_not_a_listener():
    srv = _listener("127.0.0.1")
    c = socket.create_connection(srv.getsockname())
    try:
        ports = {p for _, p in listening_addresses()}
        assert srv.getsockname()[1] in ports and c.getsockname()[1] not in ports
    finally:
        c.close(); srv.close()


@pytest.mark.parametrize("host,expected", [("127.0.0.1", True), ("127.8.0.2", True), ("::1", True),
                                           ("localhost", True), ("::ffff:127.0.0.1", True), ("", False),
                                           ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
                                           ("example.com", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected
