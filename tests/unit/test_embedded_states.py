"""The embedded supervisor's state machine against a recording fake OS: nothing ever forks."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from aigis._errors import PluginError
from aigis._supervise.base import LogLocation, ProcessSpec, State
from aigis._supervise.embedded import KILL_GRACE, EmbeddedSupervisor
from aigis._supervise.procs import TAG_VAR, Stray, Tagged
from tests.conftest import settings_for

WALL = 1_700_000_000.0  # fake time.time() = WALL + fake monotonic


@dataclass
class FakeProc:
    """A pretend process: alive until a signal it does not ignore, or the test, ends it."""

    pid: int
    tag: str
    pgid: int
    ignores_term: bool = False
    unkillable: bool = False
    returncode: int | None = None
    plugin_dir: str | None = None


@dataclass
class FakeTimer:
    when: float
    seq: int
    callback: object
    cancelled: bool = False

    def cancel(self):
        self.cancelled = True


class FakeOs:
    """Records every call; time only moves when the test (or a wait) moves it, and events
    (exits, timers) are delivered only by ``dispatch`` (poll), ``wait`` and ``sleep``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple] = []
        self.procs: dict[int, FakeProc] = {}
        self.mains: list[int] = []
        self.next_pid = 100
        self.spawn_error: OSError | None = None
        self.ignore_term_next = False
        self.strays: list[int] = []  # pids find_strays reports (left by an "earlier core")
        self.on_exit: dict[int, object] = {}
        self.exited: list[int] = []  # mains whose exit event is not delivered yet
        self.timers: list[FakeTimer] = []
        self.closed = False

    # -- the Os seam
    def identity(self, spec):
        return None

    def spawn(self, argv, cwd, env, output, on_exit, ids=None):
        self.calls.append(("spawn", argv, cwd, dict(env)))
        if self.spawn_error is not None:
            raise self.spawn_error
        pid = self._new(env[TAG_VAR], pgid=None)
        self.procs[pid].ignores_term = self.ignore_term_next
        self.mains.append(pid)
        self.on_exit[pid] = on_exit
        return pid

    def kill_group(self, pgid, signum):
        self.calls.append(("killpg", pgid, signum))
        for proc in list(self.procs.values()):
            if proc.pgid == pgid:
                self._deliver(proc, signum)

    def kill(self, pid, signum):
        self.calls.append(("kill", pid, signum))
        if pid in self.procs:
            self._deliver(self.procs[pid], signum)

    def group_alive(self, pgid):
        return any(p.pgid == pgid and p.returncode is None for p in self.procs.values())

    def alive(self, pid):
        return pid in self.procs and self.procs[pid].returncode is None

    def find_strays(self):
        self.calls.append(("find_strays",))
        return [
            Stray(pid, self.procs[pid].tag, self.procs[pid].pgid, self.procs[pid].plugin_dir)
            for pid in self.strays
            if self.alive(pid)
        ]

    def find_tagged(self, tags, roots=()):
        self.calls.append(("scan", frozenset(tags)))
        return {
            p.pid: Tagged(p.tag, p.pgid)
            for p in self.procs.values()
            if p.returncode is None and p.tag in tags
        }

    def reap_orphans(self, pgids):
        pass

    def call_at(self, when, callback):
        timer = FakeTimer(when, len(self.timers), callback)
        self.timers.append(timer)
        return timer

    def dispatch(self):
        while True:
            if self.exited:
                pid = self.exited.pop(0)
                self.on_exit.pop(pid)(self.procs[pid].returncode)
                continue
            due = [t for t in self.timers if not t.cancelled and t.when <= self.now]
            if not due:
                return
            timer = min(due, key=lambda t: (t.when, t.seq))
            self.timers.remove(timer)
            timer.callback()

    def wait(self, cond, timeout):
        cond.release()  # as Condition.wait does: events are handled without the lock
        try:
            self.now += timeout
            self.dispatch()
        finally:
            cond.acquire()

    def monotonic(self):
        return self.now

    def time(self):
        return WALL + self.now

    def sleep(self, seconds):
        self.now += seconds
        self.dispatch()

    def close(self):
        self.closed = True

    # -- test helpers
    def _new(self, tag, pgid):
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.procs[pid] = FakeProc(pid, tag, pgid if pgid is not None else pid)
        return pid

    def _deliver(self, proc, signum):
        if proc.returncode is not None or proc.unkillable:
            return
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and not proc.ignores_term):
            self._end(proc, -signum)

    def _end(self, proc, returncode):
        proc.returncode = returncode
        if proc.pid in self.on_exit:
            self.exited.append(proc.pid)

    def exit(self, pid, returncode):
        self._end(self.procs[pid], returncode)

    def descendant(self, parent, escaped=False, **kw):
        """A child of ``parent`` with its tag; ``escaped`` means it called setsid."""
        tag = self.procs[parent].tag
        pid = self._new(tag, pgid=None if escaped else self.procs[parent].pgid)
        for key, value in kw.items():
            setattr(self.procs[pid], key, value)
        return pid

    def spawns(self):
        return [c for c in self.calls if c[0] == "spawn"]

    def signals(self):
        return [c for c in self.calls if c[0] in ("kill", "killpg")]

    def scheduled(self):
        """Pending timers, as (when, callback name)."""
        live = [t for t in self.timers if not t.cancelled]
        return [(t.when, getattr(t.callback, "__name__", "")) for t in live]


