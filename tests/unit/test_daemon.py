"""The daemon with a FakeSupervisor: load order, reload, shutdown order, adoption (never forks)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aigis._config import load_config
from aigis._daemon import Daemon, is_loopback
from aigis._states import State
from aigis._status import STATUS_FIELDS
from tests.conftest import write_plugin
from tests.fakes import EVENTS, FakeSupervisor

CORE = """\
    from tests.fakes import EVENTS

    def skill():
        return "{name}"

    SKILLS = ["skill_{name}"]
    skill_{name} = skill

    def cleanup():
        EVENTS.append("cleanup {name}")
"""


def plugin(src: Path, name: str, kind: str) -> Path:
    """A plugin of ``kind`` named ``name`` under ``src``; core and internal ones have skills."""
    launch = {"core": "", "internal": 'LAUNCH = "main"', "external": 'LAUNCH = ["sleep", "9"]'}
    config = f'PLUGIN_TYPE = "{kind}"\nENTRYPOINT = "{{root}}"\n{launch[kind]}\n'
    core = CORE.format(name=name.replace("-", "_")) if kind != "external" else None
    return write_plugin(src / name, config, core)


@pytest.fixture
def events() -> Iterator[list[str]]:
    EVENTS.clear()
    yield EVENTS
    EVENTS.clear()


@pytest.fixture
def make_daemon(tmp_path: Path, clean_aigis, events) -> Iterator[Callable[..., Daemon]]:
    """``make_daemon(tables, **fake_options)``: tables is ``{"core": ["a"], ...}``; each plugin
    is made with the kind of its table, unless named ``kind:name``."""
    made: list[Daemon] = []

    def make(tables: dict[str, list[str]], **options: object) -> Daemon:
        daemon = Daemon(load_config(write_config(tmp_path, tables)), FakeSupervisor(**options))
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        for server in daemon.servers:
            server.stop()


def write_config(tmp_path: Path, tables: dict[str, list[str]], version: str = "") -> Path:
    """The config listing ``tables``; plugin sources under tmp_path/src (``version`` picks
    another source directory, which makes a plugin "changed" for a reload)."""
    lines = [
        "[aigis]",
        f'state_dir = "{tmp_path / "state"}"',
        f'runtime_dir = "{tmp_path / "run"}"',
    ]
    for table, names in tables.items():
        lines.append(f"[{table}]")
        for entry in names:
            kind, _, name = entry.rpartition(":")
            bumped = name.endswith("+")
            name = name.rstrip("+")
            src = plugin(tmp_path / ("src2" if bumped else "src"), name, kind or table)
            lines.append(f'{name} = "{src}"')
    path = tmp_path / "aigis.toml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(version))
    return path


TABLES = {"core": ["c"], "internal": ["i"], "external": ["e1", "e2"]}


def test_skills_load_in_config_order_then_processes_start(make_daemon, events):
    daemon = make_daemon(TABLES)
    assert daemon.startup()
    assert list(daemon.plugins) == ["c", "i", "e1", "e2"]
    assert events == ["add i", "add e1", "add e2"]
    import aigis

    assert aigis.skill_c() == "c" and aigis.skill_i() == "i"
    assert [row["state"] for row in daemon.status_rows()] == ["loaded", *["running"] * 3]
    assert daemon.summary() == "1 loaded, 3 running"


def test_shutdown_stops_each_table_at_once_in_reverse_then_cleans_up_in_reverse(
    make_daemon, events
):
    daemon = make_daemon(TABLES)
    daemon.startup()
    events.clear()
    daemon.shutdown()
    assert events == [
        "stop_all e2,e1",
        "stop_all i",
        "remove e2",
        "remove e1",
        "remove i",
        "cleanup i",
        "cleanup c",
        "close",
    ]


def test_shutdown_goes_on_when_stopping_fails(make_daemon, events, caplog):
    daemon = make_daemon(TABLES, refuse_remove=["e1"])

    def broken(steps):
        raise RuntimeError("bus on fire")

    daemon.startup()
    daemon.supervisor.stop_all = broken  # type: ignore[method-assign]
    events.clear()
    daemon.shutdown()
    assert events == ["remove e2", "remove i", "cleanup i", "cleanup c", "close"]
    assert "failed: stopping the plugins" in caplog.text
    assert 'failed: plugin "e1": could not stop' in caplog.text


def test_a_core_restarted_by_systemd_leaves_processes_running(make_daemon, events):
    daemon = make_daemon(TABLES, restarting=True)
    daemon.startup()
    events.clear()
    daemon.shutdown()
    assert events == ["cleanup i", "cleanup c", "close"]


def test_a_restarted_core_adopts_running_units_and_retires_unlisted_ones(make_daemon, events):
    daemon = make_daemon(TABLES, running=["i", "ghost"])
    daemon.startup()
    assert events == ["adopt i 1000", "add e1", "add e2", "retire ghost"]


def test_reload_applies_every_step_when_one_plugin_cannot_be_stopped(make_daemon, events, tmp_path):
    daemon = make_daemon({"core": ["a"], "external": ["b", "c", "keep"]}, refuse_remove=["b"])
    daemon.startup()
    pid_kept = daemon.status_rows(["keep"])[0]["pid"]
    events.clear()
    # b removed (its stop fails), c changed (another source), d added
    write_config(tmp_path, {"core": ["a"], "external": ["c+", "keep", "d"]})
    line = daemon.reload_config()
    assert line == (
        "1 added (d), 1 removed (b), 1 changed (c), 2 unchanged; "
        "failed: b: could not stop: pid 1 survived SIGKILL"
    )
    assert events == ["remove c", "add c", "add d"]
    assert daemon.config.plugin("d") is not None and daemon.config.plugin("b") is None
    assert list(daemon.plugins) == ["a", "c", "keep", "d", "b"]  # b stays listed, last
    assert daemon.status_rows(["keep"])[0]["pid"] == pid_kept
    # the next reload tries b again
    daemon.supervisor.refuse_remove.clear()
    events.clear()
    assert daemon.reload_config() == "4 unchanged"
    assert events == ["remove b"]
    assert list(daemon.plugins) == ["a", "c", "keep", "d"]


def test_a_changed_plugin_that_cannot_be_stopped_is_not_started_twice(
    make_daemon, events, tmp_path
):
    daemon = make_daemon({"external": ["c"]}, refuse_remove=["c"])
    daemon.startup()
    events.clear()
    write_config(tmp_path, {"external": ["c+"]})
    line = daemon.reload_config()
    assert line.endswith("failed: c: could not stop: pid 1 survived SIGKILL")
    assert events == []
    assert daemon.plugins["c"].state is State.LOADED


def test_status_rows_from_the_daemon_have_exactly_the_documented_fields(make_daemon):
    daemon = make_daemon(TABLES)
    daemon.startup()
    for row in daemon.status_rows():
        assert tuple(row) == STATUS_FIELDS


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.7", False),
        ("core.example", False),
    ],
)
def test_only_loopback_addresses_count_as_local(host, loopback):
    assert is_loopback(host) is loopback


class _Listener:
    """Stands for CoreServer: records what the daemon gave it and binds nothing."""

    made: list[dict] = []

    def __init__(self, resolve, **options):
        self.made.append(options)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.mark.parametrize(("host", "warned"), [("192.0.2.7", True), ("127.0.0.1", False)])
def test_plaintext_tcp_beyond_loopback_is_logged_as_exposed_at_start(
    make_daemon, monkeypatch, caplog, host, warned
):
    daemon = make_daemon({})
    settings = replace(daemon.config.settings, tcp=(host, 7001), tcp_plaintext=True)
    daemon.config = replace(daemon.config, settings=settings)
    monkeypatch.setattr("aigis._daemon.CoreServer", _Listener)
    _Listener.made.clear()
    daemon.start_server("plugins")
    assert _Listener.made[0]["tls_context"] is None
    exposed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exposed:")]
    if warned:
        (line,) = exposed
        assert f"plaintext TCP on {host} port 7001 ([aigis] tcp_plaintext = true in " in line
    else:
        assert exposed == []
