"""The RPC server's dispatch of one request, without sockets: what it replies, what it keeps to
serve the next call faster, and what it records in the metrics."""

from __future__ import annotations

from pathlib import Path

from aigis._metrics import UNKNOWN_PLUGIN, UNRESOLVED, Metrics
from aigis._rpc import wire
from aigis._rpc.server import CoreServer

SKILLS = {("dnd", "roll"): lambda sides=6: sides, ("dnd", "fail"): lambda: 1 / 0}


def resolve(path: tuple[str, ...]) -> object:
    try:
        return SKILLS[path]
    except KeyError:
        raise AttributeError(".".join(path)) from None


def server(tmp_path: Path, **options: object) -> CoreServer:
    return CoreServer(resolve, unix_path=tmp_path / "s.sock", tcp=None, authkey=b"k", **options)


def reply(frame: bytes | list[wire.Buffer]) -> tuple[bool, object]:
    payload = frame[4:] if isinstance(frame, bytes) else b"".join(frame)
    return wire.decode_reply(payload)


def test_a_plain_call_of_a_path_first_called_with_arguments_is_kept_and_looked_up(tmp_path):
    core = server(tmp_path)
    assert reply(core._dispatch(memoryview(wire.call_frame(("dnd", "roll"), (20,))[4:]))) == (
        True,
        20,
    )
    plain = wire.plain_call(("dnd", "roll"))
    assert reply(core._dispatch(memoryview(plain))) == (True, 6)
    assert core._plain_calls == {plain: ("dnd", "roll")}  # the next one is not unpickled
    assert reply(core._dispatch(memoryview(plain))) == (True, 6)


def test_a_refused_path_is_never_kept_and_an_unhashable_one_is_an_error_reply(tmp_path):
    core = server(tmp_path)
    for path in (("_daemon",), ("dnd", "__class__")):
        ok, error = reply(core._dispatch(memoryview(wire.plain_call(path))))
        assert not ok and isinstance(error, PermissionError)
    ok, error = reply(core._dispatch(memoryview(b"".join(wire.encode((("dnd", []), (), {}))))))
    assert not ok and isinstance(error, TypeError)
    assert core._plain_calls == {} and core._allowed == set()


def test_the_metrics_hook_counts_skills_by_dotted_path_and_refusals_as_unresolved(tmp_path):
    metrics = Metrics()
    core = server(tmp_path, metrics=metrics)
    for _ in range(3):
        core._dispatch(memoryview(wire.call_frame(("dnd", "roll"), (20,))[4:]))
    core._dispatch(memoryview(wire.plain_call(("dnd", "fail"))))
    core._dispatch(memoryview(wire.plain_call(("dnd", "__class__"))))
    core._dispatch(memoryview(b"junk"))
    rows = {(r["skill"], r["caller"]): r for r in metrics.snapshot()["skills"]}
    assert set(rows) == {
        ("dnd.roll", UNKNOWN_PLUGIN),
        ("dnd.fail", UNKNOWN_PLUGIN),
        (UNRESOLVED, UNKNOWN_PLUGIN),
    }
    roll = rows[("dnd.roll", UNKNOWN_PLUGIN)]
    assert roll["calls"] == sum(roll["buckets"]) == 3 and roll["errors"] == {}
    assert roll["bytes_in"] == 3 * (len(wire.call_frame(("dnd", "roll"), (20,))) - 4)
    assert roll["bytes_out"] == 3 * len(wire.reply_frame(20))
    assert rows[("dnd.fail", UNKNOWN_PLUGIN)]["errors"] == {"ZeroDivisionError": 1}
    assert rows[(UNRESOLVED, UNKNOWN_PLUGIN)]["errors"] == {"PermissionError": 1, "ValueError": 1}
    assert metrics.snapshot()["in_flight"] == 0


def test_with_per_plugin_keys_calls_count_under_the_caller(tmp_path):
    metrics = Metrics()
    core = server(tmp_path, metrics=metrics, keys=dict)
    core._dispatch(memoryview(wire.plain_call(("dnd", "roll"))), "oracle")
    core._dispatch(memoryview(wire.plain_call(("dnd", "roll"))), "root")
    rows = {(r["skill"], r["caller"]): r["calls"] for r in metrics.snapshot()["skills"]}
    assert rows == {("dnd.roll", "oracle"): 1, ("dnd.roll", "root"): 1}
