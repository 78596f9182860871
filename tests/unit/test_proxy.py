"""The plugin-side ``aigis``: immutable paths, one request per call, dunders never forwarded."""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
import sys
from pathlib import Path

import pytest

import aigis
from aigis._errors import AigisError, CoreUnavailable, RemoteError
from aigis._rpc import client as rpc_client
from aigis._rpc.proxy import SkillPath, make_proxy_module, rebuild_path


class RecordingClient:
    """Stands in for CoreClient: records calls, answers from a table."""

    def __init__(self, answers: dict | None = None) -> None:
        self.calls: list[tuple] = []
        self.answers = answers or {}

    def call(self, path, args=(), kwargs=None):
        self.calls.append((path, args, kwargs))
        return self.answers.get(path)


@pytest.fixture
def fake() -> RecordingClient:
    return RecordingClient({("dnd", "roll"): 4, ("db", "MAX"): 10})


@pytest.fixture
def proxy(fake):
    return make_proxy_module(fake)


def test_the_module_carries_the_small_api(proxy):
    assert proxy.__name__ == "aigis"
    assert proxy.RemoteError is RemoteError
    assert proxy.CoreUnavailable is CoreUnavailable
    assert proxy.AigisError is AigisError
    assert proxy.__version__ == aigis.__version__


def test_attributes_are_paths_and_calls_are_one_request_each(proxy, fake):
    assert proxy.dnd.roll(1, sides=20) == 4
    assert fake.calls == [(("dnd", "roll"), (1,), {"sides": 20})]


def test_constants_are_read_by_calling(proxy, fake):
    assert proxy.db.MAX() == 10
    assert fake.calls == [(("db", "MAX"), (), {})]


def test_building_a_path_sends_nothing(proxy, fake):
    proxy.a.b.c.d  # noqa: B018 - the point is that nothing happens
    assert fake.calls == []


def test_paths_are_immutable_and_reusable(proxy, fake):
    dnd = proxy.dnd
    roll = dnd.roll
    dnd.other  # noqa: B018
    assert dnd.__aigis_path__ == ("dnd",)
    assert roll.__aigis_path__ == ("dnd", "roll")
    dnd.roll()
    dnd.roll()
    assert [c[0] for c in fake.calls] == [("dnd", "roll"), ("dnd", "roll")]
    with pytest.raises(AttributeError, match="immutable"):
        dnd.roll = 3
    with pytest.raises(AttributeError, match="immutable"):
        del dnd.roll


def test_private_names_below_the_top_are_paths_too(proxy):
    assert proxy.dnd._cache.__aigis_path__ == ("dnd", "_cache")


def test_repr_shows_the_dotted_path(proxy):
    assert repr(proxy.a.b) == "<aigis proxy aigis.a.b>"


def test_dunder_attributes_are_never_forwarded(proxy, fake):
    path = proxy.dnd
    for name in ("__wrapped__", "__signature__", "__len__", "__iter__", "__fspath__"):
        assert not hasattr(path, name)
    for name in ("__path__", "__file__", "__spec__x__", "__all_skills__"):
        assert not hasattr(proxy, name)
    assert fake.calls == []


def test_copy_and_deepcopy_return_the_same_path(proxy, fake):
    path = proxy.dnd.roll
    assert copy.copy(path) is path
    assert copy.deepcopy({"p": path})["p"] is path
    assert fake.calls == []


def test_inspect_works_without_a_round_trip(proxy, fake):
    path = proxy.dnd.roll
    assert list(inspect.signature(path).parameters) == ["args", "kwargs"]
    assert not inspect.isclass(path)
    assert not inspect.isfunction(path)
    assert callable(path)
    inspect.getdoc(path)
    assert fake.calls == []


def test_paths_pickle_as_the_skill_they_name(proxy, fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "aigis", proxy)
    again = pickle.loads(pickle.dumps(proxy.dnd.roll))
    assert again == proxy.dnd.roll
    assert again is not proxy.dnd.roll
    assert fake.calls == []


def test_in_the_core_a_pickled_path_is_the_real_skill(proxy, monkeypatch):
    import types

    def roll():
        return 6

    core = types.ModuleType("aigis")
    core.dnd = types.SimpleNamespace(roll=roll)
    data = pickle.dumps(proxy.dnd.roll)
    monkeypatch.setitem(sys.modules, "aigis", core)
    assert pickle.loads(data) is roll


