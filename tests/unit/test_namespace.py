"""The skill namespace (SPEC §6): dotted paths, merge, collisions, logger injection."""

import logging
import types

import pytest

from aigis._errors import SkillError
from aigis._namespace import Namespace, Node, accepts_logger

LOG = logging.getLogger("aigis.plugin.t")


def make_module(**attrs):
    module = types.ModuleType("core")
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


class Klass:
    pass


def f_plain(x):
    return x * 2


def f_logger(x, logger=None):
    return (x, logger)


def f_kwargs(x, **kw):
    return (x, kw.get("logger"))


@pytest.fixture
def ns():
    return Namespace(types.ModuleType("aigis"), reserved=["RemoteError"])


def test_alias_paths_logger_only_when_accepted_and_class_unwrapped(ns):
    alias = types.SimpleNamespace(f=f_plain, g=f_logger, h=f_kwargs, CONST=[1, 2], Klass=Klass)
    core = make_module(alias=alias)
    ns.register(
        "p",
        core,
        ["alias.f", "alias.g", "alias.h", "alias.CONST", "alias.Klass"],
        "AIGIS.core",
        LOG,
    )
    root = ns.root
    assert root.alias.f is f_plain and root.alias.f(3) == 6
    assert root.alias.g(1) == (1, LOG)
    assert root.alias.g(1, logger="mine") == (1, "mine")
    assert root.alias.h(1) == (1, LOG)
    assert root.alias.g.__wrapped__ is f_logger and root.alias.g.__name__ == "f_logger"
    assert root.alias.CONST is alias.CONST  # the live object, not a copy
    assert root.alias.Klass is Klass
    assert isinstance(root.alias, Node)
    assert [s.kind for s in ns.skills()] == ["value", "class", "function", "function", "function"]


def test_accepts_logger_never_guesses_for_builtins():
    assert not accepts_logger(len)
    assert accepts_logger(lambda logger: None)
    assert not accepts_logger(lambda *, log: None)


def test_nodes_merge_across_plugins_and_prune_on_remove(ns):
    ns.register("a", make_module(x=types.SimpleNamespace(one=1)), ["x.one"], "A")
    ns.register("b", make_module(x=types.SimpleNamespace(two=2)), ["x.two"], "B")
    assert (ns.root.x.one, ns.root.x.two) == (1, 2)
    ns.remove("a")
    assert not hasattr(ns.root.x, "one") and ns.root.x.two == 2
    ns.remove("b")
    assert not hasattr(ns.root, "x")


def test_collision_names_both_plugins_and_installs_nothing(ns):
    ns.register("first", make_module(x=types.SimpleNamespace(f=1)), ["x.f"], "A")
    core = make_module(x=types.SimpleNamespace(f=2, g=3))
    with pytest.raises(SkillError) as info:
        ns.register("second", core, ["x.g", "x.f"], "/p/second/AIGIS/AIGIS.core")
    assert str(info.value) == (
        'plugin "second": skill "aigis.x.f" is already registered by '
        'plugin "first" (/p/second/AIGIS/AIGIS.core)'
    )
    assert not hasattr(ns.root.x, "g")  # all or nothing


def test_prefix_collision_leaf_versus_node(ns):
    ns.register("first", make_module(x=types.SimpleNamespace(f=1)), ["x.f"], "A")
    with pytest.raises(SkillError, match='"aigis.x" is already registered by plugin "first"'):
        ns.register("second", make_module(x=5), ["x"], "B")


def test_every_bad_name_reported(ns):
    with pytest.raises(SkillError) as info:
        ns.register("p", make_module(a=1), ["nope", 3, "a b", "_x", "RemoteError", "a"], "F")
    message = str(info.value)
    assert 'F has no attribute "nope"' in message
    assert "must be dotted names (str), got int" in message
    assert '"a b" is not a dotted Python name' in message
    assert '"_x": names starting with "_" are private' in message
    assert "part of AIGIS's own API" in message
    assert not hasattr(ns.root, "a")


def test_reregister_same_plugin_replaces_its_paths(ns):
    ns.register("p", make_module(a=1, b=2), ["a", "b"], "F")
    ns.register("p", make_module(a=10), ["a"], "F")
    assert ns.root.a == 10 and not hasattr(ns.root, "b")


def test_resolve_refuses_internals_and_dunders(ns):
    ns.root._secret = 1
    ns.register("p", make_module(a=types.SimpleNamespace(b=f_plain)), ["a.b"], "F")
    assert ns.resolve(("a", "b")) is f_plain
    with pytest.raises(PermissionError):
        ns.resolve(("_secret",))
    with pytest.raises(PermissionError):
        ns.resolve(("a", "b", "__globals__"))
    with pytest.raises(PermissionError):
        ns.resolve(("a", "_private"))
    with pytest.raises(AttributeError, match="aigis.a has no attribute 'c'"):
        ns.resolve(("a", "c"))


def test_the_public_api_is_the_one_the_settings_table_reserves():
    import aigis
    from aigis._settings import PUBLIC_API

    assert aigis.__all__ == [*PUBLIC_API, "__version__"]