@pytest.fixture
def fake():
    return FakeOs()


@pytest.fixture
def sup(fake, tmp_path):
    supervisor = EmbeddedSupervisor(
        settings_for(tmp_path, state_dir=tmp_path), console=None, os_=fake
    )
    yield supervisor
    supervisor.stop_all([])
    supervisor.close()  # the log files


def spec(name="p", **kw):
    kw.setdefault("startsecs", 1.0)
    return ProcessSpec(name, "external", ("prog", "--flag"), Path("/srv/p"), {"A": "1"}, **kw)


def state(sup, name="p"):
    return sup.status([name])[0]


def advance(fake, sup, seconds):
    fake.now += seconds
    sup.poll()


# -- starting ---------------------------------------------------------------------------------
def test_add_spawns_with_the_spec_env_and_a_fresh_tag(sup, fake):
    sup.add(spec())
    (_, argv, cwd, env), = fake.spawns()  # fmt: skip
    assert (argv, cwd, env["A"]) == (("prog", "--flag"), Path("/srv/p"), "1")
    assert env[TAG_VAR].startswith("p:") and len(env[TAG_VAR]) > len("p:") + 8
    status = state(sup)
    assert (status.state, status.pid, status.restarts) == (State.STARTING, 100, 0)
    assert status.since == status.started_at == WALL


def stray(fake, name="p", plugin_dir="/var/lib/aigis/ext/p", **kw):
    """A process an "earlier core" left running for ``name``."""
    pid = fake._new(f"{name}:old", pgid=None)
    fake.procs[pid].plugin_dir = plugin_dir
    for key, value in kw.items():
        setattr(fake.procs[pid], key, value)
    fake.strays.append(pid)
    return pid


def in_dir(name="p", plugin_dir="/var/lib/aigis/ext/p", **kw):
    return ProcessSpec(
        name, "external", ("prog",), Path("/srv/p"), {"AIGIS_PLUGIN_DIR": plugin_dir}, **kw
    )


def test_processes_left_by_an_earlier_core_are_stopped_before_spawning(sup, fake):
    old = stray(fake)
    sup.add(in_dir())
    assert ("kill", old, signal.SIGTERM) in fake.calls
    assert fake.procs[old].returncode == -signal.SIGTERM
    kinds = [c[0] for c in fake.calls]
    assert kinds.index("kill") < kinds.index("spawn")  # gone before the new one starts


def test_a_stray_ignoring_sigterm_is_killed(sup, fake):
    old = stray(fake, ignores_term=True)
    sup.add(in_dir(stop_timeout=2))
    assert ("kill", old, signal.SIGKILL) in fake.calls
    assert fake.procs[old].returncode == -signal.SIGKILL
    assert 2 <= fake.now < 2.5


