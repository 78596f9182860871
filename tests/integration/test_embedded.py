"""The embedded supervisor with real processes: the fault fixtures under tests/fixtures/faults."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aigis._supervise import procs
from aigis._supervise.base import ProcessSpec, State, Status
from aigis._supervise.embedded import EmbeddedSupervisor
from tests.conftest import settings_for

pytestmark = pytest.mark.integration

FAULTS = Path(__file__).resolve().parent.parent / "fixtures" / "faults"
LINE = b"line %07d the quick brown fox jumps over the lazy dog\n"  # as flood.py writes them


def wait_for(sup: EmbeddedSupervisor, what: str, done: Callable[[], bool], timeout=15.0) -> None:
    """Drive poll() like the daemon's main loop until ``done()``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}: {sup.status()}")
        sup.poll()
        time.sleep(0.01)


def kill_tagged(names: set[str]) -> dict[int, procs.Tagged]:
    """SIGKILL every process (and its group) tagged with one of ``names``; return them."""
    found = procs.tagged_processes(lambda tag: tag.split(":")[0] in names)
    for pid, tagged in found.items():
        for kill, target in ((os.killpg, tagged.pgid), (os.kill, pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, signal.SIGKILL)
    return found


@pytest.fixture
def uid() -> str:
    """Makes plugin names unique to this test, so /proc scans see only its processes."""
    return secrets.token_hex(3)


@pytest.fixture
def make_sup(tmp_path):
    """``make_sup(**kw)``: a supervisor logging under tmp_path; all are stopped at teardown."""
    made: list[EmbeddedSupervisor] = []

    def make(**kw) -> EmbeddedSupervisor:
        kw.setdefault("console", None)
        settings = {k: kw.pop(k) for k in ("log_max_bytes", "log_backups") if k in kw}
        made.append(
            EmbeddedSupervisor(settings_for(tmp_path, state_dir=tmp_path, **settings), **kw)
        )
        return made[-1]

    yield make
    names: set[str] = set()
    for supervisor in made:
        statuses = supervisor.status()
        names.update(status.name for status in statuses)
        supervisor.stop_all([[status.name for status in reversed(statuses)]])
        supervisor.close()
    survivors = kill_tagged(names)  # the safety net: never leak processes into other tests
    for supervisor in made:
        supervisor.poll()  # reap what the safety net killed
    procs.set_child_subreaper(False)  # be a good neighbour to the rest of the test session
    assert not survivors, f"processes survived stop_all: {survivors}"


@pytest.fixture
def sup(make_sup):
    return make_sup()


def fault(name: str, script: str, *args: object, **kw) -> ProcessSpec:
    """A spec running ``tests/fixtures/faults/<script>`` with the test's interpreter."""
    argv = (sys.executable, str(FAULTS / script), *map(str, args))
    return ProcessSpec(name, "external", argv, FAULTS, {"PYTHONUNBUFFERED": "1"}, **kw)


def state(sup: EmbeddedSupervisor, name: str) -> State:
    return sup.status([name])[0].state


def pid_gone(pid: int) -> bool:
    """No process (not even a zombie) with ``pid``."""
    return not Path(f"/proc/{pid}").exists()


# -- exits and restarts -------------------------------------------------------------------------
def test_crasher_with_restart_2_runs_3_times_then_gives_up(sup, tmp_path, uid):
    runs = tmp_path / "runs"
    name = f"crash-{uid}"
    sup.add(fault(name, "crasher.py", runs, restart=2, restart_delay=0.05))
    wait_for(sup, "FAILED", lambda: state(sup, name) is State.FAILED)
    status = sup.status([name])[0]
    assert "gave up" in status.reason
    assert (status.last_exit, status.restarts, status.pid) == ("exit 1", 2, None)
    deadline = time.monotonic() + 0.5  # and nothing more happens afterwards
    while time.monotonic() < deadline:
        sup.poll()
        time.sleep(0.02)
    assert len(runs.read_text().splitlines()) == 3
    assert sup.log_path(name).read_bytes().count(b"crasher: crashing\n") == 3


def test_clean_exit_is_exited_and_never_restarted(sup, tmp_path, uid):
    runs = tmp_path / "runs"
    name = f"clean-{uid}"
    sup.add(fault(name, "clean_exit.py", runs, restart=5, restart_delay=0.01))
    wait_for(sup, "EXITED", lambda: state(sup, name) is State.EXITED)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        sup.poll()
        time.sleep(0.02)
    status = sup.status([name])[0]
    assert (status.state, status.last_exit, status.restarts) == (State.EXITED, "exit 0", 0)
    assert runs.read_text() == "ran\n"


def test_backoff_delays_grow(sup, tmp_path, uid, caplog):
    caplog.set_level(logging.INFO, logger="aigis._supervise.embedded")
    runs = tmp_path / "runs"
    name = f"backoff-{uid}"
    sup.add(fault(name, "crasher.py", runs, restart=3, restart_delay=0.2, startsecs=0))
    wait_for(sup, "FAILED", lambda: state(sup, name) is State.FAILED)
    assert len(runs.read_text().split()) == 4
    # What the core decided (not how fast this machine was): the delays it scheduled ...
    events = [(r.getMessage(), r.created) for r in caplog.records]
    scheduled = [
        float(message.rsplit(" in ", 1)[1].rstrip("s"))
        for message, _ in events
        if message.startswith(f'backoff: "{name}"')
    ]
    assert scheduled == [0.2, 0.4, 0.8]
    # ... and that no restart came before its delay (a lower bound holds on any machine).
    exits = [at for message, at in events if message.startswith(f'exited: "{name}"')]
    spawns = [at for message, at in events if message.startswith(f'spawned: "{name}"')]
    assert len(exits) == 4 and len(spawns) == 4
    waited = [spawn - exit_ for exit_, spawn in zip(exits, spawns[1:])]
    assert all(got >= delay - 0.01 for got, delay in zip(waited, scheduled)), waited


def test_exit_before_startsecs_counts_as_a_failure(sup, uid):
    name = f"instant-{uid}"
    sup.add(fault(name, "instant_exit.py", 3, restart=1, restart_delay=0.01, startsecs=5))
    wait_for(sup, "FAILED", lambda: state(sup, name) is State.FAILED)
    status = sup.status([name])[0]
    assert status.reason == "gave up after 1 restart (last: exit 3 while starting)"


def test_slow_starter_is_starting_until_startsecs(sup, uid):
    name = f"slow-{uid}"
    sup.add(fault(name, "slow_start.py", 0.1, startsecs=0.5))
    spawned = time.monotonic()
    assert state(sup, name) is State.STARTING
    wait_for(sup, "RUNNING", lambda: state(sup, name) is State.RUNNING)
    assert time.monotonic() - spawned >= 0.5


# -- stopping -----------------------------------------------------------------------------------
def test_sigterm_ignorer_is_killed_after_its_stop_timeout(sup, tmp_path, uid):
    ready = tmp_path / "ready"
    name = f"stubborn-{uid}"
    sup.add(fault(name, "ignore_term.py", ready, stop_timeout=0.5))
    wait_for(sup, "SIGTERM ignored", ready.exists)
    pid = sup.status([name])[0].pid
    started = time.monotonic()
    status = sup.stop(name)
    assert time.monotonic() - started >= 0.5  # it waited stop_timeout before SIGKILL
    assert status.state is State.STOPPED
    assert "SIGKILL" in status.last_exit and "SIGKILL" in status.reason
    assert pid_gone(pid)


def test_status_answers_while_another_thread_waits_for_a_stop(sup, tmp_path, uid):
    ready = tmp_path / "ready"
    name = f"stubborn-{uid}"
    sup.add(fault(name, "ignore_term.py", ready, stop_timeout=3.0))
    wait_for(sup, "SIGTERM ignored", ready.exists)
    stopped: list[Status] = []
    stopper = threading.Thread(target=lambda: stopped.append(sup.stop(name)))  # an RPC thread
    stopper.start()
    answered_while_stopping, deadline = 0, time.monotonic() + 30
    while stopper.is_alive() and time.monotonic() < deadline:
        seen = sup.status([name])[0].state
        # Answered (not blocked until the stop ended) while the stopper still waits: the lock
        # is never held while stop() waits for the process.
        if seen is State.STOPPING and stopper.is_alive():
            answered_while_stopping += 1
        time.sleep(0.01)
    stopper.join(1)
    assert answered_while_stopping >= 2
    assert [status.state for status in stopped] == [State.STOPPED]


def test_double_forked_grandchild_is_stopped_too(sup, tmp_path, uid):
    pidfile = tmp_path / "grandchild.pid"
    name = f"forker-{uid}"
    sup.add(fault(name, "double_fork.py", pidfile))
    wait_for(sup, "the grandchild's pid file", pidfile.exists)
    grandchild, main = int(pidfile.read_text()), sup.status([name])[0].pid
    assert procs.read_stat(grandchild).pgid != main  # it really escaped the process group
    assert procs.read_tag(grandchild).startswith(f"{name}:")
    status = sup.stop(name)
    assert status.state is State.STOPPED
    wait_for(sup, "the grandchild to be reaped", lambda: pid_gone(grandchild), timeout=5)


def test_stop_all_stops_in_the_given_order(sup, tmp_path, uid):
    record = tmp_path / "stops"
    names = [f"{label}-{uid}" for label in ("a", "b", "c")]
    for name in names:
        sup.add(fault(name, "term_recorder.py", record, name))
    wait_for(
        sup,
        "SIGTERM handlers",
        lambda: all(Path(f"{record}.{name}.ready").exists() for name in names),
    )
    order = [names[2], names[0], names[1]]
    sup.stop_all([[name] for name in order])
    assert [line.split()[0] for line in record.read_text().splitlines()] == order
    assert {status.state for status in sup.status()} == {State.STOPPED}


def test_nothing_of_the_plugins_survives_stop_all(sup, tmp_path, uid):
    pidfile = tmp_path / "grandchild.pid"
    ready = tmp_path / "ready"
    names = {f"forker-{uid}", f"stubborn-{uid}", f"crash-{uid}"}
    sup.add(fault(f"forker-{uid}", "double_fork.py", pidfile))
    sup.add(fault(f"stubborn-{uid}", "ignore_term.py", ready, stop_timeout=0.3))
    sup.add(fault(f"crash-{uid}", "crasher.py", tmp_path / "runs", restart=100, restart_delay=0))
    wait_for(sup, "fixtures ready", lambda: pidfile.exists() and ready.exists())
    assert procs.tagged_processes(lambda tag: tag.split(":")[0] in names)
    sup.stop_all([sorted(names)])
    assert procs.tagged_processes(lambda tag: tag.split(":")[0] in names) == {}
    wait_for(sup, "the grandchild to be reaped", lambda: pid_gone(int(pidfile.read_text())))


# -- output -------------------------------------------------------------------------------------
def test_flood_of_200000_lines_all_logged_while_status_stays_fast(make_sup, tmp_path, uid):
    lines = 200_000
    console = (tmp_path / "console").open("wb")
    sup = make_sup(console=console.write, log_max_bytes=2**26)
    name = f"flood-{uid}"
    sup.add(fault(name, "flood.py", lines))
    log = sup.log_path(name)
    expected = len(LINE % 0) * lines
    slowest, calls, deadline = 0.0, 0, time.monotonic() + 60
    while log.stat().st_size < expected:
        assert time.monotonic() < deadline, f"only {log.stat().st_size} of {expected} bytes"
        sup.poll()
        started = time.perf_counter()
        sup.status()
        slowest, calls = max(slowest, time.perf_counter() - started), calls + 1
        time.sleep(0.005)
    assert calls > 0 and slowest < 1.0  # a responsiveness bound, not a benchmark
    wait_for(sup, "EXITED", lambda: state(sup, name) is State.EXITED)
    sup.stop_all([[name]])  # drains the reader
    console.close()
    assert log.read_bytes() == b"".join(LINE % number for number in range(lines))
    prefixed = (tmp_path / "console").read_bytes().splitlines(keepends=True)
    assert len(prefixed) == lines
    assert prefixed[-1] == f"{name} | ".encode() + LINE % (lines - 1)


def test_rotation_keeps_every_line_below_the_limit(make_sup, uid):
    lines, max_bytes = 20_000, 200_000  # about 1.1 MB into 1 + 10 files of 200 kB
    sup = make_sup(log_max_bytes=max_bytes, log_backups=10)
    name = f"rotate-{uid}"
    sup.add(fault(name, "flood.py", lines))
    wait_for(sup, "EXITED", lambda: state(sup, name) is State.EXITED)
    sup.stop_all([[name]])  # drains the reader and closes the file
    log = sup.log_path(name)
    backups = sorted(log.parent.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(backups) >= 5
    files = [*backups, log]  # oldest first
    assert all(path.stat().st_size <= max_bytes for path in files)
    assert b"".join(path.read_bytes() for path in files) == b"".join(
        LINE % number for number in range(lines)
    )


def test_non_utf8_output_lands_byte_for_byte(make_sup, uid):
    console: list[bytes] = []
    sup = make_sup(console=console.append)
    name = f"bytes-{uid}"
    sup.add(fault(name, "non_utf8.py"))
    wait_for(sup, "EXITED", lambda: state(sup, name) is State.EXITED)
    sup.stop_all([[name]])  # drains the reader
    out, err = b"out: caf\xe9 \xff\xfe\x80 end\n", b"err: \xc3\x28 \xa0\xa1\n"
    tail = b"tail \xff without newline"
    assert sup.log_path(name).read_bytes() == out + err + tail
    prefix = f"{name} | ".encode()
    assert b"".join(console) == prefix + out + prefix + err + prefix + tail + b"\n"


# -- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def small_log_dir(tmp_path):
    """A 5 MiB tmpfs as the log directory (``<tmp_path>/log``), unmounted at teardown."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a small tmpfs needs root, and CI must run it", pytrace=False)
        pytest.skip("mounting a small tmpfs needs root")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(log_dir)], check=True)
    try:
        yield log_dir
    finally:
        subprocess.run(["umount", "-l", str(log_dir)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` up to ``leave`` bytes free; return the filler."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, free - leave))
    return filler


def records(caplog, verb: str, name: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith(f'{verb}: "{name}"')
    ]


def test_a_full_disk_drops_log_output_but_never_kills_the_plugin(
    make_sup, small_log_dir, tmp_path, uid, caplog
):
    """A reader that died on ENOSPC closed the pipe: the plugin died of EPIPE, over and over."""
    caplog.set_level(logging.INFO)
    sup = make_sup()
    filler = fill(small_log_dir, leave=64 * 1024)
    flooded, go = tmp_path / "flooded", tmp_path / "go"
    name = f"filler-{uid}"
    lines = 100_000  # 5.5 MB: far more than fits
    sup.add(fault(name, "log_filler.py", lines, flooded, go, restart=3, restart_delay=0))
    wait_for(sup, "the flood to be written", flooded.exists, timeout=60)
    status = sup.status([name])[0]
    assert status.state in (State.STARTING, State.RUNNING) and status.restarts == 0, status
    assert len(records(caplog, "dropped", name)) == 1  # once per episode, not once per write
    filler.unlink()  # space returns
    go.touch()
    wait_for(sup, "EXITED", lambda: state(sup, name) is State.EXITED, timeout=60)
    status = sup.status([name])[0]
    assert (status.restarts, status.last_exit) == (0, "exit 0")
    assert sup.log_path(name).read_bytes().endswith(b"the last line\n")  # writing resumed
    assert len(records(caplog, "resumed", name)) == 1
    assert len(records(caplog, "dropped", name)) == 1
    counts = sup.output_counts()[name]  # what the metrics show
    assert counts.lines == lines + 1  # every line the plugin printed, dropped or not
    assert 0 < counts.dropped_bytes < lines * len(LINE % 0)


def test_stop_all_and_close_on_a_full_disk_raise_nothing_and_leave_nothing(
    make_sup, small_log_dir, tmp_path, uid, caplog
):
    """The log file's close raised ENOSPC out of the backend: the shutdown stopped half-way."""
    sup = make_sup()
    fill(small_log_dir, leave=64 * 1024)
    names = [f"full-{i}-{uid}" for i in range(3)]
    for index, name in enumerate(names):
        flooded = tmp_path / f"flooded.{index}"
        sup.add(fault(name, "log_filler.py", 20_000, flooded, "forever", restart=3))
    wait_for(
        sup,
        "the floods to be written",
        lambda: all((tmp_path / f"flooded.{i}").exists() for i in range(3)),
        timeout=60,
    )
    assert [s.restarts for s in sup.status()] == [0, 0, 0]
    sup.stop_all([names])
    sup.close()  # nothing escapes: no OSError, no traceback
    assert {s.state for s in sup.status()} == {State.STOPPED}
    assert procs.tagged_processes(lambda tag: tag.split(":")[0] in set(names)) == {}


def test_without_pidfds_exits_are_still_noticed(make_sup, tmp_path, uid, monkeypatch):
    """Kernels before 5.3 have no pidfd_open: exits are polled on the event loop instead."""
    monkeypatch.setattr(procs, "_pidfds_work", lambda: False)
    sup = make_sup()
    runs = tmp_path / "runs"
    name = f"nopidfd-{uid}"
    sup.add(fault(name, "crasher.py", runs, restart=2, restart_delay=0.01))
    sup.add(fault(f"sleeper-{uid}", "slow_start.py", 0.01, startsecs=0))
    wait_for(sup, "FAILED", lambda: state(sup, name) is State.FAILED)
    status = sup.status([name])[0]
    assert (status.restarts, status.last_exit) == (2, "exit 1")
    assert len(runs.read_text().splitlines()) == 3
