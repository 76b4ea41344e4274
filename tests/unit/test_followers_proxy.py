"""The test proxy that stands in for a broker outage: it forwards, cuts, refuses, and comes back."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.integration.tcp_proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that echoes whatever it receives."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:  # the proxy resets its side on a cut
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _request(client_id: str, payload: bytes = b"") -> bytes:
    """A Kafka-shaped request: size, api key, version, correlation id, client id, body."""
    cid = client_id.encode()
    body = struct.pack(">hhih", 3, 0, 7, len(cid)) + cid + payload
    return struct.pack(">i", len(body)) + body


def _roundtrip(port: int, client_id: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        req = _request(client_id, b"hello")
        s.sendall(req)
        got = b""
        while len(got) < len(req):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed by the proxy")
            got += chunk
        return got


def _connection_is_dead(sock: socket.socket) -> bool:
    try:
        sock.sendall(_request("x"))
        return sock.recv(4096) == b""
    except OSError:
        return True


def test_forwards_cuts_everyone_and_comes_back_on_the_same_port(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        assert _roundtrip(proxy.port, "serving") == _request("serving", b"hello")
        live = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        live.sendall(_request("serving"))
        live.recv(4096)
        proxy.cut()
        assert _connection_is_dead(live)
        live.close()
        with pytest.raises(OSError):  # refused: nothing listens during a full cut
            _roundtrip(proxy.port, "serving")
        proxy.restore()
        assert _roundtrip(proxy.port, "serving") == _request("serving", b"hello")
        assert proxy.dropped >= 1


def test_a_cut_limited_to_some_clients_leaves_the_others_alone(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        with proxy.outage(clients=("freshrec-serving",)):
            with pytest.raises(OSError):
                _roundtrip(proxy.port, "freshrec-serving-adapters")
            assert _roundtrip(proxy.port, "test-producer") == _request("test-producer", b"hello")
        assert _roundtrip(proxy.port, "freshrec-serving") == _request("freshrec-serving", b"hello")
        assert proxy.refused == 1
