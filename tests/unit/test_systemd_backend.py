"""The systemd backend without systemd: state mapping (pure) and batching/adoption on a fake bus."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from aigis._errors import PluginError
from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.dropins import absolute_program, dropin_path, resolve_program
from aigis._supervise.systemd import SystemdSupervisor
from aigis._supervise.units import render_dropin
from aigis._supervise.unitstate import UnitState, describe

UNIT = "aigis-plugin@x.service"
BASE = UnitState(
    unit=UNIT, load_state="loaded", active_state="inactive", sub_state="dead", result="success",
    service_type="exec", restart="on-failure", n_restarts=0, start_limit_burst=3, main_pid=0,
    exec_main_status=0, exec_main_code=0, exec_main_start=0.0, state_change=0.0, job_id=0,
    need_reload=False,
)  # fmt: skip
EXITED, KILLED = 1, 2  # ExecMainCode


@pytest.mark.parametrize(
    ("changes", "limit", "stop", "state", "reason", "restarts"),
    [
        (dict(active_state="active", sub_state="running", main_pid=7), 2, False,
         State.RUNNING, f"{UNIT} active/running", 0),
        (dict(active_state="activating", sub_state="start"), 2, False,
         State.STARTING, f"{UNIT} activating/start", 0),
        (dict(active_state="activating", sub_state="auto-restart", n_restarts=1,
              exec_main_code=EXITED, exec_main_status=1), 2, False,
         State.BACKOFF, "exit 1; restart 2/2 pending", 1),
        # the restart systemd 252 will count and then refuse: not "restart 3/2 pending"
        (dict(active_state="activating", sub_state="auto-restart", n_restarts=2,
              exec_main_code=EXITED, exec_main_status=1), 2, False,
         State.BACKOFF, "exit 1; restart limit 2 reached, giving up", 2),
        (dict(active_state="activating", sub_state="auto-restart-queued", n_restarts=0,
              exec_main_code=EXITED, exec_main_status=1), 2, False,
         State.BACKOFF, "exit 1; restart 1/2 pending", 0),
        (dict(active_state="deactivating", sub_state="stop-sigterm"), 2, True,
         State.STOPPING, "stop requested", 0),
        # systemd 252: NRestarts counts the refused restart; StartLimitBurst = RESTART + 1
        (dict(active_state="failed", sub_state="failed", result="exit-code", n_restarts=3,
              exec_main_code=EXITED, exec_main_status=1), 2, False,
         State.FAILED, "gave up after 2 restarts (last: exit 1)", 2),
        (dict(active_state="failed", sub_state="failed", result="signal", restart="no",
              exec_main_code=KILLED, exec_main_status=9), None, False,
         State.FAILED, "signal 9 (SIGKILL); not restarted (RESTART not set)", 0),
        (dict(active_state="failed", sub_state="failed", result="timeout", restart="no",
              exec_main_code=KILLED, exec_main_status=9), None, False,
         State.FAILED, "failed (timeout; last: signal 9 (SIGKILL))", 0),
        (dict(exec_main_code=EXITED, exec_main_start=5.0), 2, False,
         State.EXITED, "exited cleanly (exit 0)", 0),
        (dict(exec_main_code=KILLED, exec_main_status=15, exec_main_start=5.0), 2, True,
         State.STOPPED, "stopped by request (last: signal 15 (SIGTERM))", 0),
        (dict(exec_main_code=KILLED, exec_main_status=15, exec_main_start=5.0), 2, False,
         State.STOPPED, "stopped outside AIGIS (last: signal 15 (SIGTERM))", 0),
        ({}, 2, False, State.STOPPED, "not started", 0),
    ],
)  # fmt: skip
def test_unit_states_map_to_the_shared_vocabulary(changes, limit, stop, state, reason, restarts):
    got = describe(replace(BASE, **changes), restart_limit=limit, stop_requested=stop)
    assert (got.state, got.reason, got.restarts) == (state, reason, restarts)


class FakeSystemd:
    """Records calls; units are ``UnitState``s the test sets; jobs finish at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.units: dict[str, UnitState] = {}

    def version(self) -> int:
        return 252

    def reload(self) -> None:
        self.calls.append(("reload",))

    def state(self, unit: str) -> UnitState:
        return self.units.get(unit, replace(BASE, unit=unit))

    def states(self, units):
        self.calls.append(("states", len(units)))
        return [self.state(u) for u in units]

    def brief(self, units):
        self.calls.append(("brief", len(units)))
        return {u: (self.state(u).active_state, self.state(u).sub_state, 0) for u in units}

    def _job(self, kind: str, unit: str) -> None:
        self.calls.append((kind, unit))
        active = "inactive" if kind == "stop" else "active"
        self.units[unit] = replace(self.state(unit), active_state=active, sub_state="x")

    def start(self, unit: str) -> None:
        self._job("start", unit)

    def restart(self, unit: str) -> None:
        self._job("restart", unit)

    def stop(self, unit: str) -> None:
        self._job("stop", unit)

    def reset_failed(self, unit: str) -> None:
        self.calls.append(("reset-failed", unit))

    def pin(self, unit: str) -> None:
        self.calls.append(("pin", unit))

    def unpin(self, unit: str) -> None:
        self.calls.append(("unpin", unit))

    def list_units(self, pattern: str) -> list[str]:
        return sorted(u for u in self.units if u.startswith("aigis-plugin@"))

    def jobs(self, jobs):
        """The batch, recorded call by call as the real one sends them."""
        self.calls.append(("jobs", len(jobs)))
        for unit, how in jobs:
            if how != "stop":
                self.pin(unit)
            if how in ("start", "restart"):
                self.reset_failed(unit)
            if how != "pin":
                getattr(self, how)(unit)
        return {unit: None for unit, _ in jobs}