def test_one_scan_of_the_process_table_serves_every_add(sup, fake):
    """Start-up was O(plugins x processes): every add scanned the whole table for strays."""
    olds = [stray(fake, f"p{i}", f"/ext/p{i}") for i in range(3)]
    for i in range(5):
        sup.add(in_dir(f"p{i}", f"/ext/p{i}"))
    assert [c for c in fake.calls if c[0] in ("find_strays", "scan")] == [("find_strays",)]
    assert all(fake.procs[pid].returncode == -signal.SIGTERM for pid in olds)


def test_strays_of_another_instance_or_plugin_are_never_touched(sup, fake):
    other_instance = stray(fake, "p", "/elsewhere/ext/p")
    other_plugin = stray(fake, "q", "/var/lib/aigis/ext/q")
    sup.add(in_dir())
    assert not fake.signals()
    assert fake.alive(other_instance) and fake.alive(other_plugin)


def test_a_stray_already_gone_is_not_signalled(sup, fake):
    old = stray(fake)
    fake.procs[old].returncode = 0  # exited between the scan and the add
    fake.strays = [old]
    sup.add(in_dir())
    assert not fake.signals()


def test_without_a_plugin_dir_nothing_is_searched(sup, fake):
    sup.add(spec())
    assert not [c for c in fake.calls if c[0] == "find_strays"]


def test_every_spawn_gets_a_new_tag(sup, fake):
    sup.add(spec(restart=1, restart_delay=0, startsecs=0))
    fake.exit(100, 1)
    sup.poll()
    sup.poll()
    tags = [call[3][TAG_VAR] for call in fake.spawns()]
    assert len(tags) == 2 and tags[0] != tags[1]


def test_running_only_after_startsecs(sup, fake):
    sup.add(spec(startsecs=1.0))
    advance(fake, sup, 0.5)
    assert state(sup).state is State.STARTING
    advance(fake, sup, 0.5)
    status = state(sup)
    assert (status.state, status.since) == (State.RUNNING, WALL + 1.0)


def test_startsecs_zero_is_running_at_once(sup):
    sup.add(spec(startsecs=0))
    assert state(sup).state is State.RUNNING


def test_mark_ready_is_running_before_startsecs(sup, fake):
    sup.add(spec(startsecs=30))
    sup.mark_ready("p")
    status = state(sup)
    assert (status.state, status.reason) == (State.RUNNING, "reported ready")


def test_spawn_failure_is_failed_with_the_os_error(sup, fake):
    fake.spawn_error = FileNotFoundError(2, "No such file or directory", "prog")
    sup.add(spec(restart=3))
    status = state(sup)
    assert status.state is State.FAILED
    assert "could not spawn" in status.reason and "prog" in status.reason


def test_adding_a_name_twice_is_an_error(sup):
    sup.add(spec())
    with pytest.raises(PluginError, match='plugin "p": already supervised'):
        sup.add(spec())


# -- exits and restarts -------------------------------------------------------------------------
def test_clean_exit_is_exited_and_never_restarted(sup, fake):
    sup.add(spec(restart=5, restart_delay=0))
    fake.exit(100, 0)
    for _ in range(5):
        advance(fake, sup, 10)
    status = state(sup)
    assert (status.state, status.last_exit, status.restarts) == (State.EXITED, "exit 0", 0)
    assert status.reason == "exited cleanly (exit 0)"
    assert len(fake.spawns()) == 1


def test_failure_without_restart_is_failed(sup, fake):
    sup.add(spec(startsecs=0))
    fake.exit(100, 1)
    advance(fake, sup, 100)
    status = state(sup)
    assert (status.state, status.last_exit) == (State.FAILED, "exit 1")
    assert status.reason == "exit 1; not restarted (RESTART not set)"
    assert len(fake.spawns()) == 1


