"""The systemd backend with hundreds of plugin units in one box: every unit starts, runs and stops,
and systemd's own connection to the bus survives (not a timing test: only counts and states).

dbus-daemon allows a connection 512 match rules. systemd adds one to its connection for every
unit a client references (RefUnit) and for every job a client queued that has not finished yet,
so a backend that references each unit, or queues all its jobs at once, breaks systemd's bus
connection a few hundred plugins in ("Got disconnect on API bus" in PID 1's journal).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.systemd import SystemdSupervisor

from .box import Box

pytestmark = pytest.mark.systemd

TEMPLATE = Path(__file__).parents[2] / "packaging" / "systemd" / "aigis-plugin@.service"
N = 600  # beyond 512, the match rules one bus connection may hold


def _spec(name: str, cwd: Path, *argv: str) -> ProcessSpec:
    return ProcessSpec(name, "external", argv, cwd, restart=2, restart_delay=0.1, stop_timeout=5)


def _wait_states(sup: SystemdSupervisor, names: list[str], want: dict[str, State], timeout: float):
    """Drive poll() like the daemon until every name is in its wanted state; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        sup.poll()
        statuses = {s.name: s for s in sup.status(names)}
        wrong = {n: s.state for n, s in statuses.items() if s.state is not want[n]}
        if not wrong:
            return statuses
        if time.monotonic() > deadline:
            sample = dict(list(wrong.items())[:5])
            pytest.fail(f"{len(wrong)} of {len(names)} not in the wanted state: {sample}")
        time.sleep(0.2)


def test_six_hundred_units_start_run_exit_and_stop_with_the_bus_intact(box: Box) -> None:
    box.write("/etc/systemd/system/aigis-plugin@.service", TEMPLATE.read_text())
    box.systemctl("daemon-reload")
    sup = SystemdSupervisor(root=box.host_path("/"), bus=box.bus_address)
    sleepers = [f"s{i}" for i in range(N)]
    # Plugins that end cleanly among the many: how they ended must stay readable even after
    # systemd collected their inactive units.
    enders = [f"e{i}" for i in range(5)]
    try:
        for name in sleepers:
            sup.add(_spec(name, box.workdir, "/bin/sleep", "600"))
        for name in enders:
            sup.add(_spec(name, box.workdir, "/bin/true"))
        sup.flush()
        want = {**dict.fromkeys(sleepers, State.RUNNING), **dict.fromkeys(enders, State.EXITED)}
        statuses = _wait_states(sup, [*sleepers, *enders], want, timeout=120)
        assert {statuses[n].last_exit for n in enders} == {"exit 0"}
        assert len({statuses[n].pid for n in sleepers}) == N
        journal = box.journal(None)
        assert "disconnect on API bus" not in journal
        # Once read, a unit that keeps running costs one Get (its InvocationID) per status, and
        # the list of all states one call: no per-unit batch of eleven properties.
        calls = []
        real = sup._systemd._call_many
        sup._systemd._call_many = lambda batch: calls.append(len(batch)) or real(batch)  # type: ignore[method-assign]
        again = {s.name: s for s in sup.status(sleepers)}
        sup._systemd._call_many = real  # type: ignore[method-assign]
        assert calls == [1, N]
        assert {n: s.pid for n, s in again.items()} == {n: statuses[n].pid for n in sleepers}
        sup.stop_all([])
        stopped = {s.name: s for s in sup.status()}
        assert {stopped[n].state for n in sleepers} == {State.STOPPED}
        assert {stopped[n].state for n in enders} == {State.EXITED}
        # stop_all turned the exit records off (one daemon-reload, not 600 forks of PID 1)
        assert sorted(p.name for p in box.host_path("/run/aigis/exits").iterdir()) == sorted(
            f"aigis-plugin@{n}.service" for n in enders
        )
        assert box.systemctl("list-units", "--state=active", "--plain", "--no-legend",
                             "aigis-plugin@*").stdout.strip() == ""  # fmt: skip
        assert "disconnect on API bus" not in box.journal(None)
    finally:
        sup.stop_all([])
        sup.close()
