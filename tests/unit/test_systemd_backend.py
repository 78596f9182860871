"""The systemd backend without systemd: state mapping (pure) and batching/adoption on a fake bus."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from aigis._errors import PluginError
from aigis._supervise import systemd as systemd_backend
from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.dropins import absolute_program, dropin_path, resolve_program
from aigis._supervise.systemd import SystemdSupervisor
from aigis._supervise.units import render_dropin
from aigis._supervise.unitstate import (
    ExitRecord,
    UnitState,
    describe,
    parse_exit_record,
    with_exit_record,
)

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

    def states(self, units, fresh=False):
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

    def list_units(self, pattern: str) -> list[str]:
        return sorted(u for u in self.units if u.startswith("aigis-plugin@"))

    def jobs(self, jobs):
        """The batch, recorded call by call as the real one sends them."""
        self.calls.append(("jobs", len(jobs)))
        for unit, how in jobs:
            if how in ("start", "restart"):
                self.reset_failed(unit)
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
    # read, never touched: no job, no reference (systemd keeps nothing per unit for us)
    assert [c for c in fake.calls if c[0] not in ("brief", "states")] == []


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


@pytest.mark.parametrize(
    ("text", "code", "status", "result"),
    [
        ("success exited 0", 1, 0, "success"),
        ("exit-code exited 3", 1, 3, "exit-code"),
        ("signal killed TERM", 2, 15, "signal"),
        ("core-dump dumped SEGV", 3, 11, "core-dump"),
        ("resources", 0, 0, "resources"),  # no main process ran: $EXIT_CODE was empty
        ("success killed NOSUCHSIGNAL", 0, 0, "success"),
    ],
)
def test_exit_records_parse_as_systemd_would_report_the_exit(text, code, status, result):
    record = parse_exit_record(text, 5.0)
    assert record == ExitRecord(result, code, status, 5.0)


@pytest.mark.parametrize("text", ["", "a b c d", "x" * 300])
def test_malformed_exit_records_are_ignored(text):
    assert parse_exit_record(text, 5.0) is None


def test_an_exit_record_explains_a_collected_unit_only():
    clean = ExitRecord("success", 1, 0, 5.0)
    got = with_exit_record(BASE, clean)  # collected: systemd forgot everything
    view = describe(got, restart_limit=2, stop_requested=False)
    assert (view.state, view.reason, got.state_change) == (
        State.EXITED,
        "exited cleanly (exit 0)",
        5.0,
    )
    killed = with_exit_record(BASE, ExitRecord("success", 2, 15, 5.0))
    view = describe(killed, restart_limit=2, stop_requested=False)
    assert view.reason == "stopped outside AIGIS (last: signal 15 (SIGTERM))"
    running = replace(BASE, active_state="active", sub_state="running", main_pid=7)
    assert with_exit_record(running, clean) is running
    queued = replace(BASE, job_id=3)  # a start job waits: the record is of an earlier run
    assert with_exit_record(queued, clean) is queued
    failed = replace(BASE, active_state="failed", exec_main_code=1, exec_main_status=1)
    assert with_exit_record(failed, clean) is failed


def test_status_reads_a_clean_exit_from_the_record_once_systemd_collected_the_unit(tmp_path):
    sup, fake = make(tmp_path)
    sup.add(spec("done", tmp_path, "/bin/true"))
    sup.status()
    unit = "aigis-plugin@done.service"
    fake.units[unit] = replace(BASE, unit=unit)  # exited, then collected: a never-run unit
    assert sup.status(["done"])[0].reason == "not started"
    (tmp_path / "run/aigis/exits" / unit).symlink_to("success exited 0")
    status = sup.status(["done"])[0]
    assert (status.state, status.last_exit) == (State.EXITED, "exit 0")
    sup.remove("done")
    assert not (tmp_path / "run/aigis/exits" / unit).is_symlink()


class SlowJobs(FakeSystemd):
    """Jobs stay unfinished for two reads of their unit; records the most unfinished at once."""

    def __init__(self) -> None:
        super().__init__()
        self.unfinished: dict[str, int] = {}
        self.most = 0

    def jobs(self, jobs):
        done = super().jobs(jobs)
        self.unfinished.update((unit, 2) for unit, _ in jobs)
        self.most = max(self.most, len(self.unfinished))
        return done

    def brief(self, units):
        self.calls.append(("brief", len(units)))
        out = {u: (self.state(u).active_state, "x", int(u in self.unfinished)) for u in units}
        for unit in units:
            if unit in self.unfinished:
                self.unfinished[unit] -= 1
                if not self.unfinished[unit]:
                    del self.unfinished[unit]
        return out


def test_many_jobs_are_queued_in_batches_with_a_bounded_number_unfinished(tmp_path, monkeypatch):
    # systemd holds a bus match rule per unfinished job of a client: 512 break its connection
    monkeypatch.setattr(systemd_backend, "MAX_JOBS", 10)
    fake = SlowJobs()
    sup = SystemdSupervisor(root=tmp_path, systemd=fake)  # type: ignore[arg-type]
    for i in range(25):
        sup.add(spec(f"p{i}", tmp_path))
    sup.flush(wait=False)
    assert [c for c in fake.calls if c[0] == "jobs"] == [("jobs", 10), ("jobs", 10), ("jobs", 5)]
    assert fake.most == 10
    assert len([c for c in fake.calls if c[0] == "start"]) == 25


def test_stopping_every_plugin_turns_exit_records_off_until_the_next_start(tmp_path):
    # each ExecStopPost= is a fork of PID 1: 1,000 of them made a full stop 2-3x slower
    sup, fake = make(tmp_path)
    for i in range(systemd_backend.STOPPING_MIN):
        sup.add(spec(f"p{i}", tmp_path))
    sup.status()
    fake.calls.clear()
    sup.stop_all([])
    stopping = tmp_path / "run/systemd/system/aigis-plugin@.service.d/90-aigis-stopping.conf"
    assert stopping.read_text().endswith("[Service]\nExecStopPost=\n")
    assert fake.calls.index(("reload",)) < fake.calls.index(("stop", "aigis-plugin@p0.service"))
    again = SystemdSupervisor(root=tmp_path, systemd=fake)  # type: ignore[arg-type]
    assert not stopping.exists()
    fake.calls.clear()
    again.add(spec("p0", tmp_path))
    again.flush()
    assert ("reload",) in fake.calls  # systemd forgets the override before anything starts


def test_stopping_a_few_plugins_keeps_their_exit_records(tmp_path):
    sup, fake = make(tmp_path)
    sup.add(spec("only", tmp_path))
    sup.status()
    sup.stop_all([])
    assert not (tmp_path / "run/systemd/system/aigis-plugin@.service.d").exists()
