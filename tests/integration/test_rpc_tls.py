"""The proxy over TCP with TLS: pinning, refusals, what crosses the wire, and floods.

A CoreServer in this process with the core's own certificate (as ``[aigis] tcp`` runs it by
default), plugins in real subprocesses that pin it through ``AIGIS_TLS_CERT_FILE``.
"""

from __future__ import annotations

import hmac
import os
import select
import socket
import ssl
import struct
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from multiprocess.connection import CHALLENGE, WELCOME, answer_challenge

from aigis._errors import CoreUnavailable
from aigis._rpc import tls, wire
from aigis._rpc.channel import Channel
from aigis._rpc.client import CoreClient, connect_from_env
from tests.integration.daemon import DaemonProcess
from tests.integration.test_rpc import (  # noqa: F401 - fixtures used by name
    Core,
    corething,
    hold_idle,
    sockdir,
    spawn,
    wait_until,
    warnings_from_server,
)
from tests.integration.test_rpc import fd_limit as fd_limit  # noqa: F401
from tests.integration.test_rpc import server_log as server_log  # noqa: F401

pytestmark = pytest.mark.integration

HEADER = wire.HEADER.pack
MARKER = "wire-marker-7c1e"  # an argument and a result a reader of the wire must not see


class TlsCore(Core):
    """The test core with its TCP listener on TLS (unless ``plaintext``), like the daemon's."""

    def __init__(self, sockdir: Path, corething: types.ModuleType, plaintext: bool = False):  # noqa: F811
        super().__init__(sockdir, corething)
        self.cert = sockdir / "tls" / "cert.pem"
        self.key = sockdir / "tls" / "key.pem"
        self.plaintext = plaintext
        tls.load_or_create_certificate(self.cert, self.key)

    def start(self, generation: int = 1, **options: object) -> TlsCore:
        if not self.plaintext:
            options.setdefault("tls_context", tls.server_context(self.cert, self.key))
        super().start(generation, **options)
        return self

    def client(self, transport: str = "tcp", **options: object) -> CoreClient:
        if not self.plaintext:
            options.setdefault("tls_cert_file", self.cert)
        return super().client(transport, **options)


@pytest.fixture
def make_tls_core(sockdir, corething) -> Iterator[Callable[..., TlsCore]]:  # noqa: F811
    cores: list[TlsCore] = []

    def make(plaintext: bool = False, **options: object) -> TlsCore:
        core = TlsCore(sockdir, corething, plaintext).start(**options)
        cores.append(core)
        return core

    yield make
    for core in cores:
        for client in core.clients:
            client.close()
        core.stop()


@pytest.fixture
def tls_core(make_tls_core) -> TlsCore:
    return make_tls_core()


def other_certificate(tmp_path: Path) -> Path:
    """A certificate made the same way, for another core."""
    cert = tmp_path / "other" / "cert.pem"
    tls.load_or_create_certificate(cert, tmp_path / "other" / "key.pem")
    return cert


# --- calls over TLS --------------------------------------------------------------------------


def test_a_plugin_process_calls_the_core_over_tls(tls_core, spawn):  # noqa: F811
    plugin = spawn(tls_core, "launcher", "tcp", env={"AIGIS_TLS_CERT_FILE": str(tls_core.cert)})
    got = plugin.result()

    assert got["add"] == 50
    assert got["lambda"] == ["function", 6]
    assert got["value_error"]["type"] == "ValueError"
    assert got["value_error"]["message"] == "bad value 7"
    assert got["custom_error"]["mro"][:3] == ["CoreValueError", "RemoteError", "ValueError"]
    assert got["connections"] == 1


def test_connect_from_env_pins_the_certificate_named_there(tls_core):
    host, port = tls_core.tcp
    env = {
        "AIGIS_ADDRESS": f"tcp:{host}:{port}",
        "AIGIS_AUTHKEY_FILE": str(tls_core.keyfile),
        "AIGIS_TLS_CERT_FILE": str(tls_core.cert),
    }
    with connect_from_env(env) as client:
        assert client.call(("t", "add"), (1, 2)) == 3
        assert client.call(("t", "blob"), (3_000_000,)) == b"b" * 3_000_000  # many records
        assert client.call(("t", "echo"), (b"e" * 3_000_000,)) == b"e" * 3_000_000
        with pytest.raises(ValueError, match="bad value 7"):
            client.call(("t", "fail_value"))
        assert isinstance(client._chan.sock, ssl.SSLSocket)
        assert client._chan.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_both_ends_set_tcp_nodelay_under_tls(tls_core):
    client = tls_core.client()
    assert client.call(("t", "const")) == 42
    assert client._chan.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    server_side = [c.sock for c in tls_core.server._connections.values()]
    assert server_side and all(
        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in server_side
    )


