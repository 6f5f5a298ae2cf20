"""The relay the standalone backend cuts to play a dependency's outage."""

from __future__ import annotations

import socket
import threading

import pytest

from fixtures.standalone.relay import Relay


def echo_until_closed(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1024):
                conn.sendall(data)
        except OSError:
            pass


@pytest.fixture
def echo():
    """A loopback echo server; yields its address, closed afterwards."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo_until_closed, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield server.getsockname()
    stop.set()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    t.join(5)


def roundtrip(port: int, data: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(data)
        return s.recv(1024)


def test_relays_then_refuses_when_cut_then_relays_again(echo):
    relay = Relay(echo)
    try:
        assert roundtrip(relay.port) == b"ping"
        held = socket.create_connection(("127.0.0.1", relay.port), timeout=3)
        held.sendall(b"a")
        assert held.recv(10) == b"a"
        with relay.outage():
            # The open connection is reset, a new one is refused.
            with pytest.raises(OSError):
                held.sendall(b"b")
                if not held.recv(10):
                    raise ConnectionResetError("closed")
            with pytest.raises(OSError):
                data = roundtrip(relay.port)
                if not data:
                    raise ConnectionResetError("closed")
            assert relay.refused >= 1
        held.close()
        assert roundtrip(relay.port, b"back") == b"back"
    finally:
        relay.close()


def test_close_stops_listening(echo):
    relay = Relay(echo)
    port = relay.port
    relay.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).recv(1)
