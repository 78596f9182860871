"""Generated input for the wire decoder and the server's frame readers: refusals, no tracebacks.

``AIGIS_FUZZ_EXAMPLES`` raises the number of examples per target (default 200).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiprocess.connection import Client as MultiprocessClient

from aigis._rpc import wire
from aigis._rpc.server import CoreServer

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("AIGIS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SERVER_LOGGER = "aigis._rpc.server"
HEADER = wire.HEADER.pack
KEY = b"fuzz key " * 4

# a frame: a header announcing some size, then some payload (often not matching)
frames = st.builds(
    lambda size, payload: HEADER(size) + payload,
    st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 300)),
    st.binary(max_size=300),
)
streams = st.lists(st.one_of(frames, st.binary(max_size=64)), max_size=4).map(b"".join)


@FUZZ
@given(st.binary(max_size=512))
def test_the_decoder_refuses_garbage_with_a_clean_error(data):
    for decode in (wire.decode_request, wire.decode_reply):
        try:
            decode(data)
        except (ValueError, TypeError, EOFError, pickle.UnpicklingError):
            pass  # a refusal, said in one line
        except (AttributeError, ImportError, IndexError, KeyError, MemoryError, OverflowError):
            pass  # what pickle raises for references it cannot resolve


class Listener(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[CoreServer, Listener]]:
    sockdir = Path(tempfile.mkdtemp(prefix="aigis-fuzz-"))
    listener = Listener()
    logger = logging.getLogger(SERVER_LOGGER)
    logger.addHandler(listener)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    core = CoreServer(
        lambda path: lambda *a, **k: None,
        unix_path=sockdir / "core.sock",
        tcp=None,
        authkey=KEY,
        handshake_timeout=2.0,
        frame_timeout=2.0,
    )
    core._refusals.burst = 10**9  # every refusal logged: the test counts them
    core.start()
    yield core, listener
    core.stop()
    logger.removeHandler(listener)
    logger.setLevel(old_level)
    shutil.rmtree(sockdir, ignore_errors=True)


def send_and_wait(sock: socket.socket, data: bytes) -> None:
    sock.settimeout(10)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass  # the server may close first
    sock.close()


def no_tracebacks(listener: Listener) -> None:
    for record in listener.records:
        assert record.exc_info is None, record.getMessage()
        assert not record.getMessage().startswith("failed:"), record.getMessage()


@FUZZ
@given(streams)
def test_the_handshake_reader_refuses_garbage_in_one_line(server, data):
    core, listener = server
    listener.records.clear()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(core.unix_path))
    send_and_wait(sock, data)
    no_tracebacks(listener)
    lines = [r.getMessage() for r in listener.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("refused: connection from "), lines


@FUZZ
@given(streams)
def test_the_frame_reader_after_authentication_never_fails(server, data):
    core, listener = server
    listener.records.clear()
    conn = MultiprocessClient(str(core.unix_path), authkey=KEY)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    send_and_wait(sock, data)
    no_tracebacks(listener)
    lines = [r.getMessage() for r in listener.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 1 and all(line.startswith("dropped: ") for line in lines), lines
