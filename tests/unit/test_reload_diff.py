"""The pure config diff behind live reload."""

from pathlib import Path

from aigis._config import parse_config
from aigis._reload import diff

P = Path("/etc/aigis/aigis.toml")


def cfg(text: str):
    return parse_config('[aigis]\nstate_dir = "/s"\n' + text, P)


def test_add_remove_change_keep():
    old = cfg('[core]\na = "/a"\nb = "/b"\n[external]\nc = "/c"\nd = "/d"\n')
    new = cfg(
        '[core]\na = "/a"\nb = { source = "/b", ref = "v2" }\n[external]\nd = "/d"\ne = "/e"\n'
    )
    plan = diff(old, new)
    assert [e.name for e in plan.added] == ["e"]
    assert plan.removed == ("c",)
    assert [e.name for e in plan.changed] == ["b"]
    assert plan.unchanged == ("a", "d")
    assert plan.settings_changed == ()
    assert plan.describe() == "1 added (e), 1 removed (c), 1 changed (b), 2 unchanged"


def test_identical_configs_give_an_empty_plan():
    text = '[core]\na = "/a"\n'
    plan = diff(cfg(text), cfg(text))
    assert plan.empty and plan.unchanged == ("a",)


def test_failed_plugins_are_retried():
    text = '[core]\na = "/a"\nb = "/b"\n'
    plan = diff(cfg(text), cfg(text), retry=["b"])
    assert [e.name for e in plan.changed] == ["b"] and plan.unchanged == ("a",)


def test_removed_in_reverse_load_order():
    old = cfg('[core]\na = "/a"\nb = "/b"\n[internal]\nc = "/c"\n')
    assert diff(old, cfg("")).removed == ("c", "b", "a")


def test_settings_that_need_a_restart_are_named():
    old = cfg("")
    new = parse_config('[aigis]\nstate_dir = "/s"\ntcp = "127.0.0.1:1"\nrestart_delay = 2\n', P)
    assert diff(old, new).settings_changed == ("tcp", "restart_delay")
