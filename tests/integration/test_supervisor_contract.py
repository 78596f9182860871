"""One contract, two backends: the embedded supervisor and the systemd one (in a systemd box).

Both must speak the same states with the same meaning. Processes of the systemd backend run in
the box's PID namespace, so pids are checked there (``Backend.alive``), never against the host's.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aigis._errors import PluginError
from aigis._supervise.base import ProcessSpec, State, Status, Supervisor
from aigis._supervise.embedded import EmbeddedSupervisor
from aigis._supervise.systemd import SystemdSupervisor
from tests.conftest import settings_for
from tests.systemd.box import SYSTEMD, Box, reap_stale_boxes

pytestmark = pytest.mark.integration

PY = sys.executable  # the checkout's venv: the same path inside the box
TEMPLATE = Path(__file__).parents[2] / "packaging" / "systemd" / "aigis-plugin@.service"
#: Fails (exit 1) on its first ``argv[2]`` runs, then stays up; one line per run in argv[1].
FLAKY = (
    "import sys, time\n"
    "with open(sys.argv[1], 'a+') as f:\n"
    "    f.write('run\\n'); f.seek(0); runs = len(f.readlines())\n"
    "if runs <= int(sys.argv[2]): sys.exit(1)\n"
    "time.sleep(600)\n"
)


@dataclass
class Backend:
    """A supervisor under test and how to see its processes."""

    sup: Supervisor
    alive: Callable[[int], bool]
    kill: Callable[[int, int], None]  # signal a process by the pid the supervisor reports


def _alive_in(proc: Path) -> Callable[[int], bool]:
    """Alive (not a zombie) according to the procfs at ``proc``."""

    def alive(pid: int) -> bool:
        try:
            return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    return alive


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """One systemd box for the module, with the plugin template installed."""
    reason = None
    if os.geteuid() != 0:
        reason = "the systemd backend needs root to boot a systemd box"
    elif not SYSTEMD.exists():
        reason = f"the systemd backend needs {SYSTEMD}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI must run it", pytrace=False)
        pytest.skip(reason)
    reap_stale_boxes()
    box = Box.boot(tmp_path_factory.mktemp("contract-box"))
    try:
        box.write("/etc/systemd/system/aigis-plugin@.service", TEMPLATE.read_text())
        box.systemctl("daemon-reload")
        yield box
    finally:
        box.shutdown()


@pytest.fixture(params=["embedded", pytest.param("systemd", marks=pytest.mark.systemd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        sup: Supervisor = EmbeddedSupervisor(
            settings_for(tmp_path, state_dir=tmp_path), console=None
        )
        backend = Backend(sup, _alive_in(Path("/proc")), os.kill)
    else:
        box: Box = request.getfixturevalue("box")
        sup = SystemdSupervisor(root=box.host_path("/"), bus=box.bus_address)
        backend = Backend(
            sup,
            _alive_in(box.host_path("/proc")),
            lambda pid, signum: box.run("kill", f"-{signum}", str(pid)) and None,
        )
    try:
        yield backend
    finally:
        for status in sup.status():
            sup.remove(status.name)
        sup.stop_all([])
        sup.close()


@pytest.fixture
def name() -> str:
    """A fresh plugin name per test: the systemd box is shared by the module."""
    return f"c-{secrets.token_hex(3)}"


def spec(name: str, cwd: Path, *argv: str, restart: int | None = None) -> ProcessSpec:
    return ProcessSpec(
        name, "external", argv, cwd, restart=restart, restart_delay=0.1, stop_timeout=2,
        startsecs=0.3,
    )  # fmt: skip


def wait_for(sup: Supervisor, name: str, done: Callable[[Status], bool], timeout=20.0) -> Status:
    """Drive poll() like the daemon's main loop until ``done(status)``; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        sup.poll()
        status = sup.status([name])[0]
        if done(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s: {status}")
        time.sleep(0.05)


def test_start_runs_with_a_pid(backend: Backend, name: str, tmp_path: Path) -> None:
    backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600"))
    status = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING)
    assert status.pid is not None and backend.alive(status.pid)
    assert status.restarts == 0 and status.kind == "external"


def test_clean_exit_is_exited_and_not_restarted(backend: Backend, name: str, tmp_path) -> None:
    runs = tmp_path / "runs"
    backend.sup.add(spec(name, tmp_path, "sh", "-c", f"echo run >> {runs}", restart=2))
    status = wait_for(backend.sup, name, lambda s: s.state is State.EXITED)
    assert status.last_exit == "exit 0" and status.restarts == 0 and status.pid is None
    time.sleep(0.5)  # longer than restart_delay: a restart would have happened by now
    backend.sup.poll()
    assert backend.sup.status([name])[0].state is State.EXITED
    assert runs.read_text() == "run\n"