def make(tmp_path: Path) -> tuple[SystemdSupervisor, FakeSystemd]:
    fake = FakeSystemd()
    return SystemdSupervisor(root=tmp_path, systemd=fake), fake  # type: ignore[arg-type]


def spec(name: str, cwd: Path, *argv: str) -> ProcessSpec:
    return ProcessSpec(name, "external", argv or ("/bin/sleep", "9"), cwd, restart=2)


def test_one_daemon_reload_for_a_batch_of_adds(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    for i in range(5):
        sup.add(spec(f"p{i}", tmp_path))
    assert fake.calls == []  # nothing happens until the batch is applied
    sup.status()
    assert fake.calls.count(("reload",)) == 1
    assert [c[1] for c in fake.calls if c[0] == "start"] == [
        f"aigis-plugin@p{i}.service" for i in range(5)
    ]
    assert dropin_path(tmp_path, "aigis-plugin@p0.service").stat().st_mode & 0o777 == 0o644


def test_a_running_unit_with_the_same_dropin_is_adopted_not_restarted(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    unit = "aigis-plugin@kept.service"
    path = dropin_path(tmp_path, unit)
    path.parent.mkdir(parents=True)
    path.write_text(render_dropin(absolute_program(spec("kept", tmp_path)), 252))
    fake.units[unit] = replace(BASE, unit=unit, active_state="active", sub_state="running")
    sup.add(spec("kept", tmp_path))
    sup.status()
    assert [c for c in fake.calls if c[0] not in ("brief", "states", "jobs")] == [("pin", unit)]


def test_a_running_unit_with_another_dropin_is_rewritten_and_restarted(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    unit = "aigis-plugin@moved.service"
    path = dropin_path(tmp_path, unit)
    path.parent.mkdir(parents=True)
    path.write_text("# an older drop-in\n")
    fake.units[unit] = replace(BASE, unit=unit, active_state="active", sub_state="running")
    sup.add(spec("moved", tmp_path))
    sup.status()
    assert ("reload",) in fake.calls and ("restart", unit) in fake.calls
    assert path.read_text().startswith("# Written by AIGIS for plugin moved")


def test_remove_deletes_the_dropin_and_reloads_with_the_next_batch(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    sup.add(spec("a", tmp_path))
    sup.add(spec("b", tmp_path))
    sup.status()
    fake.calls.clear()
    sup.remove("a")
    sup.remove("b")
    assert ("reload",) not in fake.calls  # removals are batched too
    sup.stop_all([])
    assert fake.calls.count(("reload",)) == 1
    assert not dropin_path(tmp_path, "aigis-plugin@a.service").parent.exists()


def test_remove_survives_a_bus_error_after_the_stop(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    sup.add(spec("a", tmp_path))
    sup.status()

    def no_reply(unit: str) -> None:
        raise TimeoutError("systemd did not answer")

    fake.reset_failed = no_reply  # type: ignore[method-assign]
    sup.remove("a")  # logged, not raised: the name is free again
    sup.add(spec("a", tmp_path))


def test_retire_stops_only_units_of_plugins_the_config_does_not_list(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    for name in ("gone", "broken"):  # "broken" is listed but failed to load this time
        unit = f"aigis-plugin@{name}.service"
        fake.units[unit] = replace(BASE, unit=unit, active_state="active", sub_state="running")
    template_dir = dropin_path(tmp_path, "aigis-plugin@.service").parent
    template_dir.mkdir(parents=True)  # e.g. `systemctl edit --runtime aigis-plugin@.service`
    assert sup.retire_unknown(["broken", "other"]) == ["aigis-plugin@gone.service"]
    assert ("stop", "aigis-plugin@gone.service") in fake.calls
    assert ("stop", "aigis-plugin@broken.service") not in fake.calls
    assert template_dir.exists()


def test_program_is_resolved_to_an_absolute_path(tmp_path: Path) -> None:
    assert resolve_program(spec("x", tmp_path, "sh", "-c", "true")).endswith("/sh")
    assert resolve_program(spec("x", tmp_path, "./run.sh")) == str(tmp_path / "run.sh")
    with pytest.raises(PluginError, match='plugin "x": cannot find "no-such-program-here"'):
        resolve_program(spec("x", tmp_path, "no-such-program-here"))


def test_many_adds_cost_one_state_read_one_reload_and_one_batch_of_jobs(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    running = "aigis-plugin@p7.service"
    fake.units[running] = replace(BASE, unit=running, active_state="active", sub_state="running")
    for i in range(50):
        sup.add(spec(f"p{i}", tmp_path))
    assert fake.calls == []  # add only writes drop-ins
    sup.flush(wait=False)
    batches = [c for c in fake.calls if c[0] in ("brief", "states", "reload", "jobs")]
    # one brief read of all, the full state of the one running (rewritten: restarted)
    assert batches == [("brief", 50), ("states", 1), ("reload",), ("jobs", 50)]
    assert ("restart", running) in fake.calls