def test_restarts_with_growing_backoff_then_gives_up(sup, fake):
    sup.add(spec(restart=2, restart_delay=1.0, restart_delay_max=60, startsecs=0))
    fake.exit(100, 1)
    sup.poll()
    assert state(sup).state is State.BACKOFF
    advance(fake, sup, 0.9)
    assert state(sup).state is State.BACKOFF
    advance(fake, sup, 0.1)
    status = state(sup)
    assert (status.state, status.restarts, status.pid) == (State.RUNNING, 1, 101)
    fake.exit(101, 1)
    sup.poll()
    advance(fake, sup, 1.9)
    assert state(sup).state is State.BACKOFF  # second delay is 2 s
    advance(fake, sup, 0.1)
    assert state(sup).restarts == 2
    fake.exit(102, 1)
    advance(fake, sup, 100)
    status = state(sup)
    assert (status.state, status.restarts, status.last_exit) == (State.FAILED, 2, "exit 1")
    assert status.reason == "gave up after 2 restarts (last: exit 1)"
    assert len(fake.spawns()) == 3


def test_death_by_signal_is_a_failure(sup, fake):
    sup.add(spec(restart=1, startsecs=0))
    fake.exit(100, -signal.SIGKILL)
    sup.poll()
    status = state(sup)
    assert (status.state, status.last_exit) == (State.BACKOFF, "signal 9 (SIGKILL)")


def test_exit_before_startsecs_is_a_failure_of_starting(sup, fake):
    sup.add(spec(restart=1, startsecs=1.0, restart_delay=1))
    advance(fake, sup, 0.1)
    fake.exit(100, 3)
    sup.poll()
    assert state(sup).state is State.BACKOFF
    assert "while starting" in state(sup).reason
    advance(fake, sup, 1)
    fake.exit(101, 3)
    sup.poll()
    status = state(sup)
    assert status.state is State.FAILED
    assert status.reason == "gave up after 1 restart (last: exit 3 while starting)"


def test_a_restart_is_scheduled_for_exactly_the_policys_delay(sup, fake):
    """Exits were noticed on a 0.2 s tick: a restart came up to two ticks late."""
    sup.add(spec(restart=3, restart_delay=0.5, startsecs=0))
    fake.now = 7.25
    fake.exit(100, 1)
    sup.poll()  # the exit event
    assert (7.25 + 0.5, "<lambda>") in fake.scheduled()
    fake.now = 7.75
    sup.poll()  # the timer, not a tick: nothing else has to happen first
    status = state(sup)
    assert (status.state, status.pid, status.since) == (State.RUNNING, 101, WALL + 7.75)


def test_leftovers_of_a_dead_run_are_terminated_before_the_restart(sup, fake):
    sup.add(spec(restart=1, restart_delay=0, startsecs=0, stop_timeout=5))
    child = fake.descendant(100, ignores_term=True)
    fake.exit(100, 1)
    sup.poll()  # exit noticed: the rest of its process group gets SIGTERM
    assert ("killpg", 100, signal.SIGTERM) in fake.calls
    advance(fake, sup, 1)
    assert state(sup).state is State.BACKOFF and len(fake.spawns()) == 1
    for _ in range(5):
        advance(fake, sup, 1)  # stop_timeout passed: SIGKILL, and the restart follows
    assert ("killpg", 100, signal.SIGKILL) in fake.calls
    assert fake.procs[child].returncode == -signal.SIGKILL
    assert state(sup).state is State.RUNNING and len(fake.spawns()) == 2


def test_escapees_of_a_dead_run_are_found_by_one_scan_and_terminated(sup, fake):
    sup.add(spec("a", restart=1, restart_delay=5, startsecs=0))
    sup.add(spec("b", restart=1, restart_delay=5, startsecs=0))
    escaped = fake.descendant(100, escaped=True)
    fake.exit(100, 1)
    fake.exit(101, 1)
    sup.poll()
    advance(fake, sup, 0.1)
    scans = [c for c in fake.calls if c[0] == "scan"]
    assert len(scans) == 1 and len(scans[0][1]) == 2  # both dead runs' tags, one scan
    assert ("kill", escaped, signal.SIGTERM) in fake.calls
    assert not fake.alive(escaped)


