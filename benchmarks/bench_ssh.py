"""Benchmark ssh to a remote host: a fresh connection per command against one master connection.

    sudo .venv/bin/python benchmarks/bench_ssh.py        # root: it boots a systemd box

It boots one test box (tests/systemd/box.py) with its own network namespace, joins it to a
namespace of this process by a veth pair (fd00::/8), runs sshd there, and measures in the same
run, in alternating batches (neighbouring load hits both alike):

  command latency   ``ssh host true`` with a new connection each time  vs  over the master
  shipping          first ship of a plugin tree  vs  re-ship with one file changed  vs  unchanged

Ratios are medians of per-batch ratios.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aigis._remote.hosts import HostSpec  # noqa: E402
from aigis._remote.ship import ship  # noqa: E402
from aigis._remote.ssh import Master, SshSettings, command_argv  # noqa: E402
from tests.systemd.box import Box, reap_stale_boxes  # noqa: E402
from tests.systemd.net import Netns, join, start_sshd  # noqa: E402


def fresh_argv(master: Master, argv: list[str]) -> list[str]:
    """The same command with multiplexing off: a new TCP connection, key exchange and auth."""
    out = []
    for arg in command_argv(master.spec, master.settings, argv):
        if arg.startswith("ControlPath="):
            arg = "ControlPath=none"
        elif arg.startswith("ControlMaster="):
            arg = "ControlMaster=no"
        elif arg.startswith("ControlPersist="):
            arg = "ControlPersist=no"
        out.append(arg)
    return [*master.wrap, *out]


def timed(fn, n: int) -> float:
    """Median seconds of ``n`` calls of ``fn``."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def make_tree(root: Path, files: int, size: int) -> None:
    for i in range(files):
        path = root / f"pkg{i % 10}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + secrets.token_hex(size)[: size - 20] + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--fresh", type=int, default=3, help="fresh connections per batch")
    parser.add_argument("--mux", type=int, default=10, help="multiplexed commands per batch")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()

    reap_stale_boxes()
    work = Path(tempfile.mkdtemp(prefix="aigis-bench-ssh-", dir="/tmp"))
    box = Box.boot(work / "box", net=True)
    netns = Netns()
    master = None
    try:
        link = join(netns, box)
        server = start_sshd(box, link.b_addr)
        settings = SshSettings(work / "run", known_hosts=server.known_hosts, config_file="none")
        spec = HostSpec("bench", server.address, "root", server.port, str(server.client_key))
        master = Master(spec, settings, wrap=netns.argv())
        master.open()

        def fresh() -> None:
            subprocess.run(fresh_argv(master, ["true"]), check=True, capture_output=True)

        def mux() -> None:
            master.run(["true"])

        fresh()
        mux()  # warm both paths once
        ratios, fresh_all, mux_all = [], [], []
        for _ in range(args.batches):
            f, m = timed(fresh, args.fresh), timed(mux, args.mux)
            fresh_all.append(f)
            mux_all.append(m)
            ratios.append(f / m)
        print(f"command latency over veth ({args.batches} batches, medians)")
        print(f"  fresh ssh per command : {statistics.median(fresh_all) * 1000:7.1f} ms")
        print(f"  over the master       : {statistics.median(mux_all) * 1000:7.1f} ms")
        print(f"  ratio fresh / master  : {statistics.median(ratios):7.1f}x")

        src = work / "plugin"
        make_tree(src, args.files, args.size)
        total = args.files * args.size
        started = time.perf_counter()
        first = ship(master, "bench", src)
        t_first = time.perf_counter() - started
        changed, unchanged = [], []
        bytes_changed = 0
        for i in range(args.batches):
            (src / "pkg0" / "mod0.py").write_text(f"# changed {i}\n")
            started = time.perf_counter()
            result = ship(master, "bench", src)
            changed.append(time.perf_counter() - started)
            bytes_changed = result.bytes_sent
            assert result.sent == ("pkg0/mod0.py",), result.sent
            started = time.perf_counter()
            assert ship(master, "bench", src).bytes_sent == 0
            unchanged.append(time.perf_counter() - started)
        t_changed, t_unchanged = statistics.median(changed), statistics.median(unchanged)
        print(f"shipping {args.files} files, {total // 1024} KiB")
        print(f"  first ship            : {t_first * 1000:7.1f} ms, {first.bytes_sent} bytes sent")
        print(f"  one file changed      : {t_changed * 1000:7.1f} ms, {bytes_changed} bytes sent "
              f"({t_first / t_changed:.1f}x faster than first)")  # fmt: skip
        print(f"  nothing changed       : {t_unchanged * 1000:7.1f} ms, 0 bytes sent "
              f"({t_first / t_unchanged:.1f}x faster than first)")  # fmt: skip
    finally:
        if master is not None:
            master.close()
        netns.close()
        box.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
