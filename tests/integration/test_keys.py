"""Each plugin process holds a key of its own: the core knows who calls, a plugin's key opens
nothing but the skills, and ``[aigis] reload_skill`` limits the seed's AIGISReload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aigis import _ctlclient
from aigis._ctlwire import control_key_path
from aigis._errors import CoreUnavailable
from aigis._rpc.client import CoreClient
from tests.integration.daemon import DaemonProcess
from tests.integration.test_supervision import PY, ctl, external

pytestmark = pytest.mark.integration

CORE = "def who():\n    return 'core'\nSKILLS = ['who']\n"


@pytest.fixture
def core_with(tmp_path, make_plugin, daemons):
    """``core_with(settings)``: a core with two external plugins (a, b) and a core plugin."""

    def start(settings: str = "") -> tuple:
        make_plugin("lib", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', core=CORE)
        for name in ("a", "b"):
            make_plugin(name, external([PY, "-c", "import time; time.sleep(600)"]))
        config = tmp_path / "aigis.toml"
        config.write_text(
            '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
            'plugin_user = "root"\n'
            f'{settings}\n[core]\nlib = "src/lib"\n[external]\na = "src/a"\nb = "src/b"\n'
        )
        daemon = DaemonProcess(config)
        daemons.append(daemon)
        daemon.wait_for("ready:")
        return config, daemon

    return start


def client(config, name: str) -> CoreClient:
    key = (config.parent / "state" / "keys" / f"{name}.key").read_bytes()
    return CoreClient(config.parent / "run" / "aigis.sock", key, retry_for=1.0)


def test_each_plugin_gets_its_own_key_which_opens_the_skills(core_with):
    config, _ = core_with()
    keys = config.parent / "state" / "keys"
    a, b = (keys / "a.key").read_bytes(), (keys / "b.key").read_bytes()
    assert a != b and len(a) == 32
    assert oct((keys / "a.key").stat().st_mode & 0o777) == "0o600"
    with client(config, "a") as rpc:
        assert rpc.call(("who",)) == "core"


def test_a_plugin_key_does_not_open_the_control_socket(core_with):
    config, _ = core_with()
    state = config.parent / "state"
    plugin_key = state / "keys" / "a.key"
    assert plugin_key.read_bytes() != control_key_path(state).read_bytes()
    with pytest.raises(_ctlclient.Denied):
        _ctlclient.request(config.parent / "run" / "control.sock", plugin_key, "stop", ["b"])
    assert ctl(config, "status", "b").returncode == 0  # b still runs


def test_reload_skill_none_refuses_plugins_but_not_root(core_with):
    config, _ = core_with('reload_skill = "none"')
    with client(config, "a") as rpc, pytest.raises(PermissionError, match="reload_skill"):
        rpc.call(("AIGISReload",), ("b",))
    authkey = (config.parent / "state" / "authkey").read_bytes()
    with CoreClient(config.parent / "run" / "aigis.sock", authkey) as root:
        assert root.call(("AIGISReload",), ("lib",)) == "loaded"


def test_reload_skill_can_name_the_plugins_allowed(core_with):
    config, daemon = core_with('reload_skill = "a"')
    with client(config, "a") as rpc:
        assert rpc.call(("AIGISReload",), ("lib",)) == "loaded"
    with client(config, "b") as rpc, pytest.raises(PermissionError, match='plugin "b" may not'):
        rpc.call(("AIGISReload",), ("lib",))


def test_a_removed_plugins_key_opens_nothing_any_more(core_with):
    config, _ = core_with()
    key = (config.parent / "state" / "keys" / "b.key").read_bytes()
    config.write_text(config.read_text().replace('b = "src/b"\n', ""))
    assert ctl(config, "reload").returncode == 0
    with (
        CoreClient(config.parent / "run" / "aigis.sock", key, retry_for=0.5) as rpc,
        pytest.raises(CoreUnavailable, match="authentication failed"),
    ):
        rpc.call(("who",))


def test_calls_are_counted_under_the_calling_plugins_name(core_with, tmp_path):
    config, daemon = core_with()
    with client(config, "a") as rpc:
        for _ in range(3):
            rpc.call(("who",))
    top = _ctlclient.request(
        config.parent / "run" / "control.sock",
        control_key_path(config.parent / "state"),
        "top",
        [],
    )
    calls = {(s["skill"], s["caller"]): s["calls"] for s in top["metrics"]["skills"]}
    assert calls[("who", "a")] == 3


ROLLER = """\
import pathlib
import time

import aigis


def launch():
    for _ in range(1000):
        aigis.dnd.roll(20)
    pathlib.Path("done").touch()
    time.sleep(600)
"""


def test_1000_calls_from_an_internal_plugin_count_1000_under_its_name(
    tmp_path, make_plugin, daemons
):
    make_plugin(
        "roller",
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "main"\n',
        files={"main.py": ROLLER},
    )
    dnd = Path(__file__).parents[2] / "examples" / "plugins" / "dnd"
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
        'plugin_user = "root"\n'
        f'[core]\ndnd = "{dnd}"\n[internal]\nroller = "src/roller"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.wait_for("ready:")
    done = tmp_path / "state" / "ext" / "roller" / "done"
    deadline = time.monotonic() + 60
    while not done.exists():
        assert time.monotonic() < deadline, daemon.log[-2000:]
        time.sleep(0.05)
    top = _ctlclient.request(
        config.parent / "run" / "control.sock",
        control_key_path(config.parent / "state"),
        "top",
        [],
    )
    calls = {(s["skill"], s["caller"]): s for s in top["metrics"]["skills"]}
    roll = calls[("dnd.roll", "roller")]
    assert roll["calls"] == 1000 and not roll["errors"]
    assert roll["seconds"] > 0  # the latency histogram got every call
