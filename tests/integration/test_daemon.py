"""The daemon as a subprocess: log lines, cleanup order, exit 0 on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess

pytestmark = pytest.mark.integration

CORE_CFG = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'


def cleanup_core(order_file: Path, name: str) -> str:
    """An AIGIS.core exporting ping_<name> whose cleanup appends <name> to ``order_file``."""
    return (
        f"def ping_{name}():\n    return {name!r}\n"
        f"def cleanup():\n    with open({str(order_file)!r}, 'a') as f:\n"
        f"        f.write({name!r} + '\\n')\n"
        f"SKILLS = ['ping_{name}']\n"
    )


def test_loads_logs_and_cleans_up_in_reverse_order_on_sigterm(tmp_path, make_plugin, daemons):
    order = tmp_path / "order"
    for name in ("first", "second", "third"):
        make_plugin(name, CORE_CFG, core=cleanup_core(order, name))
    make_plugin("broken", CORE_CFG, core="SKILLS = ['missing']\n")
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "state/run"\nsupervisor = "embedded"\n'
        'plugin_user = "root"\n[core]\n'
        'first = "src/first"\nbroken = "src/broken"\nsecond = "src/second"\n'
        'third = "src/third"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    log = daemon.wait_for("ready:")
    assert 'loaded: plugin "first" (core): 1 skills: ping_first' in log
    assert 'failed: plugin "broken": SKILLS entry "missing":' in log
    assert "ready: 1 failed, 3 loaded" in log
    assert daemon.signal(signal.SIGTERM) == 0
    assert order.read_text().split() == ["third", "second", "first"]
    assert "stopped: AIGIS" in daemon.log
    assert "Traceback" not in daemon.log


def test_no_plugins_idles_until_sigint(tmp_path, daemons):
    config = tmp_path / "aigis.toml"
    config.write_text('[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n')
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    assert "ready: no plugins configured" in daemon.wait_for("ready:")
    assert daemon.proc.poll() is None
    assert daemon.signal(signal.SIGINT) == 0


def test_bad_config_never_starts_and_exits_1_without_traceback(tmp_path):
    config = tmp_path / "aigis.toml"
    config.write_text('[core]\n"bad name" = "x"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "aigis", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert f'aigis: {config}:2: [core] invalid plugin name "bad name"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_during_a_slow_requirements_install_stops_at_once(tmp_path, make_plugin, daemons):
    pidfile = tmp_path / "installer.pid"
    make_plugin(
        "slow",
        CORE_CFG + f'REQUIREMENTS_COMMAND = "echo $$ > {pidfile}; exec sleep 600"\n',
        core="SKILLS = []\n",
    )
    make_plugin("never", CORE_CFG, core="SKILLS = []\n")
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "state/run"\n[core]\n'
        'slow = "src/slow"\nnever = "src/never"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("installing: requirements")
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "the requirements command did not start"
        time.sleep(0.05)
    installer = int(pidfile.read_text())
    started = time.monotonic()
    assert daemon.signal(signal.SIGTERM, timeout=20) == 0
    assert time.monotonic() - started < 10  # not the 900 s requirements timeout
    log = daemon.log
    assert 'failed: plugin "slow": requirements command stopped: AIGIS is stopping' in log
    assert 'plugin "never"' not in log  # nothing more is loaded once stopping
    assert not Path(f"/proc/{installer}").exists()


def test_a_second_core_refuses_to_start_and_leaves_the_first_alone(tmp_path, daemons):
    config = tmp_path / "aigis.toml"
    config.write_text('[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n')
    first = DaemonProcess(config)
    daemons.append(first)
    first.wait_for("ready:")
    second = subprocess.run(
        [sys.executable, "-m", "aigis", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"aigis: another AIGIS core is running with state directory {tmp_path / 'state'} "
        f"(pid {first.proc.pid})"
    )
    assert first.proc.poll() is None
    assert (tmp_path / "run" / "control.sock").exists()


def test_a_socket_bound_but_not_yet_listening_is_not_taken_for_stale(tmp_path):
    """A first core between bind() and listen() holds the lock: a second core must not remove
    its socket and serve its own (both would then run the plugins)."""
    import fcntl
    import socket

    config = tmp_path / "aigis.toml"
    config.write_text('[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n')
    (tmp_path / "state").mkdir()
    (tmp_path / "run").mkdir()
    with open(tmp_path / "state" / "aigis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        starting = socket.socket(socket.AF_UNIX)
        starting.bind(str(tmp_path / "run" / "control.sock"))  # bound, not listening yet
        inode = (tmp_path / "run" / "control.sock").stat().st_ino
        try:
            second = subprocess.run(
                [sys.executable, "-m", "aigis", "-c", str(config)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            starting.close()
    assert second.returncode == 1, second.stderr
    assert "another AIGIS core is running" in second.stderr
    assert (tmp_path / "run" / "control.sock").stat().st_ino == inode


@pytest.mark.parametrize(
    "stuck",
    ["import threading\nthreading.Event().wait()\n", "import time\ntime.sleep(10**6)\n"],
    ids=["event-wait", "sleep"],
)
def test_sigterm_during_a_stuck_load_abandons_it_and_stops_cleanly(
    tmp_path, make_plugin, daemons, stuck
):
    order = tmp_path / "order"
    make_plugin("first", CORE_CFG, core=cleanup_core(order, "first"))
    make_plugin("stuck", CORE_CFG, core=stuck + "SKILLS = []\n")
    make_plugin("never", CORE_CFG, core=cleanup_core(order, "never"))
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\n[core]\n'
        'first = "src/first"\nstuck = "src/stuck"\nnever = "src/never"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for('loaded: plugin "first"')
    ctl = [sys.executable, "-m", "aigis._ctl", "-c", str(config), "status", "stuck"]
    deadline = time.monotonic() + 30
    while (
        "loading (2/3): importing" not in subprocess.run(ctl, capture_output=True, text=True).stdout
    ):
        assert time.monotonic() < deadline, "status never said the stuck plugin was loading"
        time.sleep(0.05)
    assert daemon.signal(signal.SIGTERM, timeout=60) == 0
    log = daemon.log
    assert 'abandoned: plugin "stuck" still loading 5s after the stop request' in log
    assert order.read_text().split() == ["first"]  # loaded ones are cleaned up, once
    assert 'loaded: plugin "never"' not in log
    assert "stopped: AIGIS" in log and "Traceback" not in log


def test_a_load_past_load_timeout_fails_that_plugin_and_the_others_load(
    tmp_path, make_plugin, daemons
):
    make_plugin("stuck", CORE_CFG, core="import time\ntime.sleep(10**6)\nSKILLS = []\n")
    make_plugin("fine", CORE_CFG, core="def ok():\n    return 1\nSKILLS = ['ok']\n")
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nload_timeout = 1\n[core]\n'
        'stuck = "src/stuck"\nfine = "src/fine"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    log = daemon.wait_for("ready:", timeout=60)
    assert 'failed: plugin "stuck": load timed out after 1 s while importing AIGIS.core' in log
    assert 'loaded: plugin "fine"' in log and "ready: 1 failed, 1 loaded" in log
    assert daemon.signal(signal.SIGTERM) == 0
    assert "Traceback" not in daemon.log