# -- stopping -----------------------------------------------------------------------------------
def test_stop_terminates_the_process_group(sup, fake):
    sup.add(spec(restart=3))
    status = sup.stop("p")
    assert fake.signals() == [("killpg", 100, signal.SIGTERM)]
    assert (status.state, status.pid, status.last_exit) == (
        State.STOPPED,
        None,
        "signal 15 (SIGTERM)",
    )
    advance(fake, sup, 100)
    assert state(sup).state is State.STOPPED and len(fake.spawns()) == 1


def test_stop_sends_sigkill_after_stop_timeout(sup, fake):
    fake.ignore_term_next = True
    sup.add(spec(stop_timeout=3))
    status = sup.stop("p")
    assert fake.signals() == [
        ("killpg", 100, signal.SIGTERM),
        ("killpg", 100, signal.SIGKILL),
        ("kill", 100, signal.SIGKILL),
    ]
    assert 3 <= fake.now < 3.5
    assert (status.state, status.last_exit) == (State.STOPPED, "signal 9 (SIGKILL)")
    assert status.reason == "stopped by request (SIGKILL after 3s)"


def test_stop_finds_descendants_that_escaped_the_group(sup, fake):
    sup.add(spec())
    escaped = fake.descendant(fake.descendant(100), escaped=True, ignores_term=True)
    status = sup.stop("p")
    assert ("kill", escaped, signal.SIGTERM) in fake.calls
    assert ("kill", escaped, signal.SIGKILL) in fake.calls
    assert fake.procs[escaped].returncode == -signal.SIGKILL
    assert status.state is State.STOPPED


def test_stop_never_says_stopped_while_a_process_lives(sup, fake):
    sup.add(spec(stop_timeout=1))
    stuck = fake.descendant(100, escaped=True, unkillable=True)
    status = sup.stop("p")
    assert fake.now >= 1 + KILL_GRACE
    assert status.state is State.FAILED
    assert status.reason == f"could not stop: pid {stuck} survived SIGKILL"


def test_stop_during_backoff_cancels_the_restart(sup, fake):
    sup.add(spec(restart=3, restart_delay=5, startsecs=0))
    fake.exit(100, 1)
    sup.poll()
    status = sup.stop("p")
    assert (status.state, status.last_exit) == (State.STOPPED, "exit 1")
    advance(fake, sup, 100)
    assert state(sup).state is State.STOPPED and len(fake.spawns()) == 1


def test_stop_of_an_exited_plugin_keeps_its_state(sup, fake):
    sup.add(spec())
    fake.exit(100, 0)
    sup.poll()
    assert sup.stop("p").state is State.EXITED


# -- manual start, restart, remove --------------------------------------------------------------
def test_start_after_giving_up_resets_the_restart_count(sup, fake):
    sup.add(spec(restart=1, restart_delay=0, startsecs=0))
    for pid in (100, 101):
        fake.exit(pid, 1)
        sup.poll()
        sup.poll()
    assert (state(sup).state, state(sup).restarts) == (State.FAILED, 1)
    status = sup.start("p")
    assert (status.state, status.restarts, status.pid) == (State.RUNNING, 0, 102)
    assert status.reason == "started by request"


def test_start_of_a_running_plugin_changes_nothing(sup, fake):
    sup.add(spec())
    assert sup.start("p").pid == 100 and len(fake.spawns()) == 1


def test_restart_stops_then_starts_with_a_fresh_count(sup, fake):
    sup.add(spec(restart=3, restart_delay=0, startsecs=0))
    fake.exit(100, 1)
    sup.poll()
    sup.poll()
    assert state(sup).restarts == 1
    status = sup.restart("p")
    assert ("killpg", 101, signal.SIGTERM) in fake.calls
    assert (status.state, status.restarts, status.pid) == (State.RUNNING, 0, 102)


def test_remove_stops_and_forgets(sup, fake):
    sup.add(spec())
    sup.remove("p")
    assert fake.procs[100].returncode == -signal.SIGTERM
    assert sup.status() == []
    with pytest.raises(PluginError, match='plugin "p": not supervised'):
        sup.status(["p"])


