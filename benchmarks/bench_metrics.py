"""What always-on metrics cost a proxied call: ``python benchmarks/bench_metrics.py``.

AIGIS ``CoreServer`` processes serve ``aigis.bench.noop``; one ("on") is given a ``Metrics``, so
its own hook records every call (and the records are folded every 0.2 s, as the core's main loop
does), the others ("off", and "off again" for an A/A line that shows the noise of the machine)
are not. Everything runs under SCHED_FIFO when permitted (``bench_proxy.realtime``).
The no-op round trip is measured in short alternating batches (``bench_proxy.paired``), client
and servers pinned alike; the judged figure is the median of the per-pair ratios on/off (target
<= 1.05). The hook's own cost in-process is printed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import aigis_module, paired, pin, realtime, wait_for_socket  # noqa: E402

from aigis._metrics import Metrics  # noqa: E402

TARGET = 1.05


def serve(path: str, keyfile: str, kind: str) -> None:
    from aigis._rpc.server import CoreServer

    metrics = Metrics()
    clock = time.perf_counter_ns

    class Timed(CoreServer):
        """Only the two clock reads a latency histogram needs: the floor of any recording."""

        def _dispatch(self, request: memoryview, caller: str = "") -> Any:
            began = clock()
            reply = CoreServer._dispatch(self, request, caller)
            clock() - began  # noqa: B018 - the subtraction is part of the cost
            return reply

    skills = {("bench", "noop"): lambda: None}

    def resolve(p: tuple[str, ...]) -> object:
        try:
            return skills[p]
        except KeyError:
            raise AttributeError(".".join(p)) from None

    server = (Timed if kind == "clock" else CoreServer)(
        resolve,
        unix_path=Path(path),
        tcp=None,
        authkey=Path(keyfile).read_bytes(),
        metrics=metrics if kind == "on" else None,
    )
    server.start()
    while True:  # as the core's main loop does every tick
        time.sleep(0.2)
        metrics.fold()


def hook_cost(n: int = 200_000) -> tuple[float, float]:
    """Microseconds per call of what the RPC server's hook does (count, two clock reads, queue a
    record), and of folding one record into the counters, in-process."""
    metrics = Metrics()
    start, record = metrics.recorder()
    clock, path = time.perf_counter_ns, ("bench", "noop")
    began = time.perf_counter()
    for _ in range(n):
        start()
        t0 = clock()
        record((path, "plugin", clock() - t0, None, 40, 20, True))
    recorded = time.perf_counter()
    metrics.fold()
    folded = time.perf_counter()
    return (recorded - began) / n * 1e6, (folded - recorded) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating batch pairs")
    parser.add_argument("--batch", type=int, default=2000, help="calls per batch")
    parser.add_argument("--serve", nargs=3, metavar=("SOCK", "KEY", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {realtime()}")
    hook, fold = hook_cost()
    print(f"hook in-process: {hook:.2f} us per call on its path, {fold:.2f} us to fold it later")
    with tempfile.TemporaryDirectory(prefix="aigis-bench-") as tmp:
        keyfile = f"{tmp}/authkey"
        Path(keyfile).write_bytes(os.urandom(32))
        paths = {kind: f"{tmp}/{kind}.sock" for kind in ("off", "off2", "clock", "on")}
        servers = {
            kind: subprocess.Popen(
                [sys.executable, __file__, "--serve", path, keyfile, kind.rstrip("2")]
            )
            for kind, path in paths.items()
        }
        try:
            for kind, proc in servers.items():
                wait_for_socket(paths[kind], proc)
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[0]})
            for proc in servers.values():
                pin(proc.pid, {cpus[0]})
            off = aigis_module(paths["off"], keyfile).bench.noop
            on = aigis_module(paths["on"], keyfile).bench.noop
            again = aigis_module(paths["off2"], keyfile).bench.noop
            timed = aigis_module(paths["clock"], keyfile).bench.noop
            print(f"{'no-op call, 1 CPU':<22}{'off':>10}{'other':>12}{'ratio':>8}{'target':>10}")
            cases = (
                ("off again (A/A)", again, None),
                ("two clock reads only", timed, None),
                ("on", on, TARGET),
            )
            for name, other, target in cases:
                floor, measured, ratio = paired(off, other, args.batch, args.rounds)
                verdict = (
                    ""
                    if target is None
                    else f"<= {target}  " + ("ok" if ratio <= target else "MISSED")
                )
                print(
                    f"{name:<22}{floor * 1e6:>8.1f}us{measured * 1e6:>10.1f}us{ratio:>8.3f}"
                    f"   {verdict}"
                )
        finally:
            for proc in servers.values():
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
