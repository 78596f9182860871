"""Plugin usage under systemd is read from the units' cgroup files, not over D-Bus: the cgroup
path AIGIS builds is the ControlGroup systemd gives its plugin units, and reading the usage of
many running units makes no bus call at all (it used to be two Gets per unit)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.dbus import Systemd
from aigis._supervise.systemd import SystemdSupervisor
from aigis._supervise.units import unit_name
from aigis._supervise.usage import UsageReader, cgroup_usage, parse_cpu_stat, unit_cgroup

from .box import Box

pytestmark = pytest.mark.systemd

TEMPLATE = Path(__file__).parents[2] / "packaging" / "systemd" / "aigis-plugin@.service"
N = 30
# A plugin that used some CPU: its cgroup's usage_usec is then clearly above zero.
BUSY = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 600"


def test_usage_of_running_units_comes_from_their_cgroups_without_bus_calls(
    box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    box.write("/etc/systemd/system/aigis-plugin@.service", TEMPLATE.read_text())
    box.systemctl("daemon-reload")
    sup = SystemdSupervisor(root=box.host_path("/"), bus=box.bus_address)
    names = [f"p-{i}" for i in range(N)]  # a dash: escaped in the unit and slice names
    reader = UsageReader("systemd", bus=box.bus_address, root=str(box.host_path("/sys/fs/cgroup")))
    try:
        for name in names:
            spec = ProcessSpec(name, "external", ("/bin/sh", "-c", BUSY), box.workdir)
            sup.add(spec)
        sup.flush()
        deadline = time.monotonic() + 60
        while True:
            statuses = {s.name: s for s in sup.status(names)}
            if all(s.state is State.RUNNING and s.pid for s in statuses.values()):
                break
            assert time.monotonic() < deadline, {n: s.state for n, s in statuses.items()}
            time.sleep(0.2)
        unit = unit_name(names[0])
        assert box.unit_property(unit, "ControlGroup") == "/" + unit_cgroup(unit)
        calls: list[int] = []
        real = Systemd._call_many
        monkeypatch.setattr(
            Systemd, "_call_many", lambda self, batch: calls.append(len(batch)) or real(self, batch)
        )
        pids = {n: s.pid for n, s in statuses.items()}
        reader.read(pids)  # from the host the pids are not ours: only the cgroups count here
        assert calls == []  # no Get per unit, no bus connection at all
        root = str(box.host_path("/sys/fs/cgroup"))
        found, unreadable = cgroup_usage({n: unit_name(n) for n in names}, root)
        assert unreadable == set()  # every cgroup read: nothing left to ask systemd
        memory = box.host_path(f"/sys/fs/cgroup/{unit_cgroup(unit)}/memory.current").exists()
        # Without a memory controller (v1 controllers on the host) systemd has no MemoryCurrent
        # either, and the core takes the unit's process tree (test_usage_systemd.py).
        assert set(found) == (set(names) if memory else set())
        for name in names[:3]:
            unit = unit_name(name)
            cgroup = box.host_path(f"/sys/fs/cgroup/{unit_cgroup(unit)}")
            usec = parse_cpu_stat((cgroup / "cpu.stat").read_bytes())
            systemd_nsec = box.unit_property(unit, "CPUUsageNSec")
            assert usec and usec > 0, name
            if systemd_nsec != "[not set]":  # the same counter systemd reads
                assert usec * 1000 <= int(systemd_nsec), name
            if memory:
                assert found[name].cpu_seconds == pytest.approx(usec / 1e6, abs=0.05), name
                assert found[name].memory_bytes > 0, name
    finally:
        monkeypatch.undo()
        reader.close()
        sup.stop_all([])
        sup.close()
