"""Internal plugins through the real daemon: the proxy, AIGISTerminal, aigisctl, reconnect."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon import DaemonProcess

pytestmark = pytest.mark.integration

PY = sys.executable
TESTS = Path(__file__).parents[1]

CORE_MANIFEST = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'
CORE = """
    import coreonly_things as things

    def add(a, b, scale=1, logger=None):
        logger.info("adding %s and %s", a, b)
        return (a + b) * scale

    def make_adder(n):
        return lambda x: x + n

    def make_thing(value):
        return things.Thing(value)

    def fail_value():
        raise ValueError("plain value error")

    def fail_custom(code):
        raise things.CustomFailure(f"custom failure {code}")

    SKILLS = ["add", "make_adder", "make_thing", "fail_value", "fail_custom", "things.LIMIT"]
    """
THINGS = """
    LIMIT = 42

    class Thing:
        def __init__(self, value):
            self.value = value

        def double(self):
            return self.value * 2

    class CustomFailure(ValueError):
        pass
    """
LAUNCH = """
    import importlib.util
    import json
    import os

    import aigis


    def describe(exc):
        return {"type": type(exc).__name__, "is_remote": isinstance(exc, aigis.RemoteError),
                "is_value_error": isinstance(exc, ValueError), "message": str(exc),
                "traceback": getattr(exc, "remote_traceback", "")}


    def launch():
        print("caller: starting calls", flush=True)
        out = {}
        things = aigis.things  # a partial path, reused
        out["const"] = things.LIMIT()
        out["const_again"] = things.LIMIT()
        out["add"] = aigis.add(2, 3, scale=10)
        out["lambda"] = aigis.make_adder(5)(1)
        thing = aigis.make_thing(21)
        out["thing"] = [type(thing).__name__, thing.double()]
        out["things_importable"] = importlib.util.find_spec("coreonly_things") is not None
        try:
            aigis.fail_value()
        except ValueError as exc:
            out["value_error"] = describe(exc)
        try:
            aigis.fail_custom(7)
        except ValueError as exc:
            out["custom"] = describe(exc)
        try:
            things.LIMIT(1)
        except TypeError as exc:
            out["const_with_args"] = str(exc)
        with open(os.environ["RESULT"] + ".tmp", "w") as f:
            json.dump(out, f)
        os.rename(os.environ["RESULT"] + ".tmp", os.environ["RESULT"])
        print("caller: done", flush=True)
    """


def write_config(tmp_path: Path, body: str) -> Path:
    config = tmp_path / "aigis.toml"
    config.write_text(
        f'[aigis]\nstate_dir = "state"\nruntime_dir = "state/run"\nsupervisor = "embedded"\n'
        f'plugin_user = "root"\n{body}'
    )
    return config


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} not written within {timeout} s")


def test_internal_plugin_calls_the_core_through_the_proxy(tmp_path, make_plugin, daemons):
    result = tmp_path / "result.json"
    make_plugin("lib", CORE_MANIFEST, core=CORE, files={"coreonly_things.py": THINGS})
    make_plugin(
        "caller",
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "main"\n',
        files={"main.py": LAUNCH},
    )
    config = write_config(tmp_path, '[core]\nlib = "src/lib"\n[internal]\ncaller = "src/caller"\n')
    daemon = DaemonProcess(config, env={"RESULT": str(result)})
    daemons.append(daemon)
    got = json.loads(wait_for_file(result))
    assert got["const"] == got["const_again"] == 42
    assert got["add"] == 50
    assert got["lambda"] == 6
    assert got["thing"] == ["Thing", 42]
    assert got["things_importable"] is False  # the class travelled by value
    assert got["value_error"]["type"] == "ValueError"
    assert got["value_error"]["is_remote"] is False
    custom = got["custom"]
    assert (custom["type"], custom["is_remote"], custom["is_value_error"]) == (
        "CustomFailure",
        True,
        True,
    )
    assert custom["message"] == "custom failure 7"
    assert 'raise things.CustomFailure(f"custom failure {code}")' in custom["traceback"]
    assert "not callable" in got["const_with_args"]
    log = daemon.wait_for("caller | caller: done")
    assert "caller | caller: starting calls" in log
    assert "aigis.plugin.lib: adding 2 and 3" in log


def test_terminal_ctl_call_and_skills_against_a_running_daemon(tmp_path, make_plugin, daemons):
    make_plugin("lib", CORE_MANIFEST, core=CORE, files={"coreonly_things.py": THINGS})
    config = write_config(tmp_path, '[core]\nlib = "src/lib"\n')
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("ready:")
    env = {
        **os.environ,
        "AIGIS_ADDRESS": str(tmp_path / "state" / "run" / "aigis.sock"),
        "AIGIS_AUTHKEY_FILE": str(tmp_path / "state" / "authkey"),
    }
    terminal = subprocess.run(
        [PY, "-c", "import AIGISTerminal\nimport aigis\nprint(aigis.add(1, 2, scale=3))"],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert terminal.stdout.strip() == "9", terminal.stderr
    ctl = [PY, "-m", "aigis._ctl", "-c", str(config)]
    call = subprocess.run(
        [*ctl, "call", "aigis.add", "2", "3", "scale=2"], capture_output=True, text=True, timeout=30
    )
    assert (call.returncode, call.stdout.strip()) == (0, "10"), call.stderr
    fail = subprocess.run(
        [*ctl, "call", "fail_custom", "9"], capture_output=True, text=True, timeout=30
    )
    assert fail.returncode == 1
    assert fail.stderr.strip() == "aigisctl: aigis.fail_custom: CustomFailure: custom failure 9"
    skills = subprocess.run([*ctl, "skills", "--json"], capture_output=True, text=True, timeout=30)
    rows = json.loads(skills.stdout)
    assert {"path": "aigis.things.LIMIT", "kind": "value", "plugin": "lib"} in rows
    assert {"path": "aigis.add", "kind": "function", "plugin": "lib"} in rows
    assert {"path": "aigis.AIGISReload", "kind": "function", "plugin": "aigis"} in rows
    reload = subprocess.run(
        [*ctl, "call", "AIGISReload", "lib"], capture_output=True, text=True, timeout=30
    )
    assert (reload.returncode, reload.stdout.strip()) == (0, "'loaded'"), reload.stderr
    assert 'reloading: plugin "lib"' in daemon.log


def test_plugin_reconnects_after_the_core_restarts(tmp_path, make_plugin, daemons):
    make_plugin("lib", CORE_MANIFEST, core="def ping():\n    return 'pong'\nSKILLS = ['ping']\n")
    config = write_config(tmp_path, '[core]\nlib = "src/lib"\n')
    first = DaemonProcess(config)
    daemons.append(first)
    first.wait_for("ready:")
    progress = tmp_path / "progress"
    looper = tmp_path / "looper"
    looper.mkdir()
    (looper / "loop.py").write_text(
        "import time\nimport aigis\n\n\ndef launch():\n"
        "    for i in range(100000):\n"
        f"        with open({str(progress)!r}, 'a') as f:\n"
        "            f.write(f'{i} {aigis.ping()}\\n')\n"
        "        time.sleep(0.02)\n"
    )
    env = {
        **os.environ,
        "AIGIS_ADDRESS": str(tmp_path / "state" / "run" / "aigis.sock"),
        "AIGIS_AUTHKEY_FILE": str(tmp_path / "state" / "authkey"),
    }
    plugin = subprocess.Popen(
        [
            PY,
            "-m",
            "aigis._runner",
            "--name",
            "looper",
            "--entrypoint",
            str(looper),
            "--launch",
            "loop",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for_file(progress)
        assert first.signal(signal.SIGTERM) == 0
        lines_while_down = len(progress.read_text().splitlines())
        second = DaemonProcess(config)
        daemons.append(second)
        second.wait_for("ready:")
        deadline = time.monotonic() + 30
        while len(progress.read_text().splitlines()) < lines_while_down + 5:
            assert plugin.poll() is None, plugin.stderr.read().decode()
            assert time.monotonic() < deadline, "calls did not resume after the restart"
            time.sleep(0.05)
        assert progress.read_text().splitlines()[-1].endswith(" pong")
        assert plugin.poll() is None  # the same plugin process, never restarted
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(plugin.pid, signal.SIGKILL)
        plugin.wait(timeout=10)
        plugin.stderr.close()
