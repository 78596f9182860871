"""The core's TLS certificate: made once with the right modes, reused, never half made; and the
pin's errors name the file."""

from __future__ import annotations

import os
import socket
import ssl
import struct
from pathlib import Path

import pytest

from aigis._config import ConfigError, parse_config
from aigis._errors import AigisError
from aigis._rpc import tls

CFG = Path("/etc/aigis/aigis.toml")


def pair(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "state" / "tls" / "cert.pem", tmp_path / "state" / "tls" / "key.pem"


def test_the_certificate_is_made_once_with_its_modes_and_reused(tmp_path):
    cert, key = pair(tmp_path)
    first = tls.load_or_create_certificate(cert, key)
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert os.stat(cert).st_mode & 0o777 == 0o644
    assert os.stat(cert.parent).st_mode & 0o777 == 0o755
    made = cert.read_bytes(), key.read_bytes()
    assert tls.load_or_create_certificate(cert, key) == first  # reused, not made again
    assert (cert.read_bytes(), key.read_bytes()) == made
    assert first == tls.fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))
    assert sorted(p.name for p in cert.parent.parent.iterdir()) == ["tls"]  # no temporaries


def test_the_certificate_is_usable_by_both_contexts(tmp_path):
    cert, key = pair(tmp_path)
    tls.load_or_create_certificate(cert, key)
    context = tls.server_context(cert, key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    pin = tls.Pin(cert)
    assert pin.context.verify_mode == ssl.CERT_REQUIRED
    assert pin.context.check_hostname is False  # the pin is the identity
    assert pin.fingerprint == tls.load_or_create_certificate(cert, key)


def test_two_cores_starting_at_once_agree_on_one_pair(tmp_path, monkeypatch):
    cert, key = pair(tmp_path)
    real = tls.make_self_signed
    theirs: list[str] = []

    def slow_make(name: str) -> tuple[bytes, bytes]:
        made = real(name)
        # meanwhile another core finished making its pair
        monkeypatch.setattr(tls, "make_self_signed", real)
        theirs.append(tls.load_or_create_certificate(cert, key))
        return made

    monkeypatch.setattr(tls, "make_self_signed", slow_make)
    ours = tls.load_or_create_certificate(cert, key)
    assert ours == theirs[0]
    tls.server_context(cert, key)  # the key still matches the certificate
    assert sorted(p.name for p in cert.parent.parent.iterdir()) == ["tls"]


def test_a_missing_key_is_an_error_naming_it_not_a_new_pair(tmp_path):
    cert, key = pair(tmp_path)
    tls.load_or_create_certificate(cert, key)
    key.unlink()
    with pytest.raises(AigisError) as caught:
        tls.load_or_create_certificate(cert, key)
    assert str(caught.value) == (
        f"the core's TLS private key {key} is missing: restore it, or remove {cert.parent} to "
        f"make a new pair (every remote host then needs the new certificate)"
    )


def test_a_key_readable_by_others_is_tightened(tmp_path):
    cert, key = pair(tmp_path)
    tls.load_or_create_certificate(cert, key)
    os.chmod(key, 0o644)
    tls.load_or_create_certificate(cert, key)
    assert os.stat(key).st_mode & 0o777 == 0o600


def test_a_pin_that_is_not_a_certificate_names_its_file(tmp_path):
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match=f"the TLS certificate file {bad} is not a PEM"):
        tls.Pin(bad)
    with pytest.raises(AigisError, match=f"cannot read the TLS certificate {tmp_path}/none"):
        tls.Pin(tmp_path / "none")


def test_multi_part_sends_are_joined_the_same_way_every_time():
    parts = [b"h" * 4, memoryview(b"a" * 300_000), b"z"]
    first = tls._joined(parts)
    assert bytes(first) == b"h" * 4 + b"a" * (tls._CHUNK - 4)
    assert bytes(tls._joined(parts)) == bytes(first)  # a retried TLS write sends the same bytes
    assert tls._joined([b"x"]) == b"x"


# --- settings --------------------------------------------------------------------------------


def test_tcp_is_tls_unless_plaintext_is_allowed():
    settings = parse_config('[aigis]\nstate_dir = "/st"\ntcp = "127.0.0.1:7878"\n', CFG).settings
    assert settings.tcp_plaintext is False
    assert settings.tls_cert_file == Path("/st/tls/cert.pem")
    assert settings.tls_key_file == Path("/st/tls/key.pem")
    allowed = parse_config("[aigis]\ntcp_plaintext = true\n", CFG).settings
    assert allowed.tcp_plaintext is True


def test_tcp_plaintext_must_be_a_boolean():
    with pytest.raises(ConfigError) as caught:
        parse_config('[aigis]\ntcp_plaintext = "yes"\n', CFG)
    assert str(caught.value) == (
        "/etc/aigis/aigis.toml:2: [aigis] tcp_plaintext must be true or false, got str 'yes'"
    )


def reset_connection(listener: socket.socket) -> socket.socket:
    """An accepted connection whose peer reset it before the core could look at it."""
    peer = socket.create_connection(listener.getsockname()[:2])
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST, processed before close() returns on loopback
    sock, _ = listener.accept()
    sock.setblocking(False)
    return sock


def test_a_peer_that_reset_before_tls_wraps_it_is_an_os_error(tmp_path):
    cert, key = pair(tmp_path)
    tls.load_or_create_certificate(cert, key)
    context = tls.server_context(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = reset_connection(listener)
    try:
        with pytest.raises(OSError):  # what the accept loop handles (it closes the socket)
            tls.accept(context, sock)
    finally:
        sock.close()


def test_a_closed_tls_socket_fails_like_a_closed_socket(tmp_path):
    """A slow call's reply may be sent after a stop closed its connection: an OSError, which
    the server handles, as with a plain socket."""
    cert, key = pair(tmp_path)
    tls.load_or_create_certificate(cert, key)
    context = tls.server_context(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname()[:2])
        sock, _ = listener.accept()
    sock.setblocking(False)
    wrapped = tls.accept(context, sock)
    wrapped.close()
    peer.close()
    with pytest.raises(OSError):
        wrapped.send(b"reply")
    with pytest.raises(OSError):
        wrapped.recv_into(bytearray(10))
