"""Reading the CPU and memory of N running plugin units, in a systemd box: over D-Bus (two Gets
per unit, the way before) against the units' cgroup files, interleaved in one run, next to the
backend's read of all unit states that ``aigisctl status`` also pays.

    .venv/bin/python -m benchmarks.bench_usage_systemd --n 300,1000     # root, systemd installed

Measured from the host through the box's bus and /proc/PID/root (the core reads the same from
inside). Not a test: a ratio to compare a change against.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.dbus import Systemd
from aigis._supervise.systemd import SystemdSupervisor
from aigis._supervise.units import unit_name
from aigis._supervise.usage import bus_usage, cgroup_usage

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "packaging" / "systemd" / "aigis-plugin@.service"


def _running(sup: SystemdSupervisor, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        sup.poll()
        states = sup.status(names)
        if all(s.state is State.RUNNING for s in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(s.state is not State.RUNNING for s in states)} not running")
        time.sleep(0.5)


def _timed(read: Callable[[], object]) -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def measure(n: int, rounds: int, base: Path) -> None:
    from tests.systemd.box import Box, reap_stale_boxes

    reap_stale_boxes()
    box = Box.boot(base / f"usage-n{n}")
    sup = None
    try:
        box.write("/etc/systemd/system/aigis-plugin@.service", TEMPLATE.read_text())
        box.systemctl("daemon-reload")
        sup = SystemdSupervisor(root=box.host_path("/"), bus=box.bus_address)
        names = [f"u{i}" for i in range(n)]
        for name in names:
            sup.add(ProcessSpec(name, "external", ("/bin/sleep", "3600"), box.workdir))
        began = time.monotonic()
        sup.flush()
        _running(sup, names, 60 + 0.3 * n)
        print(f"N={n}: all running after {time.monotonic() - began:.1f} s", flush=True)
        units = {name: unit_name(name) for name in names}
        root = str(box.host_path("/sys/fs/cgroup"))
        bus = Systemd(box.bus_address)
        try:
            bus.states(list(units.values()))  # a first read, as the core's after start
            found_bus = bus_usage(bus, units)
            found_files, unreadable = cgroup_usage(units, root)
            print(
                f"  D-Bus gives usage of {len(found_bus)}/{n}; cgroup files {len(found_files)}/{n},"
                f" {len(unreadable)} unreadable",
                flush=True,
            )
            cases: dict[str, list[float]] = {
                "states": [],
                "usage over D-Bus": [],
                "usage files": [],
            }
            for _ in range(rounds):  # interleaved: neighbours' load hits every case alike
                cases["states"].append(_timed(lambda: bus.states(list(units.values()))))
                cases["usage over D-Bus"].append(_timed(lambda: bus_usage(bus, units)))
                cases["usage files"].append(_timed(lambda: cgroup_usage(units, root)))
        finally:
            bus.close()
        med = {case: statistics.median(times) for case, times in cases.items()}
        for case, value in med.items():
            print(f"  {case:<18} median {1000 * value:8.1f} ms  (of {rounds})", flush=True)
        before = med["states"] + med["usage over D-Bus"]
        after = med["states"] + med["usage files"]
        print(
            f"  states + usage: before {1000 * before:.0f} ms, after {1000 * after:.0f} ms"
            f" ({before / after:.1f}x); usage alone"
            f" {med['usage over D-Bus'] / med['usage files']:.0f}x",
            flush=True,
        )
    finally:
        if sup is not None:
            sup.stop_all([])
            sup.close()
        box.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="300,1000", help="unit counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aigis-bench-usage-") as base:
        for n in (int(x) for x in args.n.split(",")):
            measure(n, args.rounds, Path(base))


if __name__ == "__main__":
    main()
