"""Benchmark plugins on remote hosts: start-up of many plugins on one host, and status of many.

    sudo .venv/bin/python benchmarks/bench_remote.py       # root: it boots two systemd boxes

Two boxes with sshd in network namespaces of their own, joined by veth pairs (fd00::/8) to a
namespace where a real core runs (embedded backend for its local plugins). Measured in one run:

  start-up      a core starting N external plugins on one remote host, until all N units are
                active there: cold (first time: accounts, shipping) and warm (a restarted core,
                nothing to ship), against the same N plugins started locally
  status        ``aigisctl status --json`` with M remote plugins over 2 hosts, against a core
                with M local plugins, in alternating calls (both cores run at once)
  no-op call    first, ``bench_remote_call.py``: a call across a veth link against raw TLS and
                raw TCP round trips on the same link (no boxes needed)

Goals (issue #13): warm start-up of 20 plugins <= 5 s; status with 50 remote plugins <= 300 ms;
a no-op call over TLS <= 1.5x a raw TLS round trip.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.systemd.box import Box, reap_stale_boxes  # noqa: E402
from tests.systemd.net import Netns, join, start_sshd  # noqa: E402
from tests.systemd.test_remote_plugins import SLEEPER, Core, _kill_ssh_of  # noqa: E402


def active_units(box: Box) -> int:
    out = box.systemctl("list-units", "aigis-plugin@*", "--state=active", "--no-legend",
                        "--plain", check=False).stdout  # fmt: skip
    return len([line for line in out.splitlines() if line.strip()])


def until(check, timeout: float) -> float:
    """Seconds until ``check()`` is true (polled every 50 ms), bounded."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"not done within {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - started


def new_core(netns: Netns, work: Path, name: str, address: str) -> Core:
    runtime = Path(tempfile.mkdtemp(prefix="aigis-rt-", dir="/tmp"))
    directory = work / name
    (directory / "secrets").mkdir(parents=True)
    core = Core(netns, directory, runtime, address=address, known_hosts=directory / "known_hosts")
    core.known_hosts.write_text("")
    return core


def start_timed(core: Core, check, timeout: float = 300) -> float:
    """Start ``core`` and return the seconds until ``check()`` holds."""
    started = time.perf_counter()
    core.start()
    until(check, timeout)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=20, help="plugins started on one host")
    parser.add_argument("--status", type=int, default=50, help="remote plugins for status")
    parser.add_argument("--calls", type=int, default=30, help="status calls per core")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--no-call", action="store_true", help="skip bench_remote_call.py")
    args = parser.parse_args()

    if not args.no_call:
        call = [sys.executable, str(Path(__file__).with_name("bench_remote_call.py"))]
        subprocess.run(call, check=True, timeout=1200)

    reap_stale_boxes()
    work = Path(tempfile.mkdtemp(prefix="aigis-bench-remote-", dir="/tmp"))
    netns = Netns()
    boxes, links, cores = [], [], []
    try:
        for i in range(2):
            box = Box.boot(work / f"box{i}", net=True)
            boxes.append(box)
            links.append(join(netns, box))
        servers = [start_sshd(box, link.b_addr) for box, link in zip(boxes, links, strict=True)]
        address = links[0].a_addr

        # -- start-up: N plugins on one host, cold and warm, against N local ----------------
        remote = new_core(netns, work, "start-remote", address)
        cores.append(remote)
        remote.host("r1", servers[0])
        local = new_core(netns, work, "start-local", address)
        cores.append(local)
        for i in range(args.start):
            remote.plugin("external", f"p{i}", SLEEPER, {}, host="r1")
            local.plugin("external", f"p{i}", SLEEPER, {})
        n = args.start
        cold = start_timed(remote, lambda: active_units(boxes[0]) == n)
        remote.stop()
        warm = start_timed(remote, lambda: active_units(boxes[0]) == n)
        remote.stop()

        def local_running() -> bool:
            rows = local.status()
            return sum(r["state"] == "running" for r in rows.values()) == n

        here = start_timed(local, local_running)
        local.stop()
        print(f"start-up of {n} plugins on one remote host until all run:")
        print(f"  cold (accounts, shipping)  {cold:6.2f} s   ({cold / here:.1f}x local)")
        print(f"  warm (restarted core)      {warm:6.2f} s   ({warm / here:.1f}x local)", end="")
        print("   goal <= 5 s")
        print(f"  local (embedded)           {here:6.2f} s", flush=True)

        # -- status: M remote plugins on 2 hosts against M local plugins ---------------------
        spread = new_core(netns, work, "status-remote", address)
        cores.append(spread)
        spread.host("r1", servers[0])
        spread.host("r2", servers[1])
        flat = new_core(netns, work, "status-local", address)
        flat.port = 7879
        cores.append(flat)
        for i in range(args.status):
            spread.plugin("external", f"q{i}", SLEEPER, {}, host=f"r{1 + i % 2}")
            flat.plugin("external", f"q{i}", SLEEPER, {})
        m = args.status
        spread.start()
        until(lambda: active_units(boxes[0]) + active_units(boxes[1]) == m, 600)
        flat.start()
        until(lambda: sum(r["state"] == "running" for r in flat.status().values()) == m, 300)
        timings: dict[str, list[float]] = {"remote": [], "local": []}
        for _ in range(args.calls):
            for label, core in (("remote", spread), ("local", flat)):
                started = time.perf_counter()
                code, out, err = core.ctl("status", "--json")
                timings[label].append(time.perf_counter() - started)
                assert code == 0, err
        remote_ms = statistics.median(timings["remote"]) * 1000
        local_ms = statistics.median(timings["local"]) * 1000

        print(f"aigisctl status --json, {m} plugins (median of {args.calls}, interleaved):")
        ratio = remote_ms / local_ms
        print(f"  remote, 2 hosts            {remote_ms:6.0f} ms  ({ratio:.2f}x local)", end="")
        print("   goal <= 300 ms")
        print(f"  local (embedded)           {local_ms:6.0f} ms")
        return 0
    finally:
        for core in cores:
            if core.proc is not None:
                core.stop()
            _kill_ssh_of(core.runtime_dir)
            shutil.rmtree(core.runtime_dir, ignore_errors=True)
        for link in links:
            link.close()
        netns.close()
        for box in boxes:
            box.shutdown()
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