def test_stop_all_follows_the_order_and_nothing_restarts(sup, fake):
    for name in ("a", "b", "c"):
        sup.add(spec(name, restart=5, restart_delay=0))
    sup.stop_all([["c"], ["a"], ["b"]])
    assert [c[1] for c in fake.signals()] == [102, 100, 101]
    assert {s.state for s in sup.status()} == {State.STOPPED}
    advance(fake, sup, 100)
    assert len(fake.spawns()) == 3
    with pytest.raises(PluginError, match="being stopped"):
        sup.start("a")


def test_stop_all_signals_a_whole_step_at_once_each_with_its_own_deadline(sup, fake):
    """Shutdown stopped plugins one at a time: 1,000 plugins took 116 s."""
    fake.ignore_term_next = True
    sup.add(spec("a", stop_timeout=3))
    sup.add(spec("b", stop_timeout=5))
    fake.ignore_term_next = False
    sup.add(spec("c", stop_timeout=5))
    sup.stop_all([["a", "b", "c"]])
    term, kill = signal.SIGTERM, signal.SIGKILL
    assert fake.signals() == [
        ("killpg", 100, term),
        ("killpg", 101, term),
        ("killpg", 102, term),
        ("killpg", 100, kill),  # a's deadline: 3 s
        ("kill", 100, kill),
        ("killpg", 101, kill),  # b's deadline: 5 s, counted from the same start
        ("kill", 101, kill),
    ]
    assert 5 <= fake.now < 5.5  # side by side: not 3 + 5
    reasons = [s.reason for s in sup.status()]
    assert reasons == [
        "stopped by request (SIGKILL after 3s)",
        "stopped by request (SIGKILL after 5s)",
        "stopped by request (last: signal 15 (SIGTERM))",
    ]


def test_one_scan_per_step_finds_what_escaped_every_group(sup, fake):
    for name in ("a", "b", "c"):
        sup.add(spec(name))
    escaped = [fake.descendant(pid, escaped=True) for pid in (100, 101, 102)]
    sup.stop_all([["a", "b", "c"]])
    assert all(("kill", pid, signal.SIGTERM) in fake.calls for pid in escaped)
    scans = [c for c in fake.calls if c[0] == "scan"]
    assert len(scans) == 2  # one to find escapees, one to confirm nothing is left
    assert {s.state for s in sup.status()} == {State.STOPPED}


def test_stop_all_stops_unlisted_plugins_too(sup, fake):
    sup.add(spec("a"))
    sup.add(spec("b"))
    sup.stop_all([["b", "unknown"]])
    assert [s.state for s in sup.status()] == [State.STOPPED, State.STOPPED]


def test_status_keeps_registration_order_and_filters(sup):
    for name in ("z", "a", "m"):
        sup.add(spec(name))
    assert [s.name for s in sup.status()] == ["z", "a", "m"]
    assert [s.name for s in sup.status(["m", "z"])] == ["m", "z"]


def test_log_location_is_the_plugins_file(sup, tmp_path):
    sup.add(spec())
    assert sup.log_location("p") == LogLocation(file=tmp_path / "log" / "p.log")
    assert sup.log_location("gone").file == tmp_path / "log" / "gone.log"


def test_log_lines_start_with_a_verb(sup, fake, caplog):
    caplog.set_level(logging.INFO, logger="aigis._supervise.embedded")
    sup.add(spec(restart=1, restart_delay=0, startsecs=0))
    fake.exit(100, 1)
    sup.poll()
    sup.poll()
    fake.exit(101, 1)
    sup.poll()
    sup.start("p")
    sup.stop("p")
    verbs = [record.getMessage().split(":")[0] for record in caplog.records]
    assert verbs == [
        "spawned",
        "exited",
        "backoff",
        "spawned",
        "exited",
        "gave up",
        "spawned",
        "stopping",
        "stopped",
    ]
    assert all(record.plugin == "p" for record in caplog.records)
