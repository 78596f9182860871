"""The operators' channel against a real daemon: plain JSON only, bounded for hostile peers, and
``aigisctl`` tells "not running" from "not answering"."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from aigis import _ctlwire as wire
from tests.integration.daemon import DaemonProcess
from tests.integration.test_supervision import ctl, status, wait_until

pytestmark = pytest.mark.integration

CORE = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'


@pytest.fixture
def core(tmp_path, make_plugin, daemons):
    """A running core with one core plugin (``roll``); returns the config path."""
    make_plugin("dice", CORE, core="def roll(n):\n    return n + 1\nSKILLS = ['roll']\n")
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
        'plugin_user = "root"\n'
        '[core]\ndice = "src/dice"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("ready:")
    return config, daemon


class Evil:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_on_the_control_socket_is_never_unpickled(core, tmp_path):
    config, daemon = core
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Evil(marker))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(tmp_path / "run" / "control.sock"))
        header = sock.recv(4)
        sock.recv(struct.unpack("!I", header)[0])  # the greeting
        sock.sendall(struct.pack("!I", len(payload)) + payload)
        assert sock.recv(100) == b""  # closed without an answer
    # a pickle framed the way the proxy frames it (4-byte signed length, tag byte)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(tmp_path / "run" / "control.sock"))
        sock.recv(65536)
        sock.sendall(struct.pack("!i", len(payload) + 1) + b"P" + payload)
        assert sock.recv(100) == b""
    assert not marker.exists()
    assert ctl(config, "call", "roll", "41").stdout.strip() == "42"  # still serving
    assert "Traceback" not in daemon.log


def test_a_wrong_control_key_is_refused_in_one_line(core, tmp_path):
    config, _ = core
    key = tmp_path / "state" / wire.CONTROL_KEY_NAME
    key.write_bytes(b"x" * 32)  # aigisctl now holds the wrong key
    proc = ctl(config, "status")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "aigisctl: the control key does not match"


def test_a_stopped_core_is_reported_as_not_answering_not_as_not_running(core):
    config, daemon = core
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "aigis._ctl", "-c", str(config), "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AIGISCTL_TIMEOUT": "1"},
        )
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert proc.returncode == 4, proc.stderr
    assert "does not answer" in proc.stderr and "within 1 s" in proc.stderr
    assert ctl(config, "status").returncode == 0


def test_not_running_is_exit_3(tmp_path):
    config = tmp_path / "aigis.toml"
    config.write_text('[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n')
    proc = ctl(config, "status")
    assert proc.returncode == 3
    assert proc.stderr.startswith("aigisctl: the AIGIS core is not running")


def test_the_operator_path_imports_no_pickle_machinery(core):
    config, _ = core
    probe = (
        "import sys, io, contextlib, aigis._ctl as c\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = c.main(['-c', {str(config)!r}, 'status', '--json'])\n"
        "heavy = sorted(m for m in ('dill', 'multiprocess', 'pickle', 'aigis._rpc.wire') "
        "if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "0 []", out.stderr


def test_idle_connections_that_never_authenticate_do_not_lock_operators_out(core, tmp_path):
    config, daemon = core
    idle = []
    try:
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(tmp_path / "run" / "control.sock"))
            idle.append(sock)
        proc = ctl(config, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[0]["name"] == "dice"
    finally:
        for sock in idle:
            sock.close()
    refusals = [line for line in daemon.log.splitlines() if "refused: control connection" in line]
    assert 1 <= len(refusals) <= 3  # rate-limited: not one line per connection


def test_status_during_start_up_says_what_is_loading(tmp_path, make_plugin, daemons):
    gate = tmp_path / "gate"
    slow = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
    make_plugin("slow", CORE, core=slow + "def f():\n    return 1\nSKILLS = ['f']\n")
    make_plugin("later", CORE, core="def g():\n    return 2\nSKILLS = ['g']\n")
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n'
        '[core]\nslow = "src/slow"\nlater = "src/later"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    try:
        rows = wait_until(
            lambda: (r := _rows_if_up(config)) and "importing" in r[0]["reason"] and r,
            what="the slow plugin's import, as status says",
        )
        assert [(r["name"], r["state"]) for r in rows] == [
            ("slow", "starting"),
            ("later", "starting"),
        ]
        assert re.fullmatch(r"loading \(1/2\): importing AIGIS\.core \(\d+ s\)", rows[0]["reason"])
        assert rows[1]["reason"] == "waiting"
    finally:
        gate.touch()
    daemon.wait_for("ready:")
    assert {r["state"] for r in status(config).values()} == {"loaded"}


def _rows_if_up(config: Path) -> list[dict] | None:
    proc = ctl(config, "status", "--json")
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_call_prints_the_repr_made_in_the_core(core):
    config, _ = core
    assert ctl(config, "call", "roll", "(1,)").returncode == 1  # TypeError: tuple + int
    out = ctl(config, "call", "roll", "1")
    assert (out.returncode, out.stdout) == (0, "2\n")
    private = ctl(config, "call", "roll._secret")
    assert private.returncode == 1 and "never forwarded" in private.stderr


def test_requests_over_the_size_limit_are_dropped(core, tmp_path):
    config, daemon = core
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(tmp_path / "run" / "control.sock"))
        sock.recv(65536)
        sock.sendall(struct.pack("!I", wire.MAX_REQUEST + 1))
        assert sock.recv(100) == b""
    assert ctl(config, "status").returncode == 0


def test_a_token_in_a_git_url_is_shown_nowhere(tmp_path, daemons):
    token = "s3cr3tT0KEN"
    with socket.socket() as closed:  # a port nobody listens on: the clone fails at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
        'plugin_user = "root"\n'
        f'[external]\nfetched = "https://deploy:{token}@127.0.0.1:{port}/x.git?private_token={token}"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("ready:")
    shown = ctl(config, "status", "--json").stdout + ctl(config, "status").stdout
    checked = ctl(config, "check")
    reloaded = ctl(config, "start", "fetched")
    assert "deploy:***@127.0.0.1" in shown
    for text in (daemon.log, shown, checked.stdout + checked.stderr, reloaded.stderr):
        assert token not in text
    assert 'failed: plugin "fetched"' in daemon.log


def test_reload_says_what_it_is_doing_while_it_waits(core, tmp_path, make_plugin):
    config, _ = core
    slow = CORE + 'REQUIREMENTS_COMMAND = "sleep 4 #"\n'
    make_plugin("slow", slow, core="SKILLS = []\n")
    config.write_text(config.read_text() + 'slow = "src/slow"\n')
    proc = ctl(config, "reload", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reloaded: 1 added (slow), 1 unchanged"
    assert re.search(r'reloading: plugin "slow": running requirements \(\d+ s\)', proc.stderr)
