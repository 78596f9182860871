"""Benchmark the AIGIS proxy against a raw Unix-socket floor: ``python benchmarks/bench_proxy.py``.

Each figure is printed as a ratio to its floor, measured in the same run:
  no-op call, 1 KiB echo, 1 MiB result  vs  a raw length-prefixed ping-pong between two processes
  8 client processes' total throughput  vs  a raw server's (thread per connection) throughput
  a client's connect + first call under a flood of idle unauthenticated connections (1,000 on
  TCP and 1,000 on the Unix socket)  vs  the same without the flood
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADER = struct.Struct("!i")
BIG = b"x" * (1 << 20)
KIB = b"k" * 1024
TARGETS = {"no-op": 1.4, "1 KiB echo": 1.4, "1 MiB result": 1.3}
THROUGHPUT_TARGET = 0.75
RT_PRIORITY = 1  # the lowest real-time priority: above every normal process, below the kernel's


def realtime() -> str:
    """Run this process, and every process it starts, under SCHED_FIFO when permitted.

    Other load on the machine (normal priority) then neither preempts a measured process nor
    delays its wakeup, so it cannot distort a ratio; children inherit the policy.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (AttributeError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return f"normal priority (SCHED_FIFO not permitted: {reason}); ratios may be noisy"
    return f"SCHED_FIFO priority {RT_PRIORITY}"


# --- raw floor: length-prefixed frames over a Unix socket, buffers reused --------------------


class RawConn:
    """A length-prefixed connection, written as tightly as plain Python allows."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(2 << 20)
        self.view = memoryview(self.buf)

    def send(self, payload: bytes) -> None:
        if len(payload) <= 65536:
            self.sock.sendall(HEADER.pack(len(payload)) + payload)
        else:
            self.sock.sendmsg([HEADER.pack(len(payload)), payload])

    def recv(self) -> memoryview:
        # strict ping-pong, so nothing is ever buffered: one greedy recv usually gets it all
        view, recv_into = self.view, self.sock.recv_into
        got = recv_into(view)
        while 0 < got < 4:
            got += recv_into(view[got:])
        if not got:
            raise EOFError
        end = 4 + HEADER.unpack_from(self.buf)[0]
        while got < end:
            n = recv_into(view[got:end])
            if not n:
                raise EOFError
            got += n
        return view[4:end]


def serve_raw(path: str) -> None:
    """The raw floor server: echo, or 1 MiB back when asked ``big``."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)

    def serve(sock: socket.socket) -> None:
        conn = RawConn(sock)
        try:
            while True:
                request = conn.recv()
                conn.send(BIG if request == b"big" else bytes(request))
        except (EOFError, OSError):
            sock.close()

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


def serve_core(path: str, keyfile: str) -> None:
    """The AIGIS core under test: a CoreServer over a tiny namespace."""
    from aigis._rpc.server import CoreServer

    server = None
    skills = {
        "noop": lambda: None,
        "echo": lambda data: data,
        "blob": lambda: BIG,
        "handoffs": lambda: server.handoffs,  # how often a call looked slow (for the report)
    }

    def resolve(p: tuple[str, ...]) -> object:
        if len(p) == 2 and p[0] == "bench" and p[1] in skills:
            return skills[p[1]]
        raise AttributeError(".".join(p))

    tcp = ("127.0.0.1", 0) if os.environ.get("BENCH_TCP_PORT_FILE") else None
    server = CoreServer(resolve, unix_path=Path(path), tcp=tcp, authkey=Path(keyfile).read_bytes())
    server.start()
    if tcp is not None:
        Path(os.environ["BENCH_TCP_PORT_FILE"]).write_text(str(server.tcp_address[1]))
    threading.Event().wait()


# --- measuring -------------------------------------------------------------------------------


def raw_client(path: str) -> RawConn:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    return RawConn(sock)


def aigis_module(path: str, keyfile: str):  # noqa: ANN201 - the proxy module
    from aigis._rpc.client import CoreClient
    from aigis._rpc.proxy import make_proxy_module

    return make_proxy_module(CoreClient(path, Path(keyfile).read_bytes()))


def per_call(fn, n: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def paired(floor_fn, proxy_fn, n: int, rounds: int) -> tuple[float, float, float]:  # noqa: ANN001
    """Median floor, median proxy, and the median of per-pair ratios.

    Short batches alternate, so a noisy neighbour or a frequency change hits both sides of a
    pair alike; the median of pair ratios is what we judge by.
    """
    per_call(floor_fn, n)
    per_call(proxy_fn, n)  # warm-up: connect, fault in buffers
    floors, proxies = [], []
    for i in range(rounds):
        first, second = (floor_fn, proxy_fn) if i % 2 == 0 else (proxy_fn, floor_fn)
        a, b = per_call(first, n), per_call(second, n)
        floor, proxy = (a, b) if i % 2 == 0 else (b, a)
        floors.append(floor)
        proxies.append(proxy)
    ratios = [p / f for f, p in zip(floors, proxies)]
    return statistics.median(floors), statistics.median(proxies), statistics.median(ratios)


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (threads it starts later inherit the mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def latency(raw_path: str, core_path: str, keyfile: str, rounds: int) -> dict[str, tuple]:
    raw = raw_client(raw_path)
    aigis = aigis_module(core_path, keyfile)
    bench = aigis.bench

    def raw_ping() -> None:
        raw.send(b"ping")
        raw.recv()

    def raw_kib() -> None:
        raw.send(KIB)
        raw.recv()

    def raw_big() -> None:
        raw.send(b"big")
        bytes(raw.recv())  # a raw client must also copy the payload out of its buffer

    noop, echo, blob = bench.noop, bench.echo, bench.blob
    cases = {
        "no-op": (raw_ping, noop, 300),
        "1 KiB echo": (raw_kib, lambda: echo(KIB), 300),
        "1 MiB result": (raw_big, blob, 15),
    }
    results: dict[str, tuple] = {}
    for name, (floor_fn, proxy_fn, n) in cases.items():
        results[name] = paired(floor_fn, proxy_fn, n, rounds)
    client = aigis.__aigis_client__
    results["connections"] = (client.connections_opened,)
    client.close()
    raw.sock.close()
    return results


def run_client(kind: str, path: str, keyfile: str, start_at: float, seconds: float) -> None:
    """One throughput client: no-op calls from ``start_at`` for ``seconds``; prints the count."""
    if kind == "raw":
        conn = raw_client(path)

        def call() -> None:
            conn.send(b"ping")
            conn.recv()
    else:
        aigis = aigis_module(path, keyfile)
        call = aigis.bench.noop
        call()  # connect before the clock starts
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        call()
        call()
        count += 2
    opened = aigis.__aigis_client__.connections_opened if kind == "aigis" else 1
    print(count, opened, flush=True)


def throughput(kind: str, path: str, keyfile: str, clients: int, seconds: float) -> tuple:
    """Total calls/s of ``clients`` processes, and the most connections one of them opened."""
    start_at = time.time() + 1.0  # time for every client to start and connect
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", kind, path, keyfile, str(start_at)]
            + [str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    outputs = [p.communicate(timeout=seconds + 30)[0].split() for p in procs]
    total = sum(int(out[0]) for out in outputs)
    opened = max(int(out[1]) for out in outputs)
    return total / seconds, opened


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise SystemExit(f"no server on {path} after {timeout:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating latency batches")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.5, help="throughput window")
    parser.add_argument("--windows", type=int, default=3, help="throughput windows per side")
    parser.add_argument("--flood", type=int, default=1000, help="idle connections per listener")
    parser.add_argument(
        "--no-realtime", action="store_true", help="normal priority: see what other load does"
    )
    parser.add_argument(
        "--only", choices=("latency", "throughput"), help="measure only these figures (no flood)"
    )
    parser.add_argument("--serve-raw", metavar="SOCK", help=argparse.SUPPRESS)
    parser.add_argument("--serve-core", nargs=2, metavar=("SOCK", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return 0
    if args.serve_core:
        serve_core(*args.serve_core)
        return 0
    if args.client:
        kind, path, keyfile, start_at, seconds = args.client
        run_client(kind, path, keyfile, float(start_at), float(seconds))
        return 0

    scheduling = "normal priority (asked)" if args.no_realtime else realtime()
    with tempfile.TemporaryDirectory(prefix="aigis-bench-") as tmp:
        raw_path, core_path, keyfile = f"{tmp}/raw.sock", f"{tmp}/core.sock", f"{tmp}/authkey"
        Path(keyfile).write_bytes(os.urandom(32))
        servers = [
            subprocess.Popen([sys.executable, __file__, "--serve-raw", raw_path]),
            subprocess.Popen([sys.executable, __file__, "--serve-core", core_path, keyfile]),
        ]
        try:
            wait_for_socket(raw_path, servers[0])
            wait_for_socket(core_path, servers[1])
            report(raw_path, core_path, keyfile, args, servers, scheduling)
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()
    if args.flood and not args.only:
        flood(args)
    return 0


def connect_time(path: str, keyfile: str) -> float:
    """Seconds from a fresh client's first call to its result (connect and handshake included)."""
    from aigis._rpc.client import CoreClient

    client = CoreClient(path, Path(keyfile).read_bytes(), retry_for=30.0)
    start = time.perf_counter()
    client.call(("bench", "noop"))
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def flood(args: argparse.Namespace) -> None:
    """A legitimate client's connect time while idle peers hold connections on both listeners."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_listener = min(args.flood, max(0, (hard - 100) // 2))
    with tempfile.TemporaryDirectory(prefix="aigis-bench-") as tmp:
        path, keyfile, port_file = f"{tmp}/core.sock", f"{tmp}/authkey", f"{tmp}/port"
        Path(keyfile).write_bytes(os.urandom(32))
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-core", path, keyfile],
            env={**os.environ, "BENCH_TCP_PORT_FILE": port_file},
        )
        held: list[socket.socket] = []
        try:
            wait_for_socket(path, server)
            wait_for_socket(port_file, server)
            port = int(Path(port_file).read_text())
            quiet = statistics.median(connect_time(path, keyfile) for _ in range(20))
            for _ in range(per_listener):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                with contextlib.suppress(OSError):
                    sock = socket.socket(socket.AF_UNIX)
                    sock.settimeout(5)
                    sock.connect(path)
                    held.append(sock)
            flooded = statistics.median(connect_time(path, keyfile) for _ in range(20))
        finally:
            for sock in held:
                sock.close()
            server.kill()
            server.wait()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"[flood: {per_listener} idle connections on TCP and {per_listener} on the Unix socket]")
    print(
        f"  {'connect + first call':<20}{quiet * 1e3:>10.2f}ms{flooded * 1e3:>10.2f}ms"
        f"{flooded / quiet:>8.2f}   (quiet vs flooded; median of 20)"
    )


def placements() -> list[tuple[str, set[int], set[int]]]:
    """(name, client CPUs, server CPUs): floor and proxy are always measured alike placed.

    On a VM a round trip within one CPU (a context switch) and across CPUs (waking another,
    maybe halted, vCPU) differ several-fold, so unpinned runs compare different placements.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [("one CPU", {cpus[0]}, {cpus[0]})]
    return [
        ("client+server on 1 CPU", {cpus[0]}, {cpus[0]}),
        ("client, server on 2 CPUs", {cpus[0]}, {cpus[1]}),
    ]


def report(
    raw_path: str,
    core_path: str,
    keyfile: str,
    args: argparse.Namespace,
    servers: list,
    scheduling: str,
) -> None:
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {scheduling}; latency: median "
        f"ratio of {args.rounds} alternating batch pairs; throughput: median of {args.windows} "
        f"windows"
    )
    print(f"{'case':<22}{'floor':>12}{'aigis':>12}{'ratio':>8}{'target':>10}")
    everything = set(os.sched_getaffinity(0))
    opened = []
    for placement, client_cpus, server_cpus in placements() if args.only != "throughput" else ():
        print(f"[{placement}]")
        os.sched_setaffinity(0, client_cpus)
        for proc in servers:
            pin(proc.pid, server_cpus)
        lat = latency(raw_path, core_path, keyfile, args.rounds)
        opened.append(lat["connections"][0])
        for name, target in TARGETS.items():
            floor, proxy, ratio = lat[name]
            ok = "ok" if ratio <= target else "MISSED"
            print(
                f"  {name:<20}{floor * 1e6:>10.1f}us{proxy * 1e6:>10.1f}us{ratio:>8.2f}"
                f"   <= {target:<4} {ok}"
            )
    os.sched_setaffinity(0, everything)
    if args.only == "latency":
        print(f"connections opened per client process: at most {max(opened)}")
        return
    stats = aigis_module(core_path, keyfile).bench.handoffs
    # a server's threads hand the GIL around; across vCPUs each handoff is a slow wakeup, so
    # the raw server's rate depends on placement: both placements are judged
    cpus = sorted(everything)
    for placement, server_cpus in (
        ("server on 1 CPU, clients anywhere", {cpus[-1]}),
        ("unpinned", everything),
    ):
        print(f"[{placement}]")
        for proc in servers:
            pin(proc.pid, server_cpus)
        raw_rates, proxy_rates = [], []
        handoffs = stats()
        for _ in range(args.windows):  # alternate, so load from elsewhere hits both alike
            raw_rates.append(throughput("raw", raw_path, keyfile, args.clients, args.seconds)[0])
            rate, most = throughput("aigis", core_path, keyfile, args.clients, args.seconds)
            proxy_rates.append(rate)
            opened.append(most)
        raw_rate, proxy_rate = statistics.median(raw_rates), statistics.median(proxy_rates)
        ratio = statistics.median(p / r for r, p in zip(raw_rates, proxy_rates))
        verdict = "ok" if ratio >= THROUGHPUT_TARGET else "MISSED"
        name = f"{args.clients}-client throughput"
        handoffs = stats() - handoffs
        print(
            f"  {name:<20}{raw_rate:>10.0f}/s{proxy_rate:>10.0f}/s{ratio:>8.2f}"
            f"   >= {THROUGHPUT_TARGET:<4} {verdict:<6} (I/O loop handed over {handoffs}x)"
        )
    print(f"connections opened per client process: at most {max(opened)}")


if __name__ == "__main__":
    sys.exit(main())
