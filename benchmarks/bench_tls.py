"""The proxy over TCP with TLS against a raw TLS floor: ``python benchmarks/bench_tls.py``.

Each figure is a ratio measured in the same run, on loopback, with the core's own certificate:
  no-op call, 1 KiB echo, 1 MiB result over TLS  vs  a raw length-prefixed TLS ping-pong
  (goal for the no-op call: <= 1.5x)
  the same no-op call over TLS  vs  over plaintext TCP ([aigis] tcp_plaintext = true)
  a raw TLS ping-pong  vs  a raw plaintext TCP ping-pong (what TLS itself costs)
  no-op and 1 KiB echo over plaintext TCP  vs  raw TCP (the proxy's own cost, for context)
  connect + first call over TLS  vs  over plaintext TCP (the TLS handshake)
Placement, priority and alternating batches as in ``bench_proxy.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_proxy import (  # noqa: E402
    BIG,
    HEADER,
    KIB,
    RawConn,
    paired,
    pin,
    placements,
    realtime,
)

NOOP_TARGET = 1.5
Call = Callable[[], object]


# --- servers (subprocesses) ------------------------------------------------------------------


class SendAll(RawConn):
    """A raw connection that sends with ``sendall`` (TLS writes may be partial otherwise)."""

    def send(self, payload: bytes) -> None:
        if len(payload) <= 65536:
            self.sock.sendall(HEADER.pack(len(payload)) + payload)
        else:
            self.sock.sendall(HEADER.pack(len(payload)))
            self.sock.sendall(payload)


def raw_context(cert: str, key: str) -> ssl.SSLContext:
    """A plain server context with the same certificate and versions as the core's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.num_tickets = 0
    return context


