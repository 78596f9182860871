"""The wire format: framing limits, pickle-first/dill-fallback, exceptions across the boundary."""

from __future__ import annotations

import importlib
import pickle
import socket
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from aigis._errors import CoreUnavailable, RemoteError
from aigis._rpc import wire
from aigis._rpc.channel import Channel, TruncatedFrame


@pytest.fixture
def local_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module importable here only from tmp_path, like a core plugin's own code."""
    (tmp_path / "localmod.py").write_text(
        textwrap.dedent(
            """
            FACTOR = 3

            class Widget:
                def __init__(self, n):
                    self.n = n

                def scaled(self):
                    return self.n * FACTOR

                def clone(self):
                    return Widget(self.n + 1)

            class LocalError(ValueError):
                pass

            class PickyError(Exception):
                def __init__(self, a, b):
                    super().__init__(f"{a}/{b}")

            def helper(x):
                return x * FACTOR

            def fail():
                raise LocalError("local failure 42")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("localmod")
    yield module
    sys.modules.pop("localmod", None)


def forget(module) -> None:
    """Make a module unimportable here, as it is in a plugin process."""
    sys.modules.pop(module.__name__, None)
    sys.path.remove(str(Path(module.__file__).parent))


def roundtrip(obj):
    return wire.decode(b"".join(wire.encode(obj)))


def tag(obj) -> bytes:
    return bytes(wire.encode(obj)[0])


# --- framing -------------------------------------------------------------------------------


def test_frame_header_round_trips_the_size():
    assert wire.frame_size(wire.frame_header(1234)) == 1234


def test_frame_size_refuses_lengths_over_the_limit():
    with pytest.raises(wire.FrameError, match="exceeds the 256 MiB limit"):
        wire.frame_size(wire.HEADER.pack(wire.MAX_MESSAGE + 1))


def test_frame_size_refuses_the_64_bit_length_marker():
    with pytest.raises(wire.FrameError, match="negative length"):
        wire.frame_size(wire.HEADER.pack(-1))


def test_frame_size_honours_a_small_limit():
    with pytest.raises(wire.FrameError, match="300 bytes exceeds the 256-byte limit"):
        wire.frame_size(wire.HEADER.pack(300), 256)


def test_frame_header_refuses_to_announce_too_much():
    with pytest.raises(wire.FrameError):
        wire.frame_header(wire.MAX_MESSAGE + 1)


@pytest.fixture
def channels():
    a, b = socket.socketpair()
    yield Channel(a), Channel(b)
    a.close()
    b.close()


def send_in_background(channel: Channel, messages: list[list[bytes]]) -> threading.Thread:
    """Send from another thread: a big frame does not fit in the socket buffer."""
    thread = threading.Thread(target=lambda: [channel.send_message(m) for m in messages])
    thread.start()
    return thread


def test_channel_carries_small_and_large_messages(channels):
    left, right = channels
    big = bytes(range(256)) * 8192  # 2 MiB: several recv calls, a grown buffer
    payloads = [b"", b"x", big, b"after the big one"]
    sender = send_in_background(left, [[p] for p in payloads])
    for payload in payloads:
        assert bytes(right.recv_message()) == payload
    sender.join(10)


def test_a_big_frame_lands_in_place_the_second_time(channels):
    left, right = channels
    big = b"z" * (1 << 20)
    sender = send_in_background(left, [[big], [big]])
    assert bytes(right.recv_message()) == big
    moved = []
    original_fill = right._fill

    def fill(need: int) -> None:
        if right._start + need > len(right._buf):  # does not fit behind its header
            moved.append(right._end - right._start)  # bytes of it copied down
        original_fill(need)

    right._fill = fill
    assert bytes(right.recv_message()) == big
    sender.join(10)
    # before: the buffer was exactly as big as the payload, so the part of every big reply
    # received with its header was copied down by 4 bytes before the rest could come
    assert sum(moved) == 0


def test_channel_splits_back_to_back_frames(channels):
    left, right = channels
    left.sock.sendall(wire.HEADER.pack(3) + b"one" + wire.HEADER.pack(3) + b"two")
    assert bytes(right.recv_message()) == b"one"
    assert bytes(right.recv_message()) == b"two"


def test_channel_refuses_a_huge_length_before_allocating(channels):
    left, right = channels
    left.sock.sendall(wire.HEADER.pack(0x7FFFFFFF))
    with pytest.raises(wire.FrameError, match="2147483647 bytes"):
        right.recv_message()


def test_channel_reports_truncated_frames(channels):
    left, right = channels
    left.sock.sendall(wire.HEADER.pack(10) + b"short")
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(TruncatedFrame, match="middle of a message"):
        right.recv_message()


def test_channel_reports_a_clean_close(channels):
    left, right = channels
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError, match="^connection closed$"):
        right.recv_message()


def test_channel_recv_bytes_applies_the_handshake_limit(channels):
    left, right = channels
    left.send_bytes(b"y" * 300)
    with pytest.raises(wire.FrameError):
        right.recv_bytes(256)


def test_channel_sends_many_parts_past_iov_max(channels):
    left, right = channels
    parts = [b"p" * 100] * 3000  # > IOV_MAX buffers, > the small-send threshold
    sender = send_in_background(left, [parts])
    assert bytes(right.recv_message()) == b"p" * 300_000
    sender.join(10)


# --- which modules travel by reference -----------------------------------------------------


@pytest.mark.parametrize("name", ["os", "json.decoder", "aigis._errors", "pytest", "builtins"])
def test_stdlib_site_packages_and_aigis_are_shared(name):
    importlib.import_module(name)
    assert wire.is_shared_module(name)


def test_main_and_unknown_modules_are_not_shared(local_module):
    assert not wire.is_shared_module("__main__")
    assert not wire.is_shared_module(None)
    assert not wire.is_shared_module("localmod")
    assert not wire.is_shared_module("never_imported_anywhere")


# --- pickle first, dill when pickle refuses ------------------------------------------------


def test_plain_data_uses_pickle():
    value = {"a": [1, 2.5, None], "b": ("x", b"y"), "c": {3, 4}}
    assert tag(value) == wire.PICKLE_TAG
    assert roundtrip(value) == value


def test_stdlib_classes_travel_by_reference_with_pickle():
    import collections
    import datetime

    value = [collections.OrderedDict(a=1), datetime.date(2024, 1, 2), Path("/x")]
    assert tag(value) == wire.PICKLE_TAG
    assert roundtrip(value) == value


def test_lambdas_fall_back_to_dill():
    n = 5
    assert tag(lambda x: x + n) == wire.DILL_TAG
    assert roundtrip(lambda x: x + n)(1) == 6


def test_classes_of_local_modules_ship_by_value(local_module):
    widget = local_module.Widget(4)
    data = b"".join(wire.encode(widget))
    assert data[:1] == wire.DILL_TAG
    forget(local_module)  # now this process is like a plugin: localmod cannot be imported
    got = wire.decode(data)
    assert type(got) is not local_module.Widget
    assert type(got).__name__ == "Widget"
    assert got.scaled() == 12  # the module global FACTOR travelled with the method
    assert got.clone().n == 5  # and so did the class, for a method that names it


def test_functions_of_local_modules_ship_by_value(local_module):
    data = b"".join(wire.encode(local_module.helper))
    forget(local_module)
    assert wire.decode(data)(2) == 6


def test_dill_by_value_patch_is_in_place():
    roundtrip(lambda: None)
    import dill._dill

    assert getattr(dill._dill._locate_function, "_aigis_by_value", False)


def test_unpicklable_values_raise():
    with pytest.raises(TypeError):
        wire.encode(x for x in range(3))


def test_large_bytes_are_not_copied():
    blob = b"z" * (1 << 20)
    parts = wire.encode_result(blob)
    assert any(part is blob for part in parts)
    assert wire.decode_reply(b"".join(parts)) == (True, blob)


def test_encode_survives_reentry_from_reduce():
    class Nested:
        def __reduce__(self):
            inner = b"".join(wire.encode({"inner": 1}))  # e.g. a __reduce__ calling a skill
            return (wire.decode, (inner,))

    assert roundtrip([Nested(), 2]) == [{"inner": 1}, 2]


def test_encoder_recovers_after_a_failed_pickle():
    with pytest.raises(TypeError):
        wire.encode([1, (x for x in ())])
    assert roundtrip([1, 2]) == [1, 2]


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs",
    [((), {}), ((1, "a", b"b", None, 2.5), {}), (([1, 2],), {"k": {"v": 1}}), ((), {"x": 1})],
)
def test_request_round_trip(args, kwargs):
    data = b"".join(wire.encode_request(("a", "b"), args, kwargs))
    assert wire.decode_request(data) == (("a", "b"), args, kwargs)


@pytest.mark.parametrize(
    "request_",
    [("a", (), {}), ((), (), {}), (("a",), [], {}), (("a",), (), []), (("a",), ()), "junk"],
)
def test_malformed_requests_are_refused(request_):
    with pytest.raises(TypeError, match="malformed request"):
        wire.decode_request(b"".join(wire.encode(request_)))


def test_a_plain_call_is_the_request_of_a_call_without_arguments():
    path = ("weather", "today")
    assert wire.plain_call(path) == b"".join(wire.encode_request(path, (), {}))
    assert wire.decode_request(wire.plain_call(path)) == (path, (), {})


def test_the_none_result_is_what_encode_result_makes_and_decodes_to_none():
    assert b"".join(wire.encode_result(None)) == wire.NONE_RESULT
    assert wire.decode_reply(memoryview(bytearray(wire.NONE_RESULT))) == (True, None)
    assert wire.decode_reply(b"".join(wire.encode_result(0))) == (True, 0)


def test_unknown_payload_tags_are_refused():
    with pytest.raises(ValueError, match="unknown payload tag"):
        wire.decode(b"X" + pickle.dumps(1))


@pytest.mark.parametrize(
    "path, reason",
    [
        (("a", "__class__"), "dunder attribute '__class__' is never forwarded"),
        (("__import__",), "dunder attribute"),
        (("_daemon", "x"), "names starting with '_' are AIGIS internals"),
        (("mod", "aigis", "_daemon"), "private attribute '_daemon' is never forwarded"),
        (("a", "_private"), "private attribute '_private'"),
    ],
)
def test_refusal_names_the_path_and_the_rule(path, reason):
    message = wire.refusal(path)
    assert message is not None
    assert message.startswith(wire.dotted(path) + ": ")
    assert reason in message


def test_paths_of_non_strings_are_refused():
    assert wire.refusal(("a", 1)) == "malformed path ('a', 1): every name must be a str"


def test_private_names_below_the_top_level_are_refused_too():
    assert "private attribute '_helper'" in wire.refusal(("dnd", "_helper"))
    assert wire.refusal(("dnd", "roll")) is None


# --- exceptions ----------------------------------------------------------------------------


def raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test wants whatever was raised
        return exc
    raise AssertionError("did not raise")


def through_the_wire(exc: BaseException) -> BaseException:
    ok, value = wire.decode_reply(b"".join(wire.encode_error(exc)))
    assert ok is False
    return value


def fail_with_value_error():
    raise ValueError("bad value 7")


def test_importable_exceptions_keep_their_type_and_gain_the_traceback():
    got = through_the_wire(raised(fail_with_value_error))
    assert type(got) is ValueError
    assert got.args == ("bad value 7",)
    assert "fail_with_value_error" in got.remote_traceback
    assert got.remote_traceback.startswith("Traceback (most recent call last):")
    assert got.__notes__[-1].startswith("--- raised in the AIGIS core ---\nTraceback")


def test_aigis_exceptions_keep_their_type():
    got = through_the_wire(CoreUnavailable("down"))
    assert type(got) is CoreUnavailable


def test_unimportable_exceptions_become_remote_errors_with_the_builtin_base(local_module):
    data = b"".join(wire.encode_error(raised(local_module.fail)))
    forget(local_module)
    ok, got = wire.decode_reply(data)
    assert not ok
    assert isinstance(got, RemoteError)
    assert isinstance(got, ValueError)
    assert type(got).__name__ == "LocalError"
    assert type(got).__module__ == "localmod"
    assert type(got).__qualname__ == "LocalError"
    assert str(got) == "local failure 42"
    assert "in fail" in got.remote_traceback
    assert got.remote_traceback.rstrip() in got.__notes__[-1]


def test_generated_classes_are_cached(local_module):
    first = through_the_wire(raised(local_module.fail))
    second = through_the_wire(raised(local_module.fail))
    assert type(first) is type(second)
    assert wire.remote_error_class("localmod", "LocalError", "ValueError") is type(first)


def test_exceptions_that_cannot_be_rebuilt_fall_back_to_remote_errors(local_module):
    # importable here, but its __init__ does not accept its own args: unpickling fails
    got = through_the_wire(local_module.PickyError("a", "b"))
    assert isinstance(got, RemoteError)
    assert type(got).__name__ == "PickyError"
    assert str(got) == "a/b"


def test_unpicklable_exception_args_are_replaced_by_the_message():
    exc = ValueError(lambda: None)
    got = through_the_wire(exc)
    assert isinstance(got, ValueError)
    assert isinstance(got, RemoteError)
    assert got.args == (str(exc),)


@pytest.mark.parametrize(
    "base", [OSError, KeyError, UnicodeDecodeError, StopIteration, SystemExit, BaseException]
)
def test_remote_error_classes_combine_with_any_builtin_base(base):
    cls = wire.remote_error_class("somewhere", f"Odd{base.__name__}", base.__name__)
    assert issubclass(cls, RemoteError)
    assert issubclass(cls, base)


def test_unknown_builtin_base_names_fall_back_to_exception():
    cls = wire.remote_error_class("somewhere", "Weird", "NoSuchBase")
    assert issubclass(cls, RemoteError)
    assert cls.__mro__[1:] == RemoteError.__mro__


def test_builtin_base_is_the_nearest_builtin_ancestor(local_module):
    assert wire.builtin_base(local_module.LocalError) is ValueError
    assert wire.builtin_base(CoreUnavailable) is ConnectionError
    assert wire.builtin_base(KeyError) is KeyError


def test_a_missing_dill_is_named_before_a_call_needs_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    assert wire.dill_missing() is None  # installed here
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dill" else real(name, *a)
    )
    assert wire.dill_missing() == (
        "dill is not installed: results and arguments that pickle cannot encode (lambdas, "
        "classes defined in a plugin) will fail to travel; install dill (Debian: python3-dill)"
    )
