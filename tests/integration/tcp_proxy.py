"""A loopback TCP proxy that can cut its clients off: a broker outage as a client sees it.

Tests start a broker whose *advertised* listener is this proxy, so every Kafka connection
(bootstrap and per-broker alike) goes through it. :meth:`TcpProxy.cut` then drops the
open connections (a reset, as when a broker or a network path dies) and refuses new
ones until :meth:`TcpProxy.restore`; :meth:`TcpProxy.outage` does both around a block.

A cut can be limited to some Kafka clients: the proxy reads the ``client_id`` in the
header of each connection's first request (every Kafka request carries it), so a test
can cut serving off while its own producer keeps writing to the same broker, which is
the case that matters (records arriving while a follower is away), and is deterministic.
Refusing a matched client means accepting its connection and resetting it at once, as the
listener has to stay open for the others; an unlimited cut closes the listener itself.

Example::

    with TcpProxy("127.0.0.1", broker_port) as proxy:
        ...                      # clients connect to 127.0.0.1:proxy.port
        with proxy.outage(clients=("freshrec-serving",)):
            ...                  # serving's connections are gone and refused meanwhile
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

_HEADER = struct.Struct(">ihhih")  # size, api_key, api_version, correlation_id, client_id length


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target_host:target_port``, with cuts on demand."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = self._listen(port)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, str]] = []  # (client side, broker side, client id)
        self._cut: tuple[str, ...] | None = None  # None: open; () all clients; else client-id prefixes
        self._closed = False
        self.accepted = 0
        self.dropped = 0
        self.refused = 0
        self._accepting = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
        self._accepting.start()

    # -- control ---------------------------------------------------------------------------

    def cut(self, clients: tuple[str, ...] = ()) -> None:
        """Reset the open connections of ``clients`` (client-id prefixes; all when empty) and
        refuse their new ones until :meth:`restore`."""
        with self._lock:
            self._cut = tuple(clients)
            victims = [c for c in self._conns if self._matches(c[2])]
            if not clients:
                self._listener_close()
        for conn in victims:
            self._drop(conn)

    def restore(self) -> None:
        """Accept every client again (the listener is reopened on the same port if it was closed)."""
        with self._lock:
            if self._cut == ():
                self._listener = self._listen(self.port)
                self._accepting = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
                self._accepting.start()
            self._cut = None

    @contextlib.contextmanager
    def outage(self, seconds: float | None = None, clients: tuple[str, ...] = ()) -> Iterator[TcpProxy]:
        """Cut on entry, restore on exit (after ``seconds`` of outage at least, when given)."""
        start = time.monotonic()
        self.cut(clients)
        try:
            yield self
            if seconds is not None:
                time.sleep(max(0.0, seconds - (time.monotonic() - start)))
        finally:
            self.restore()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._listener_close()
            conns = list(self._conns)
        for conn in conns:
            self._drop(conn)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a cut
        s.bind(("127.0.0.1", port))  # loopback only
        s.listen(64)
        return s

    def _listener_close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _matches(self, client_id: str) -> bool:
        cut = self._cut
        return cut is not None and (cut == () or any(client_id.startswith(p) for p in cut))

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed (a cut or close)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            first, client_id = _read_first_request(client)
        except OSError:
            _reset(client)
            return
        with self._lock:
            refuse = self._closed or self._matches(client_id)
        if refuse:
            self.refused += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            upstream.sendall(first)
        except OSError:
            _reset(client)
            return
        conn = (client, upstream, client_id)
        with self._lock:
            if self._closed or self._matches(client_id):  # a cut began meanwhile
                refuse = True
            else:
                self._conns.append(conn)
                self.accepted += 1
        if refuse:
            self.refused += 1
            self._drop(conn)
            return
        threading.Thread(target=self._pump, args=(upstream, client, conn), daemon=True).start()
        self._pump(client, upstream, conn)

    def _pump(self, src: socket.socket, dst: socket.socket, conn: tuple[socket.socket, socket.socket, str]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self._drop(conn, count=False)

    def _drop(self, conn: tuple[socket.socket, socket.socket, str], count: bool = True) -> None:
        with self._lock:
            if conn not in self._conns:
                known = False
            else:
                self._conns.remove(conn)
                known = True
        if known and count:
            self.dropped += 1
        for s in conn[:2]:
            _reset(s)


def _read_first_request(sock: socket.socket) -> tuple[bytes, str]:
    """The bytes of a connection's first Kafka request header and its client id ("" if none)."""
    sock.settimeout(10)
    head = _recv_exact(sock, _HEADER.size)
    _size, _api, _version, _corr, id_len = _HEADER.unpack(head)
    client_id = b""
    if id_len > 0:
        client_id = _recv_exact(sock, id_len)
    sock.settimeout(None)
    return head + client_id, client_id.decode("utf-8", "replace")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed before a full request header")
        buf += chunk
    return buf


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0), as a dead peer or middlebox would, not a polite FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes a pump blocked in recv (close alone does not)
    with contextlib.suppress(OSError):
        sock.close()
