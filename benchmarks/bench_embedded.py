"""Benchmark the embedded supervisor at scale: ``python benchmarks/bench_embedded.py [-n 1000]``.

N trivial plugins (``sleep``). Each figure is printed as a ratio to its floor, measured in the
same run with plain subprocess calls (no supervisor):
  launch -> all running       vs  spawning N processes (each in its own group, with a pipe)
  stop_all (one step)         vs  killpg of all N, then waiting for each
  restart after kill -9       vs  one spawn (restart_delay 0: what is left is the reaction time)
Threads, RSS and idle CPU of the supervising process are printed as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aigis._supervise.base import ProcessSpec, State  # noqa: E402
from aigis._supervise.embedded import EmbeddedSupervisor  # noqa: E402
from tests.conftest import settings_for  # noqa: E402

ARGV = ("sleep", "3600")


def spawn_raw() -> tuple[subprocess.Popen[bytes], int]:
    """The floor for one plugin: a process in its own group with its output on a pipe."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    proc = subprocess.Popen(ARGV, stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd, process_group=0)
    os.close(wfd)
    return proc, rfd


def floor(n: int) -> tuple[float, float, float]:
    """(spawn all, stop all, one spawn median of 10) with plain subprocess calls."""
    started = time.monotonic()
    procs = [spawn_raw() for _ in range(n)]
    spawn_all = time.monotonic() - started
    started = time.monotonic()
    for proc, _ in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc, rfd in procs:
        proc.wait()
        os.close(rfd)
    stop_all = time.monotonic() - started
    singles = []
    for _ in range(10):
        started = time.monotonic()
        proc, rfd = spawn_raw()
        singles.append(time.monotonic() - started)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(rfd)
    return spawn_all, stop_all, statistics.median(singles)


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def running(sup: EmbeddedSupervisor, names: list[str], old: dict[str, int] | None = None) -> bool:
    """Every plugin RUNNING, exec'd (its comm is ``sleep``) and, given ``old``, a new pid."""
    for status in sup.status(names):
        if status.state is not State.RUNNING or not status.pid:
            return False
        if old is not None and status.pid == old[status.name]:
            return False
        try:
            if Path(f"/proc/{status.pid}/comm").read_text().strip() != ARGV[0]:
                return False
        except OSError:
            return False
    return True


def wait(check, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.0005)


def supervised(n: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    sup = EmbeddedSupervisor(settings_for(tmp, state_dir=tmp), console=None)
    names = [f"p{i}" for i in range(n)]
    started = time.monotonic()
    for name in names:
        env = {"AIGIS_PLUGIN_DIR": str(tmp / name)}
        sup.add(ProcessSpec(name, "external", ARGV, tmp, env, restart=100, restart_delay=0,
                            startsecs=0))  # fmt: skip
    wait(lambda: running(sup, names), "every plugin running")
    figures = {"start": time.monotonic() - started}
    figures["threads"] = proc_status("Threads")
    figures["rss_mib"] = proc_status("VmRSS") / 1024
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(5)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    figures["idle_cpu_pct"] = cpu / (time.monotonic() - wall) * 100
    latencies = []
    for index in range(10):
        name = names[index * (n // 10)] if n >= 10 else names[0]
        old = {name: sup.status([name])[0].pid}
        started = time.monotonic()
        os.kill(old[name], signal.SIGKILL)
        wait(lambda name=name, old=old: running(sup, [name], old), "the restart")
        latencies.append(time.monotonic() - started)
    figures["restart"] = statistics.median(latencies)
    started = time.monotonic()
    sup.stop_all([list(reversed(names))])
    figures["stop"] = time.monotonic() - started
    sup.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="plugins (default 1000)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("aigis._supervise.embedded").setLevel(logging.CRITICAL)
    spawn_all, stop_all, one_spawn = floor(args.n)
    got = supervised(args.n)
    print(f"embedded supervisor, {args.n} `sleep` plugins (floor: plain subprocess, same run)")
    rows = [
        ("launch -> all running", got["start"], spawn_all),
        ("stop_all, one step", got["stop"], stop_all),
        ("restart after kill -9, median", got["restart"], one_spawn),
    ]
    for label, value, base in rows:
        print(f"  {label:30s} {value * 1000:9.1f} ms  floor {base * 1000:8.1f} ms  "
              f"{value / base:5.2f}x")  # fmt: skip
    print(f"  threads {got['threads']:.0f} (main + event loop), RSS {got['rss_mib']:.0f} MiB, "
          f"idle CPU {got['idle_cpu_pct']:.2f} %")  # fmt: skip


if __name__ == "__main__":
    main()
