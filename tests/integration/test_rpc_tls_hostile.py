# ruff: noqa: F811 - pytest fixtures imported by name
"""Hostile TLS peers against the core's TCP listener: whatever they send, reset or renegotiate,
the I/O loop keeps serving everyone else."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

from tests.integration.test_rpc import (  # noqa: F401 - fixtures used by name
    corething,
    server_log,
    sockdir,
)
from tests.integration.test_rpc_tls import make_tls_core  # noqa: F401

pytestmark = pytest.mark.integration


def record(content_type: int, body: bytes, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + struct.pack(">H", len(body)) + body


def hello(body: bytes) -> bytes:
    return record(22, b"\x01" + struct.pack(">I", len(body))[1:] + body)


GARBAGE = [
    record(22, b"\x01\x00\x00\x05\x03\x03\x00\x00\x00"),  # a ClientHello shorter than it says
    hello(b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + b"\xff\xff"),
    record(22, b"\x01" + b"\xff" * 200),
    record(21, b"\x02\x28"),  # an alert before anything
    record(23, b"application data before a handshake"),
    b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7,  # an SSLv2 hello
    b"\x16\x03\x01\xff\xff" + b"\x01" * 4096,  # a record longer than TLS allows
    b"\x16\x03\x01\x00\x00",  # an empty handshake record
    b"\x16\xfe\xff\x00\x10" + b"\x00" * 16,  # DTLS's version number
    b"\x16" + b"\x00" * 4,
]


def spoken(core, data: bytes, reset: bool) -> None:
    sock = socket.create_connection(core.tcp, timeout=10)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        sock.sendall(data)
        if not reset:
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    finally:
        sock.close()


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_malformed_tls_from_a_peer_never_stops_the_listener(make_tls_core, reset):
    core = make_tls_core(handshake_timeout=5.0)
    for data in GARBAGE:
        spoken(core, data, reset)
        client = core.client(retry_for=5.0)
        assert client.call(("t", "const")) == 42, data
        client.close()


def test_a_renegotiation_or_garbage_after_the_tls_handshake_only_closes_that_peer(
    make_tls_core,
):
    core = make_tls_core(handshake_timeout=5.0)
    for garbage in (hello(b"\x03\x03" + b"\x00" * 40), record(23, b"x" * 100), b"\x00" * 64):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        raw = socket.create_connection(core.tcp, timeout=10)
        wrapped = context.wrap_socket(raw)
        wrapped.recv(4096)  # the authkey challenge, inside TLS
        # below TLS: bytes the core's TLS must refuse
        raw_send(wrapped, garbage)
        try:
            while wrapped.recv(4096):
                pass
        except OSError:
            pass
        wrapped.close()
        client = core.client(retry_for=5.0)
        assert client.call(("t", "const")) == 42, garbage
        client.close()


def raw_send(wrapped: ssl.SSLSocket, data: bytes) -> None:
    fd = socket.socket(fileno=wrapped.fileno())
    try:
        fd.sendall(data)
    finally:
        fd.detach()


def test_an_unexpected_error_admitting_one_peer_does_not_stop_the_listener(
    make_tls_core, monkeypatch, server_log
):
    """Whatever goes wrong while one accepted connection is set up (here: a ValueError naming
    the peer) closes that connection only; the I/O loop goes on accepting and serving."""
    from aigis._rpc import server as server_module

    real = server_module._identify
    failures = []

    def identify_once(sock, address):
        if not failures:
            failures.append(address)
            raise ValueError("an unexpected peer")
        return real(sock, address)

    core = make_tls_core(handshake_timeout=5.0)
    monkeypatch.setattr(server_module, "_identify", identify_once)
    doomed = socket.create_connection(core.tcp, timeout=10)
    try:
        assert doomed.recv(1) == b""  # closed by the core, which is still running
    finally:
        doomed.close()
    assert failures
    client = core.client(retry_for=5.0)
    assert client.call(("t", "const")) == 42
    client.close()
    (failed,) = [
        r for r in server_log.records if r.getMessage().startswith("failed: connection on")
    ]
    assert "an unexpected peer" in str(failed.exc_info[1])
