"""A remote host's supervisor when the host cannot be reached: what status says, when it retries."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from aigis._config import parse_config
from aigis._remote.hosts import HostError, HostSpec
from aigis._remote.ssh import SshSettings
from aigis._remote.supervisor import BACKOFF_MAX, RemoteSupervisor
from aigis._states import Kind, State
from aigis._supervise.base import ProcessSpec, Shipment

WEB1 = HostSpec("web1", "fd00::2", "root")
DOWN = HostError("web1", "unreachable", "unreachable: connect to host fd00::2 port 22: timed out")

SHOW = b"""\
Id=aigis-plugin@a.service
LoadState=loaded
ActiveState=active
SubState=running
Type=exec
Restart=no
MainPID=77
ExecMainStartTimestamp=@1700000000
StateChangeTimestamp=@1700000000
"""


class FakeMaster:
    """Stands in for the ssh master: ``down`` makes every ssh call fail like a lost link."""

    def __init__(self, tmp_path: Path) -> None:
        self.spec = WEB1
        self.settings = SshSettings(runtime_dir=tmp_path, connect_timeout=1)
        self.wrap: list[str] = []
        self.down = True
        self.runs: list[list[str]] = []

    def open(self) -> None:
        if self.down:
            raise DOWN

    def check(self) -> object:
        return object()

    def master_pid(self) -> int | None:
        return None if self.down else 1

    def forward(self, remote_socket: str, label: str) -> Path:
        return self.settings.runtime_dir / "no-bus-here"  # connecting fails: systemctl then

    def run(self, argv, input=None, timeout=60):
        self.runs.append(list(argv))
        if self.down:
            raise DOWN
        return subprocess.CompletedProcess(argv, 0, SHOW, b"")

    def close(self) -> None:
        pass


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def host(tmp_path: Path):
    settings = parse_config(f'[aigis]\nstate_dir = "{tmp_path}"\n', tmp_path / "a.toml").settings
    master = FakeMaster(tmp_path)
    supervisor = RemoteSupervisor(WEB1, settings, master=master)  # type: ignore[arg-type]
    yield supervisor, master
    supervisor.close()


def spec(name: str) -> ProcessSpec:
    return ProcessSpec(
        name, Kind.EXTERNAL, ("/bin/true",), Path("/"), host=WEB1,
        shipment=Shipment(Path("/nonexistent"), f"/var/lib/aigis/ext/{name}"),
    )  # fmt: skip


def test_an_unreachable_host_fails_its_new_plugins_with_the_reason_and_a_retry(host) -> None:
    supervisor, _ = host
    supervisor.add(spec("a"))
    status = wait_for(lambda: (s := supervisor.status(["a"])[0]).state is State.FAILED and s)
    assert status.reason.startswith(
        'host "web1": unreachable: connect to host fd00::2 port 22: timed out; retrying in '
    )


def test_retries_back_off_doubling_up_to_a_minute(host) -> None:
    supervisor, _ = host
    delays = []
    for _ in range(9):
        before = time.monotonic()
        supervisor._host_down(DOWN)
        delays.append(round(supervisor._retry_at - before))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert BACKOFF_MAX == 60
    supervisor._host_up()
    assert supervisor._backoff == 1 and supervisor._down_since is None


def test_running_units_of_a_lost_host_are_unknown_with_since_when(host) -> None:
    supervisor, master = host
    master.down = False
    supervisor.add(spec("a"))
    plugin = supervisor._plugins["a"]
    with supervisor._lock:
        plugin.queued, plugin.started = False, True  # as after a start that went through
    assert supervisor.status(["a"])[0].state is State.RUNNING
    assert supervisor.status(["a"])[0].pid == 77
    master.down = True
    status = supervisor.status(["a"])[0]
    assert status.state is State.UNKNOWN and status.pid is None
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(supervisor._down_since))
    assert status.reason.startswith(f'host "web1" unreachable since {since}')
    asked = len(master.runs)
    assert supervisor.status(["a"])[0].state is State.UNKNOWN
    assert len(master.runs) == asked  # no ssh attempt until the retry is due: status stays fast
    master.down = False
    supervisor._retry_at = 0.0
    assert supervisor.status(["a"])[0].state is State.RUNNING  # the host answers again