@pytest.mark.parametrize("path", [("_daemon",), ("dnd", "__class__")])
def test_rebuilding_a_path_applies_the_cores_rules(path):
    with pytest.raises(PermissionError):
        rebuild_path(path)


def test_equality_is_by_client_and_path(proxy, fake):
    assert proxy.a.b == proxy.a.b
    assert hash(proxy.a.b) == hash(proxy.a.b)
    assert proxy.a.b != proxy.a.c
    assert proxy.a.b != make_proxy_module(RecordingClient()).a.b
    assert len({proxy.a.b, proxy.a.b, proxy.a}) == 2


def test_only_import_aigis_is_supported(proxy, monkeypatch):
    monkeypatch.setitem(sys.modules, "aigis", proxy)
    with pytest.raises(ModuleNotFoundError, match="not a package"):
        importlib.import_module("aigis.dnd")


def test_star_import_gives_the_api_only(proxy, monkeypatch):
    monkeypatch.setitem(sys.modules, "aigis", proxy)
    namespace: dict = {}
    exec("from aigis import *", namespace)
    assert {k for k in namespace if not k.startswith("__")} == {
        "AigisError",
        "CoreUnavailable",
        "RemoteError",
    }


def test_skill_path_is_exported():
    assert isinstance(make_proxy_module(RecordingClient()).x, SkillPath)


# --- plugin-side configuration: addresses and authkeys -------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/run/aigis/aigis.sock", "/run/aigis/aigis.sock"),
        ("unix:/tmp/a.sock", "/tmp/a.sock"),
        ("relative.sock", "relative.sock"),
        ("tcp:127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("tcp:localhost:1", ("localhost", 1)),
        ("tcp:[::1]:7000", ("::1", 7000)),
    ],
)
def test_parse_address(text, expected):
    assert rpc_client.parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "tcp:", "tcp:host", "tcp:host:port", "tcp:host:0", "tcp:h:70000", "host:7000"]
)
def test_parse_address_names_the_variable_and_the_forms(text):
    with pytest.raises(AigisError) as info:
        rpc_client.parse_address(text)
    assert str(info.value) == (
        f'AIGIS_ADDRESS="{text}": expected a Unix socket path or tcp:HOST:PORT'
    )


def test_describe_is_the_inverse_of_parse():
    for text in ("/run/aigis/aigis.sock", "tcp:127.0.0.1:7000"):
        assert rpc_client.describe(rpc_client.parse_address(text)) == text


def test_connect_from_env_uses_the_packaged_defaults(tmp_path, monkeypatch):
    assert rpc_client.DEFAULT_ADDRESS == "/run/aigis/aigis.sock"
    assert rpc_client.DEFAULT_AUTHKEY_FILE == "/var/lib/aigis/authkey"
    read: list[Path] = []
    monkeypatch.setattr(rpc_client, "read_authkey", lambda p: read.append(p) or b"key")
    client = rpc_client.connect_from_env({})
    assert client.address == "/run/aigis/aigis.sock"
    assert [Path(p) for p in read] == [Path("/var/lib/aigis/authkey")]


def test_connect_from_env_reads_the_environment(tmp_path):
    key = tmp_path / "authkey"
    key.write_bytes(b"secret")
    env = {"AIGIS_ADDRESS": "tcp:127.0.0.1:9", "AIGIS_AUTHKEY_FILE": str(key)}
    client = rpc_client.connect_from_env(env)
    assert client.address == ("127.0.0.1", 9)
    assert client._authkey == b"secret"


def test_relative_socket_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rpc_client.CoreClient("x.sock", b"k").address == str(tmp_path / "x.sock")


def test_a_missing_authkey_file_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(AigisError) as info:
        rpc_client.read_authkey(missing)
    assert str(info.value) == (
        f"cannot read the AIGIS authkey file {missing}: No such file or directory "
        "(set AIGIS_AUTHKEY_FILE)"
    )


def test_an_empty_authkey_file_is_refused(tmp_path):
    empty = tmp_path / "authkey"
    empty.write_bytes(b"")
    with pytest.raises(AigisError, match="is empty"):
        rpc_client.read_authkey(empty)
