"""The Router: each plugin to the local backend or its host's, decided by its ProcessSpec."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigis._config import parse_config
from aigis._errors import NotSupervised, PluginError
from aigis._remote.hosts import HostSpec
from aigis._states import Kind, State
from aigis._supervise import pick_supervisor
from aigis._supervise.base import ProcessSpec
from aigis._supervise.embedded import EmbeddedSupervisor
from aigis._supervise.router import Router
from tests.fakes import EVENTS, FakeSupervisor

WEB1 = HostSpec("web1", "fd00::2", "root")
WEB2 = HostSpec("web2", "fd00::3", "root")


class Labelled(FakeSupervisor):
    """A FakeSupervisor whose events say which backend recorded them."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def _record(self, *words: object) -> None:
        EVENTS.append(" ".join(map(str, (self.label, *words))))


@pytest.fixture
def router(tmp_path: Path) -> Router:
    EVENTS.clear()
    settings = parse_config(f'[aigis]\nstate_dir = "{tmp_path}"\n', tmp_path / "a.toml").settings
    return Router(Labelled("local"), settings, remote=lambda host: Labelled(host.name))


def spec(name: str, host: HostSpec | None = None) -> ProcessSpec:
    return ProcessSpec(name, Kind.EXTERNAL, ("/bin/true",), Path("/"), host=host)


def test_each_plugin_goes_to_the_backend_of_its_host(router: Router) -> None:
    router.add(spec("a"))
    router.add(spec("b", WEB1))
    router.add(spec("c", WEB2))
    router.add(spec("d", WEB1))
    assert EVENTS == ["local add a", "web1 add b", "web2 add c", "web1 add d"]
    assert sorted(router.hosts) == ["web1", "web2"]  # one backend per host
    assert [router.host_of(n) for n in "abcd"] == [None, "web1", "web2", "web1"]
    router.restart("d")
    router.stop("a")
    assert EVENTS[-3:] == ["web1 restart d", "web1 start d", "local stop a"]


def test_status_asks_each_backend_once_and_keeps_the_order_asked(router: Router) -> None:
    for name, host in (("a", None), ("b", WEB1), ("c", None), ("d", WEB2)):
        router.add(spec(name, host))
    asked: list[tuple[str, list[str]]] = []
    for key, backend in [("local", router.local), *router.hosts.items()]:
        original = backend.status

        def status(names=None, key=key, original=original):
            asked.append((key, list(names)))
            return original(names)

        backend.status = status  # type: ignore[method-assign]
    rows = router.status(["d", "a", "b", "c"])
    assert [r.name for r in rows] == ["d", "a", "b", "c"]
    assert sorted(asked) == [("local", ["a", "c"]), ("web1", ["b"]), ("web2", ["d"])]
    assert [r.name for r in router.status()] == ["a", "b", "c", "d"]
    with pytest.raises(NotSupervised):
        router.status(["nope"])


def test_stop_all_gives_each_backend_its_own_plugins_in_step_order(router: Router) -> None:
    for name, host in (("a", None), ("b", WEB1), ("c", None), ("d", WEB1)):
        router.add(spec(name, host))
    router.stop_all([["d", "c"], ["b", "a"]])
    assert sorted(EVENTS[4:]) == sorted(
        ["local stop_all c", "local stop_all a", "web1 stop_all d", "web1 stop_all b"]
    )
    assert EVENTS.index("local stop_all c") < EVENTS.index("local stop_all a")
    assert EVENTS.index("web1 stop_all d") < EVENTS.index("web1 stop_all b")


def test_a_plugin_moved_to_another_host_is_removed_there_and_added_here(router: Router) -> None:
    router.add(spec("a", WEB1))
    router.remove("a")
    router.add(spec("a"))
    assert EVENTS == ["web1 add a", "web1 remove a", "local add a"]
    assert router.host_of("a") is None
    with pytest.raises(PluginError, match="already supervised"):
        router.add(spec("a", WEB2))


def test_a_changed_host_entry_is_refused_while_plugins_run_there(router: Router) -> None:
    router.add(spec("a", WEB1))
    moved = HostSpec("web1", "fd00::9", "root")
    with pytest.raises(PluginError) as e:
        router.add(spec("b", moved))
    assert str(e.value) == (
        'plugin "b": host "web1" changed in the config while a run there; restart AIGIS to apply it'
    )
    router.remove("a")
    router.add(spec("b", moved))  # nothing runs there: a fresh backend for the new entry
    assert EVENTS[-2:] == ["web1 close", "web1 add b"]


def test_retire_unknown_leaves_each_host_the_plugins_placed_nowhere(router: Router) -> None:
    router.add(spec("a"))
    router.add(spec("b", WEB1))
    seen: dict[str, list[str]] = {}
    for key, backend in [("local", router.local), ("web1", router.hosts["web1"])]:

        def retire(names, key=key):
            seen[key] = sorted(names)
            return []

        backend.retire_unknown = retire  # type: ignore[method-assign]
    router.retire_unknown(["a", "b", "failed-to-load"])
    # Locally: every plugin not placed elsewhere; on a host: those supervised nowhere (a plugin
    # that failed to load keeps its unit until it loads again).
    assert seen == {"local": ["a", "failed-to-load"], "web1": ["failed-to-load"]}


def test_a_failing_host_does_not_stop_the_others_from_stopping(router: Router) -> None:
    router.add(spec("a"))
    router.add(spec("b", WEB1))

    def broken(steps):
        raise OSError("link down")

    router.hosts["web1"].stop_all = broken  # type: ignore[method-assign]
    router.stop_all([["a", "b"]])
    assert "local stop_all a" in EVENTS
    assert router.local.status(["a"])[0].state is State.STOPPED


def test_pick_supervisor_routes_around_whichever_local_backend(tmp_path: Path) -> None:
    settings = parse_config(f'[aigis]\nstate_dir = "{tmp_path}"\n', tmp_path / "a.toml").settings
    picked = pick_supervisor("embedded", settings)
    assert isinstance(picked, Router) and isinstance(picked.local, EmbeddedSupervisor)
    assert picked.name == "embedded"
    picked.close()


def test_retire_reaches_table_hosts_no_plugin_uses_any_more(tmp_path: Path) -> None:
    EVENTS.clear()
    settings = parse_config(f'[aigis]\nstate_dir = "{tmp_path}"\n', tmp_path / "a.toml").settings
    made: list[str] = []

    def remote(host: HostSpec) -> Labelled:
        made.append(host.name)
        return Labelled(host.name)

    router = Router(Labelled("local"), settings, remote=remote, known_hosts={"web2": WEB2})
    router.add(spec("a"))  # moved home from web2 while no core ran
    router.retire_unknown(["a"])
    assert made == ["web2"]  # asked although no plugin runs there now
    router.add(spec("b", WEB2))
    assert made == ["web2"]  # the same backend serves it
