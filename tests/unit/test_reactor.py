"""The event loop thread: timers in order, calls from any thread, readers, a bad callback."""

from __future__ import annotations

import os
import threading
import time

import pytest

from aigis._supervise.reactor import Reactor


@pytest.fixture
def reactor():
    loop = Reactor("test-reactor")
    yield loop
    loop.close()
    assert not loop.alive()


def wait(event: threading.Event) -> None:
    assert event.wait(10), "the loop did not get there within 10 s"


def test_timers_fire_in_the_order_of_their_time_not_of_their_scheduling(reactor):
    fired: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    reactor.call_at(now + 0.03, lambda: (fired.append("late"), done.set()))
    reactor.call_at(now + 0.01, lambda: fired.append("early"))
    cancelled = reactor.call_at(now + 0.02, lambda: fired.append("cancelled"))
    cancelled.cancel()
    wait(done)
    assert fired == ["early", "late"]


def test_a_failing_callback_is_logged_and_the_loop_goes_on(reactor, caplog):
    done = threading.Event()
    reactor.call_soon(lambda: 1 / 0)
    reactor.call_soon(done.set)
    wait(done)
    assert reactor.alive()
    assert any(r.getMessage().startswith("failed: event callback") for r in caplog.records)


def test_readers_are_called_on_the_loop_thread_until_removed(reactor):
    rfd, wfd = os.pipe2(os.O_NONBLOCK)
    got: list[bytes] = []
    threads: set[bool] = set()
    done = threading.Event()

    def on_readable() -> None:
        threads.add(reactor.on_loop_thread())
        data = os.read(rfd, 100)
        if data:
            got.append(data)
        else:
            reactor.remove_reader(rfd)
            os.close(rfd)
            done.set()

    reactor.add_reader(rfd, on_readable)
    os.write(wfd, b"hello")
    os.close(wfd)
    wait(done)
    assert (b"".join(got), threads) == (b"hello", {True})


def test_one_thread_serves_any_number_of_calls(reactor):
    before = threading.active_count()
    done = threading.Event()
    count = [0]

    def bump() -> None:
        count[0] += 1
        if count[0] == 1000:
            done.set()

    for _ in range(1000):
        reactor.call_soon(bump)
    wait(done)
    assert threading.active_count() == before