def serve_raw(port_file: str, cert: str | None, key: str | None, host: str = "127.0.0.1") -> None:
    """The floor: echo, or 1 MiB back when asked ``big``; TLS when given a certificate."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    context = raw_context(cert, key) if cert and key else None

    def serve(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True)
            conn = SendAll(sock)
            while True:
                request = conn.recv()
                conn.send(BIG if request == b"big" else bytes(request))
        except (EOFError, OSError):
            sock.close()

    Path(port_file).write_text(str(listener.getsockname()[1]))
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


def serve_core(
    port_file: str, keyfile: str, cert: str | None, key: str | None, host: str = "127.0.0.1"
) -> None:
    """The AIGIS core under test: TCP with TLS when given a certificate, else plaintext TCP."""
    from aigis._rpc import tls
    from aigis._rpc.server import CoreServer

    skills = {"noop": lambda: None, "echo": lambda data: data, "blob": lambda: BIG}

    def resolve(p: tuple[str, ...]) -> object:
        if len(p) == 2 and p[0] == "bench" and p[1] in skills:
            return skills[p[1]]
        raise AttributeError(".".join(p))

    server = CoreServer(
        resolve,
        unix_path=Path(port_file).with_suffix(".sock"),
        tcp=(host, 0),
        authkey=Path(keyfile).read_bytes(),
        tls_context=tls.server_context(Path(cert), Path(key)) if cert and key else None,
    )
    server.start()
    assert server.tcp_address is not None
    Path(port_file).write_text(str(server.tcp_address[1]))
    threading.Event().wait()


# --- clients ---------------------------------------------------------------------------------


def raw_client(port: int, cert: str | None, host: str = "127.0.0.1") -> SendAll:
    from aigis._rpc import tls

    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cert:
        sock = tls.Pin(Path(cert)).wrap(sock)  # what the plugin side does, pinning included
    return SendAll(sock)


def core_client(
    port: int, keyfile: str, cert: str | None, host: str = "127.0.0.1", **options: object
):  # noqa: ANN201
    from aigis._rpc.client import CoreClient

    return CoreClient(
        (host, port),
        Path(keyfile).read_bytes(),
        tls_cert_file=Path(cert) if cert else None,
        **options,
    )


def proxy_module(port: int, keyfile: str, cert: str | None, host: str = "127.0.0.1"):  # noqa: ANN201
    from aigis._rpc.proxy import make_proxy_module

    return make_proxy_module(core_client(port, keyfile, cert, host))


def ping(conn: SendAll, payload: bytes = b"ping") -> Call:
    def call() -> None:
        conn.send(payload)
        conn.recv()

    return call


def echo_kib(echo: Callable[[bytes], object]) -> Call:
    return lambda: echo(KIB)


def big(conn: SendAll) -> Call:
    def call() -> None:
        conn.send(b"big")
        bytes(conn.recv())  # a raw client must also copy the payload out of its buffer

    return call


def connect_and_call(port: int, keyfile: str, cert: str | None) -> Call:
    def call() -> None:
        client = core_client(port, keyfile, cert, retry_for=30.0)
        client.call(("bench", "noop"))
        client.close()

    return call


# --- the run ---------------------------------------------------------------------------------


def wait_for_file(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        text = Path(path).read_text() if os.path.exists(path) else ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise SystemExit(f"no server port in {path} after {timeout:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="alternating latency batches")
    parser.add_argument("--no-realtime", action="store_true", help="normal priority")
    parser.add_argument("--serve-raw", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-core", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        serve_raw(*args.serve_raw)
        return 0
    if args.serve_core:
        serve_core(*args.serve_core)
        return 0

    from aigis._rpc import tls

    scheduling = "normal priority (asked)" if args.no_realtime else realtime()
    with tempfile.TemporaryDirectory(prefix="aigis-bench-tls-") as tmp:
        cert, key, keyfile = f"{tmp}/tls/cert.pem", f"{tmp}/tls/key.pem", f"{tmp}/authkey"
        tls.load_or_create_certificate(Path(cert), Path(key))
        Path(keyfile).write_bytes(os.urandom(32))
        specs = {
            "raw tls": ["--serve-raw", f"{tmp}/raw-tls", cert, key],
            "raw tcp": ["--serve-raw", f"{tmp}/raw-tcp", "", ""],
            "aigis tls": ["--serve-core", f"{tmp}/core-tls", keyfile, cert, key],
            "aigis tcp": ["--serve-core", f"{tmp}/core-tcp", keyfile, "", ""],
        }
        servers = {
            name: subprocess.Popen([sys.executable, __file__, *argv])
            for name, argv in specs.items()
        }
        try:
            ports = {name: wait_for_file(specs[name][1], proc) for name, proc in servers.items()}
            report(ports, keyfile, cert, servers, args.rounds, scheduling)
        finally:
            for proc in servers.values():
                proc.kill()
                proc.wait()
    return 0


def report(
    ports: dict[str, int],
    keyfile: str,
    cert: str,
    servers: dict[str, subprocess.Popen],
    rounds: int,
    scheduling: str,
) -> None:
    print(
        f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, {os.cpu_count()} CPUs, "
        f"{scheduling}; median ratio of {rounds} alternating batch pairs; loopback TCP"
    )
    print(f"{'case':<34}{'base':>11}{'measured':>11}{'ratio':>8}")
    everything = set(os.sched_getaffinity(0))
    for placement, client_cpus, server_cpus in placements():
        print(f"[{placement}]")
        os.sched_setaffinity(0, client_cpus)
        for proc in servers.values():
            pin(proc.pid, server_cpus)
        raw_tls = raw_client(ports["raw tls"], cert)
        raw_tcp = raw_client(ports["raw tcp"], None)
        over_tls = proxy_module(ports["aigis tls"], keyfile, cert).bench
        over_tcp = proxy_module(ports["aigis tcp"], keyfile, None).bench
        version = raw_tls.sock.version() if isinstance(raw_tls.sock, ssl.SSLSocket) else "?"
        cases: list[tuple[str, Call, Call, int, str]] = [
            ("no-op: aigis TLS / raw TLS", ping(raw_tls), over_tls.noop, 300, f"<= {NOOP_TARGET}"),
            ("1 KiB echo: aigis TLS / raw TLS", ping(raw_tls, KIB), echo_kib(over_tls.echo), 300, ""),  # noqa: E501
            ("1 MiB result: aigis TLS / raw TLS", big(raw_tls), over_tls.blob, 10, ""),
            ("no-op: aigis TLS / aigis TCP", over_tcp.noop, over_tls.noop, 300, ""),
            ("no-op: raw TLS / raw TCP", ping(raw_tcp), ping(raw_tls), 300, ""),
            ("no-op: aigis TCP / raw TCP", ping(raw_tcp), over_tcp.noop, 300, ""),
            ("1 KiB echo: aigis TCP / raw TCP", ping(raw_tcp, KIB), echo_kib(over_tcp.echo), 300, ""),  # noqa: E501
            (
                "connect+call: TLS / TCP",
                connect_and_call(ports["aigis tcp"], keyfile, None),
                connect_and_call(ports["aigis tls"], keyfile, cert),
                10,
                "",
            ),
        ]  # fmt: skip
        for name, base_fn, measured_fn, n, goal in cases:
            base, measured, ratio = paired(base_fn, measured_fn, n, rounds)
            verdict = ""
            if goal:
                verdict = f"   {goal} {'ok' if ratio <= NOOP_TARGET else 'MISSED'}"
            print(f"  {name:<32}{base * 1e6:>9.1f}us{measured * 1e6:>9.1f}us{ratio:>8.2f}{verdict}")
        print(f"  ({version} on both TLS paths)")
        raw_tls.sock.close()
        raw_tcp.sock.close()
    os.sched_setaffinity(0, everything)


if __name__ == "__main__":
    sys.exit(main())
