"""A no-op call across a network link against raw round trips on the same link.

    sudo .venv/bin/python benchmarks/bench_remote_call.py   # root: it creates network namespaces

Two network namespaces made by the benchmark, joined by a veth pair with fd00::/8 addresses
(``tests/systemd/net.py``); no systemd, and no traffic leaves them. The servers run in one
namespace, the client in the other. Ratios, each from alternating batches in the same run:

  (a) an AIGIS no-op call over TLS (pinned client)  vs  (b) a raw TLS ping-pong, same certificate
  (c) the same call over plaintext TCP               vs  (d) a raw plaintext TCP ping-pong
  and an A/A line (raw TLS against itself on a second connection): the noise of this run.

Goal (issue #13): a/b <= 1.5x. Servers, placement, priority and batches as in ``bench_tls.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_proxy import paired, pin, placements, realtime  # noqa: E402
from benchmarks.bench_tls import (  # noqa: E402
    NOOP_TARGET,
    ping,
    proxy_module,
    raw_client,
    serve_core,
    serve_raw,
    wait_for_file,
)

CLIENT_TIMEOUT = 900.0  # seconds; the client's whole run, bounded
ORPHANLESS = ("setpriv", "--pdeathsig", "KILL", "--")
SERVERS = ("raw tls", "raw tcp", "aigis tls", "aigis tcp")


def measure(config: dict) -> None:
    """The client side, run inside the client's namespace: (a)/(b) and (c)/(d) per placement."""
    host, keyfile, cert = config["host"], config["keyfile"], config["cert"]
    ports, pids, rounds, batch = config["ports"], config["pids"], config["rounds"], config["batch"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, {os.cpu_count()} CPUs, "
        f"load average {load}, {config['scheduling']}"
    )
    print(
        f"veth link between two network namespaces, client -> [{host}]; median of per-pair "
        f"ratios over {rounds} alternating batch pairs of {batch} calls"
    )
    print(f"{'case':<36}{'base':>11}{'measured':>11}{'ratio':>8}")
    everything = set(os.sched_getaffinity(0))
    for placement, client_cpus, server_cpus in placements():
        print(f"[{placement}]")
        os.sched_setaffinity(0, client_cpus)
        for pid in pids:
            pin(pid, server_cpus)
        raw_tls = raw_client(ports["raw tls"], cert, host)
        raw_tcp = raw_client(ports["raw tcp"], None, host)
        over_tls = proxy_module(ports["aigis tls"], keyfile, cert, host).bench
        over_tcp = proxy_module(ports["aigis tcp"], keyfile, None, host).bench
        again = raw_client(ports["raw tls"], cert, host)  # a second connection: the A/A line
        cases = [
            ("(a)/(b) no-op: aigis TLS / raw TLS", ping(raw_tls), over_tls.noop, True),
            ("(c)/(d) no-op: aigis TCP / raw TCP", ping(raw_tcp), over_tcp.noop, False),
            ("noise: raw TLS / raw TLS (A/A)", ping(raw_tls), ping(again), False),
        ]
        for name, base_fn, measured_fn, judged in cases:
            base, measured, ratio = paired(base_fn, measured_fn, batch, rounds)
            verdict = ""
            if judged:
                verdict = f"   goal <= {NOOP_TARGET} {'ok' if ratio <= NOOP_TARGET else 'MISSED'}"
            print(f"  {name:<34}{base * 1e6:>9.1f}us{measured * 1e6:>9.1f}us{ratio:>8.2f}{verdict}")
        version = raw_tls.sock.version() if isinstance(raw_tls.sock, ssl.SSLSocket) else "?"
        print(f"  ({version} on both TLS paths)", flush=True)
        for conn in (raw_tls, raw_tcp, again):
            conn.sock.close()
    os.sched_setaffinity(0, everything)


def run(rounds: int, batch: int, scheduling: str) -> int:
    """Make the namespaces and the link, start the servers in one and the client in the other;
    always remove servers, link and namespaces."""
    from aigis._rpc import tls
    from tests.systemd.net import Netns, in_netns, join

    if os.geteuid() != 0:
        raise SystemExit("bench_remote_call.py needs root: it creates network namespaces")
    servers: dict[str, subprocess.Popen] = {}
    spaces: list[Netns] = []
    link = None
    with tempfile.TemporaryDirectory(prefix="aigis-bench-rcall-") as tmp:
        try:
            spaces.append(Netns())
            spaces.append(Netns())
            server_ns, client_ns = spaces
            link = join(server_ns, client_ns)
            host = link.a_addr
            cert, key, keyfile = f"{tmp}/tls/cert.pem", f"{tmp}/tls/key.pem", f"{tmp}/authkey"
            tls.load_or_create_certificate(Path(cert), Path(key))
            Path(keyfile).write_bytes(os.urandom(32))
            specs = {
                "raw tls": ["--serve-raw", host, f"{tmp}/raw-tls", cert, key],
                "raw tcp": ["--serve-raw", host, f"{tmp}/raw-tcp", "", ""],
                "aigis tls": ["--serve-core", host, f"{tmp}/core-tls", keyfile, cert, key],
                "aigis tcp": ["--serve-core", host, f"{tmp}/core-tcp", keyfile, "", ""],
            }
            for name in SERVERS:
                # nsenter --net and setpriv exec: the pid is the server's own, and it dies with us
                argv = in_netns(server_ns.pid, *ORPHANLESS, sys.executable, __file__, *specs[name])
                servers[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            ports = {name: wait_for_file(specs[name][2], servers[name]) for name in SERVERS}
            config = {
                "host": host, "keyfile": keyfile, "cert": cert, "ports": ports,
                "pids": [proc.pid for proc in servers.values()], "rounds": rounds,
                "batch": batch, "scheduling": scheduling,
            }  # fmt: skip
            client = [sys.executable, __file__, "--client", json.dumps(config)]
            argv = in_netns(client_ns.pid, *ORPHANLESS, *client)
            return subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=CLIENT_TIMEOUT).returncode
        finally:
            for proc in servers.values():
                proc.kill()
                proc.wait(10)
            if link is not None:
                link.close()
            for ns in spaces:
                ns.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="alternating batch pairs")
    parser.add_argument("--batch", type=int, default=300, help="calls per batch")
    parser.add_argument("--no-realtime", action="store_true", help="normal priority")
    parser.add_argument("--serve-raw", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--serve-core", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        host, *rest = args.serve_raw
        serve_raw(*rest, host=host)
        return 0
    if args.serve_core:
        host, *rest = args.serve_core
        serve_core(*rest, host=host)
        return 0
    if args.client:
        measure(json.loads(args.client))
        return 0
    scheduling = "normal priority (asked)" if args.no_realtime else realtime()
    return run(args.rounds, args.batch, scheduling)


if __name__ == "__main__":
    sys.exit(main())