def test_crasher_gives_up_after_its_restarts(backend: Backend, name: str, tmp_path) -> None:
    runs = tmp_path / "runs"
    backend.sup.add(spec(name, tmp_path, "sh", "-c", f"echo run >> {runs}; exit 1", restart=2))
    status = wait_for(backend.sup, name, lambda s: s.state is State.FAILED)
    assert status.restarts == 2
    # the embedded backend may add "while starting" (it failed within startsecs)
    assert status.reason.startswith("gave up after 2 restarts (last: exit 1")
    assert status.last_exit == "exit 1"
    assert runs.read_text() == "run\n" * 3


def test_a_plugin_killed_from_outside_is_restarted(backend: Backend, name: str, tmp_path) -> None:
    # SIGTERM from someone else is a failure for AIGIS (systemd alone would call it clean).
    backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600", restart=2))
    first = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING).pid
    assert first is not None
    backend.kill(first, signal.SIGTERM)
    again = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING and s.pid != first)
    assert again.restarts == 1
    assert not backend.alive(first)


def test_no_restart_policy_fails_at_once(backend: Backend, name: str, tmp_path) -> None:
    backend.sup.add(spec(name, tmp_path, "sh", "-c", "exit 3"))
    status = wait_for(backend.sup, name, lambda s: s.state is State.FAILED)
    assert status.restarts == 0 and status.last_exit == "exit 3"
    assert "not restarted" in status.reason


def test_stop_stops_and_the_process_is_gone(backend: Backend, name: str, tmp_path) -> None:
    backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600", restart=3))
    pid = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING).pid
    assert pid is not None
    status = backend.sup.stop(name)
    assert status.state is State.STOPPED and status.pid is None
    assert "stopped by request" in status.reason
    assert not backend.alive(pid)
    time.sleep(0.5)  # nothing restarts it
    backend.sup.poll()
    assert backend.sup.status([name])[0].state is State.STOPPED
    started = backend.sup.start(name)
    assert started.state in (State.STARTING, State.RUNNING) and started.pid != pid


def test_restart_resets_the_restart_count(backend: Backend, name: str, tmp_path) -> None:
    runs = tmp_path / "runs"
    backend.sup.add(spec(name, tmp_path, PY, "-c", FLAKY, str(runs), "2", restart=3))
    status = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING and s.restarts == 2)
    status = backend.sup.restart(name)
    assert status.restarts == 0
    status = wait_for(backend.sup, name, lambda s: s.state is State.RUNNING)
    assert status.restarts == 0 and status.pid is not None and backend.alive(status.pid)


def test_remove_stops_and_forgets(backend: Backend, name: str, tmp_path) -> None:
    backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600"))
    pid = wait_for(backend.sup, name, lambda s: s.pid is not None).pid
    assert pid is not None
    backend.sup.remove(name)
    assert not backend.alive(pid)
    assert name not in [s.name for s in backend.sup.status()]
    with pytest.raises(PluginError, match=f'plugin "{name}": not supervised'):
        backend.sup.stop(name)


def test_unknown_and_duplicate_names_are_plugin_errors(backend: Backend, name, tmp_path) -> None:
    with pytest.raises(PluginError, match=f'plugin "{name}"'):
        backend.sup.status([name])
    backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600"))
    with pytest.raises(PluginError, match=f'plugin "{name}": already supervised'):
        backend.sup.add(spec(name, tmp_path, "/bin/sleep", "600"))


def test_stop_all_stops_every_step_and_nothing_restarts(backend: Backend, name: str, tmp_path):
    names = [f"{name}-{index}" for index in range(3)]
    for each in names:
        backend.sup.add(spec(each, tmp_path, "/bin/sleep", "600", restart=3))
    pids = [wait_for(backend.sup, each, lambda s: s.state is State.RUNNING).pid for each in names]
    assert all(pid is not None and backend.alive(pid) for pid in pids)
    backend.sup.stop_all([names[1:], names[:1]])
    assert [pid for pid in pids if pid is not None and backend.alive(pid)] == []
    time.sleep(0.5)  # longer than restart_delay: a restart would have happened by now
    backend.sup.poll()
    assert {s.state for s in backend.sup.status(names)} == {State.STOPPED}