def test_many_calls_in_a_row_and_threads_share_the_tls_connection(tls_core):
    client = tls_core.client()
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(200):
                assert client.call(("t", "echo"), ((n, i, "x" * (i % 50)),)) == (
                    n,
                    i,
                    "x" * (i % 50),
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert client.connections_opened == 1


# --- refusals --------------------------------------------------------------------------------


def test_a_client_pinning_another_certificate_is_refused(tls_core, tmp_path, server_log):
    other = other_certificate(tmp_path)
    client = tls_core.client(tls_cert_file=other, retry_for=30.0)
    started = time.monotonic()
    with pytest.raises(CoreUnavailable) as caught:
        client.call(("t", "const"))
    host, port = tls_core.tcp
    assert str(caught.value).startswith(
        f"cannot reach the AIGIS core at tcp:{host}:{port}: its TLS certificate is not the one "
        f"pinned in {other} (verification: "
    )
    assert str(caught.value).endswith("(AIGIS_TLS_CERT_FILE)")
    assert time.monotonic() - started < 20  # not retried for the 30 s window: it cannot help
    assert client.connections_opened == 0
    wait_until(lambda: warnings_from_server(server_log), what="the refusal log line")
    (line,) = warnings_from_server(server_log)
    assert line.startswith(f"refused: connection from {host}:")
    assert "bad TLS handshake (" in line


def test_a_plaintext_client_is_refused_by_a_tls_listener(make_tls_core, server_log):
    core = make_tls_core(handshake_timeout=0.3)
    # it waits for the core's challenge, which a TLS listener never sends in the clear
    plain = CoreClient(core.tcp, core.authkey, retry_for=0.5, handshake_timeout=5.0)
    with pytest.raises(CoreUnavailable) as caught:
        plain.call(("t", "const"))
    assert "if the core's TCP listener requires TLS, set AIGIS_TLS_CERT_FILE" in str(caught.value)
    wait_until(lambda: warnings_from_server(server_log), what="the refusal log line")
    line = warnings_from_server(server_log)[0]
    assert line.startswith("refused: connection from 127.0.0.1:")
    assert line.endswith(
        "no TLS handshake within 0.3 s (a plaintext client? this listener requires TLS: set "
        "AIGIS_TLS_CERT_FILE for the plugin, or allow plaintext on a trusted network with "
        "[aigis] tcp_plaintext = true)"
    )
    assert core.client().call(("t", "const")) == 42  # TLS clients are still served


def test_a_tls_client_of_a_plaintext_listener_is_told_so(make_tls_core, server_log):
    core = make_tls_core(plaintext=True)
    client = core.client(tls_cert_file=core.cert, retry_for=30.0)
    with pytest.raises(CoreUnavailable, match=r"TLS handshake failed \(wrong version number\)"):
        client.call(("t", "const"))
    wait_until(lambda: warnings_from_server(server_log), what="the refusal log line")
    (line,) = warnings_from_server(server_log)
    assert "bad handshake (a TLS client on a plaintext listener: " in line
    assert core.client().call(("t", "const")) == 42  # plaintext, explicitly allowed


# --- what crosses the wire -------------------------------------------------------------------


class Relay:
    """A TCP relay on loopback that records both directions: what a network capture sees."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.seen = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target, timeout=10)
        ends = {client: upstream, upstream: client}
        with client, upstream:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(ends), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    self.seen += data
                    ends[sock].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("plaintext", [False, True], ids=["tls", "plaintext allowed"])
def test_no_pickle_and_no_skill_name_cross_the_wire_in_clear_with_tls(make_tls_core, plaintext):
    core = make_tls_core(plaintext=plaintext)
    relay = Relay(core.tcp)
    try:
        client = core.client(retry_for=5.0)
        client.address = relay.address  # every byte between the two ends goes by the relay
        assert client.call(("t", "echo"), (MARKER,)) == MARKER
        assert client.call(("t", "make_adder"), (5,))(1) == 6
        assert client.call(("t", "const")) == 42
        client.close()
    finally:
        relay.close()
    wire = bytes(relay.seen)
    assert len(wire) > 200
    clear = [
        token
        for token in (b"\x80\x04", b"\x80\x05", b"echo", b"make_adder", MARKER.encode())
        if token in wire
    ]
    if plaintext:
        assert b"echo" in clear and MARKER.encode() in clear
        assert b"\x80\x04" in clear or b"\x80\x05" in clear
    else:
        assert clear == []


# --- pending connections: budgets, deadlines, floods -----------------------------------------


def test_a_tls_handshake_never_completed_is_dropped_at_the_deadline(make_tls_core, server_log):
    core = make_tls_core(handshake_timeout=0.3)
    half = socket.create_connection(core.tcp, timeout=10)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    assert half.recv(65536) == b""  # closed by the server, without a byte of reply
    half.close()
    (line,) = warnings_from_server(server_log)
    assert ": no TLS handshake within 0.3 s (a plaintext client? " in line


def test_tls_without_the_authkey_handshake_is_dropped_at_the_same_deadline(
    make_tls_core, server_log
):
    core = make_tls_core(handshake_timeout=0.3)
    pin = tls.Pin(core.cert)
    sock = pin.wrap(socket.create_connection(core.tcp, timeout=10))
    assert sock.recv(65536).startswith(b"\x00\x00\x00\x1f#CHALLENGE#")  # inside TLS
    assert sock.recv(65536) == b""  # and nothing after it: the deadline passed
    sock.close()
    (line,) = warnings_from_server(server_log)
    assert line.endswith(": bad handshake (timed out)")


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)  # with a timeout, even MSG_DONTWAIT waits for data first
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_floods_of_idle_tls_connections_are_bounded_and_do_not_lock_clients_out(
    make_tls_core, server_log, fd_limit
):
    core = make_tls_core(handshake_timeout=30.0)  # the flood is not waited out: it is evicted
    threads = threading.active_count()
    count = max(300, min(1000, (fd_limit - 300) // 2))
    held = hold_idle(core, "tcp", count)  # TCP connections that never send a ClientHello
    try:
        assert len(held) >= 300
        wait_until(lambda: len(core.server._connections) >= 32, what="the flood to be accepted")
        # silent peers get no TLS state (~40 KiB each with OpenSSL 3) until they speak
        assert not any(isinstance(c.sock, ssl.SSLSocket) for c in core.server._connections.values())
        client = core.client(retry_for=5.0)
        assert client.call(("t", "const")) == 42
        assert client.connections_opened == 1
        assert core.client("unix").call(("t", "const")) == 42
        # all but the newest MAX_PENDING_PER_PEER (32, all come from 127.0.0.1) were closed to
        # make room: what the flood holds in the core stays bounded
        wait_until(
            lambda: sum(map(closed_by_server, held)) >= len(held) - 32,
            what="the server to close all but 32 idle TLS connections",
        )
        assert len(core.server._connections) <= 32 + 2
        assert threading.active_count() == threads  # and no thread per connection
    finally:
        for sock in held:
            sock.close()
    assert len(warnings_from_server(server_log)) <= 20


def test_a_pipelined_burst_in_one_tls_record_is_served_in_full(tls_core):
    client = tls_core.client()
    assert client.call(("t", "const")) == 42
    chan = client._chan
    frames = [
        wire.HEADER.pack(len(p)) + p
        for p in (wire.plain_call(("t", "generation")), wire.plain_call(("t", "const")))
    ] * 20
    chan.sock.sendall(b"".join(frames))  # one write: one TLS record holding 40 requests
    replies = [wire.decode_reply(chan.recv_message()) for _ in frames]
    assert replies == [(True, 1), (True, 42)] * 20


def test_a_request_behind_the_authkey_handshake_in_one_record_is_served(tls_core):
    """The client's last handshake frame and its first request in one TLS record: the core
    reads the handshake exactly, so the request waits inside TLS, where epoll cannot see it."""
    sock = tls.Pin(tls_core.cert).wrap(socket.create_connection(tls_core.tcp, timeout=10))
    chan = Channel(sock)
    answer_challenge(chan, tls_core.authkey)  # the core's challenge, answered
    nonce = os.urandom(20)
    chan.send_bytes(CHALLENGE + nonce)  # ours, answered by the core
    assert chan.recv_bytes(256) == hmac.new(tls_core.authkey, nonce, "md5").digest()
    request = wire.plain_call(("t", "const"))
    sock.sendall(HEADER(len(WELCOME)) + WELCOME + HEADER(len(request)) + request)
    assert wire.decode_reply(chan.recv_message()) == (True, 42)
    sock.close()


def test_peers_that_reset_before_the_core_accepts_them_do_not_stop_it(tls_core, sockdir):  # noqa: F811
    """The I/O loop is held by a call (no handover: inline_limit is long) while peers connect
    and reset; then it accepts them. Wrapping a reset socket in TLS used to raise out of the
    accept loop and stop the server."""
    from aigis._rpc.server import CoreServer

    server = CoreServer(
        lambda path: (lambda: time.sleep(1.0)) if path == ("sleep",) else None,
        unix_path=sockdir / "slow.sock",
        tcp=("127.0.0.1", 0),
        authkey=tls_core.authkey,
        tls_context=tls.server_context(tls_core.cert, tls_core.key),
        inline_limit=60.0,
    )
    server.start()
    try:
        client = CoreClient(server.tcp_address, tls_core.authkey, tls_cert_file=tls_core.cert)
        client.connect()
        sleeper = threading.Thread(target=client.call, args=(("sleep",),))
        sleeper.start()
        time.sleep(0.2)  # the call holds the I/O loop for 1 s (a bound, not a wait for a result)
        for _ in range(5):
            peer = socket.create_connection(server.tcp_address)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
        sleeper.join(30)
        fresh = CoreClient(server.tcp_address, tls_core.authkey, tls_cert_file=tls_core.cert)
        fresh.retry_for = 5.0
        fresh.connect()  # the server still accepts and serves
        assert fresh.connections_opened == 1
        fresh.close()
        client.close()
    finally:
        server.stop()


# --- the daemon: [aigis] tcp is TLS unless tcp_plaintext -------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def start_daemon(tmp_path: Path, daemons: list, port: int, extra: str = "") -> DaemonProcess:
    config = tmp_path / "aigis.toml"
    config.write_text(
        f'[aigis]\nstate_dir = "state"\nruntime_dir = "run"\ntcp = "127.0.0.1:{port}"\n{extra}'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("ready:")
    return daemon


def test_the_core_makes_its_certificate_once_and_serves_tcp_over_tls(tmp_path, daemons):
    port = free_port()
    daemon = start_daemon(tmp_path, daemons, port)
    state = tmp_path / "state"
    cert, key = state / "tls" / "cert.pem", state / "tls" / "key.pem"
    assert f"listening: tcp:127.0.0.1:{port} (TLS)" in daemon.log
    assert f"created: TLS certificate {cert} and private key {key} (mode 0600)" in daemon.log
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert os.stat(cert).st_mode & 0o777 == 0o644
    authkey = (state / "authkey").read_bytes()
    with CoreClient(("127.0.0.1", port), authkey, tls_cert_file=cert) as client:
        client.connect()
        assert client.connections_opened == 1
    made = (cert.read_bytes(), key.read_bytes())
    assert daemon.signal() == 0

    again = start_daemon(tmp_path, daemons, port)  # a restart reuses the pair: pins stay valid
    assert "created: TLS certificate" not in again.log
    assert f"loaded: TLS certificate {cert} (SHA-256 " in again.log
    assert (cert.read_bytes(), key.read_bytes()) == made
    with CoreClient(("127.0.0.1", port), authkey, tls_cert_file=cert) as client:
        client.connect()
    assert again.signal() == 0


def test_the_core_speaks_plaintext_tcp_only_when_allowed(tmp_path, daemons):
    port = free_port()
    daemon = start_daemon(tmp_path, daemons, port, "tcp_plaintext = true\n")
    assert f"listening: tcp:127.0.0.1:{port} (plaintext)" in daemon.log
    assert not (tmp_path / "state" / "tls").exists()  # no certificate is made for nothing
    authkey = (tmp_path / "state" / "authkey").read_bytes()
    with CoreClient(("127.0.0.1", port), authkey) as client:
        client.connect()
    assert daemon.signal() == 0
