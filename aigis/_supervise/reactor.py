"""One event loop thread for the embedded backend: readable fds, timers, calls from any thread."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_WAIT = 60.0  # the loop wakes at least this often even with nothing to do (cheap, bounded)


class Timer:
    """A scheduled call; ``cancel()`` makes it a no-op (from any thread)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        """The call will not happen (if it has not already)."""
        self.cancelled = True


class Reactor:
    """A selector loop on its own thread: one thread however many fds and timers it serves.

    Callbacks run on the loop thread, one at a time; one that raises is logged and the loop goes
    on. ``add_reader``, ``remove_reader``, ``call_at`` and ``call_soon`` may be called from any
    thread: they queue the change and wake the loop through a pipe.
    """

    def __init__(self, name: str = "aigis-reactor") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Timer]] = []
        self._pending: list[Callable[[], None]] = []
        self._seq = itertools.count()
        self._closing = False
        self._woken = False  # a byte is in the wake-up pipe: more writes would only cost
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- from any thread ---------------------------------------------------------------------------
    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread, in the order of calls."""
        with self._lock:
            self._pending.append(callback)
        self._wake()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the loop thread once ``time.monotonic() >= when``."""
        timer = Timer(when, callback)
        with self._lock:
            first = not self._timers or when < self._timers[0][0]
            heapq.heappush(self._timers, (when, next(self._seq), timer))
        if first:
            self._wake()
        return timer

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop thread whenever ``fd`` is readable (until removed)."""
        self.add_readers([(fd, callback)])

    def add_readers(self, readers: list[tuple[int, Callable[[], None]]]) -> None:
        """``add_reader`` for several fds with one wake-up of the loop."""

        def register() -> None:
            for fd, callback in readers:
                self._selector.register(fd, selectors.EVENT_READ, callback)

        self.call_soon(register)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; call on the loop thread (from a callback) before closing it."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def alive(self) -> bool:
        """False once the loop thread ended (closed, or a bug that escaped every guard)."""
        return self._thread.is_alive()

    def on_loop_thread(self) -> bool:
        """True when called from a callback."""
        return threading.current_thread() is self._thread

    def close(self, timeout: float = 5.0) -> None:
        """End the loop and close every fd still registered; never raises."""
        self._closing = True
        self._wake()
        if not self.on_loop_thread():
            self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:  # never write to the pipe's fd number once it is closed (and reused)
            if self._wake_w < 0 or self._woken:
                return
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
                os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        try:
            while not self._closing:
                try:
                    self._once()
                except Exception:  # the loop itself (select, a register): log, back off, go on
                    log.exception("failed: the supervisor's event loop")
                    time.sleep(0.1)
        finally:
            self._shutdown()

    def _once(self) -> None:
        """Wait for the next fd or timer, then run what is due."""
        with self._lock:
            pending, self._pending = self._pending, []
            timeout = 0.0 if pending else MAX_WAIT
            if self._timers and not pending:
                timeout = max(0.0, min(MAX_WAIT, self._timers[0][0] - time.monotonic()))
        for callback in pending:
            self._guarded(callback)
        if pending:
            return  # a pending call may have added readers or timers: recompute the wait
        for key, _events in self._selector.select(timeout):
            if key.fd == self._wake_r:
                with self._lock:
                    self._woken = False  # before the read: a later wake-up writes again
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                self._guarded(key.data)
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    break
                _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guarded(timer.callback)

    @staticmethod
    def _guarded(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # one bad callback must not stop supervision of everything else
            log.exception("failed: event callback %r", callback)

    def _shutdown(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.fd != self._wake_r:
                with contextlib.suppress(OSError):
                    os.close(key.fd)
        self._selector.close()
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            self._timers.clear()
            self._pending.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
