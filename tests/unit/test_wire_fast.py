"""The call path's fast frames: for plain values they are byte for byte what the checked encoding
makes, so the peer cannot tell them apart; anything else takes the checked encoding."""

from __future__ import annotations

import http
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigis._rpc import wire

EXAMPLES = int(os.environ.get("AIGIS_FUZZ_EXAMPLES", "200"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis directory in the tree; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PATH = ("dnd", "roll")

plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    st.text(st.characters(), max_size=64),  # lone surrogates included
    st.text(max_size=wire._SHORT_MAX, min_size=wire._SHORT_MAX - 2),
    st.binary(max_size=64),
    st.binary(max_size=wire._SHORT_MAX, min_size=wire._SHORT_MAX - 2),
)


not_plain = st.one_of(
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sets(st.integers(), max_size=2),
    st.just(bytearray(b"buffer")),
    st.just(http.HTTPStatus.OK),  # an int subclass
    st.just(http.HTTPMethod.GET),  # a str subclass
    st.just(b"b" * (wire._SHORT_MAX + 1)),  # long: the zero-copy path
    st.just("s" * (wire._SHORT_MAX + 1)),
    st.just(math.pi.hex),  # a builtin method: never a plain value
)


def framed(parts: list[wire.Buffer]) -> bytes:
    payload = b"".join(parts)
    return wire.HEADER.pack(len(payload)) + payload


def same(a: object, b: object) -> bool:
    """Equal, of the same type, and NaNs in the same places (NaN != NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return repr(a) == repr(b) if isinstance(a, float | complex) else a == b


@fuzz
@given(st.lists(plain, max_size=4).map(tuple))
def test_a_call_frame_of_plain_values_is_the_checked_encoding_byte_for_byte(args):
    frame = wire.call_frame(PATH, args)
    assert frame == framed(wire.encode((PATH, args, {})))  # what the checked pickler makes
    assert frame == framed(wire.encode_request(PATH, args, {}))
    path, got, kwargs = wire.decode_request(memoryview(frame)[4:])
    assert path == PATH and kwargs == {} and same(got, args)


@fuzz
@given(st.lists(plain, max_size=3), not_plain, st.lists(plain, max_size=3))
def test_a_call_with_any_value_that_is_not_plain_has_no_fast_frame(before, odd, after):
    assert wire.call_frame(PATH, (*before, odd, *after)) is None


@fuzz
@given(plain)
def test_a_reply_frame_of_a_plain_value_is_the_checked_encoding_byte_for_byte(value):
    frame = wire.reply_frame(value)
    assert frame == framed(wire.encode((True, value)))
    assert frame == framed(wire.encode_result(value))
    ok, got = wire.decode_reply(memoryview(frame)[4:])
    assert ok is True and same(got, value)


@fuzz
@given(not_plain)
def test_a_reply_of_a_value_that_is_not_plain_is_the_checked_encoding(value):
    assert wire.reply_frame(value) == wire.encode_result(value)


def test_a_reply_frame_over_the_limit_is_left_to_the_size_check():
    value = "x" * 100
    assert wire.reply_frame(value, limit=50) == wire.encode_result(value)
    assert isinstance(wire.reply_frame(value, limit=len(framed(wire.encode_result(value)))), bytes)


def test_a_call_frame_over_the_limit_raises_before_anything_is_sent():
    with pytest.raises(wire.FrameError, match="exceeds"):
        wire.call_frame(PATH, ("x" * 100,), limit=50)


@fuzz
@given(plain)
def test_decoding_a_reply_gives_what_the_slow_unpacking_gives(value):
    for reply in ((True, value), (False, wire.pack_exception(ValueError(value)))):
        ok, got = wire.decode_reply(b"".join(wire.encode(reply)))
        assert ok is reply[0]
        if ok:
            assert same(got, value)
        else:
            assert type(got) is ValueError and same(got.args, (value,))
