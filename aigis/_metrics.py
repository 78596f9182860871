"""The core's counters: skill calls per (skill, caller), connections.

Always on, so a call's hook only queues a record (no lock, no lookup, no string built: two C
calls, see ``recorder``); the records are folded into the counters in batches. Nothing here
formats or serves anything: ``snapshot()`` hands plain data to the control channel (``aigisctl
top``) and to the Prometheus exposition (``aigis._exposition``).
Cardinality is bounded: at most MAX_SERIES (skill, caller) pairs and MAX_ERROR_TYPES error types
per pair; what does not fit is counted under OVERFLOW. Pure standard library, no I/O.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

#: Upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf.
#: From 10 µs: a call through the control channel or the proxy takes tens of microseconds.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BOUNDS_NS = [round(bound * 1e9) for bound in BUCKETS]  # what records carry: nanoseconds
#: Call records queued at most: the call that queues one more folds them in itself (the core's
#: main loop folds them every tick, so this bounds memory when it cannot). A ``recorder`` hot path
#: folds every FOLD_EVERY-th call instead, so at most about twice as many are queued.
MAX_QUEUED = 65536
FOLD_EVERY = MAX_QUEUED
MAX_SERIES = 2048  # (skill, caller) pairs; skill paths are known, callers are plugin names
MAX_ERROR_TYPES = 16  # exception type names per pair
MAX_LABEL = 200  # characters of a label value kept
_MAX_ALIASES = 4 * MAX_SERIES  # record keys (a path tuple, a long label) remembered per series
OVERFLOW = "_other"  # the label value of whatever did not fit
UNRESOLVED = "_unresolved"  # the skill label of a call whose path did not resolve
OPERATOR = "aigisctl"  # the caller label of calls made with ``aigisctl call``
UNKNOWN_PLUGIN = "plugin"  # the caller label of RPC calls until callers are identified


class _Series:
    """Counters of one (skill, caller) pair."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "calls", "errors", "nanoseconds")

    def __init__(self) -> None:
        self.calls = 0
        self.nanoseconds = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.errors: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0


def label(value: str) -> str:
    """A label value as kept: at most MAX_LABEL characters."""
    return value if len(value) <= MAX_LABEL else value[:MAX_LABEL]


class Metrics:
    """Thread-safe counters; one instance per core (``Daemon.metrics``)."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self._lock = threading.Lock()  # the counters below
        self._queue: deque[tuple] = deque()  # call records not folded in yet
        self._append = self._queue.append
        self._starts = itertools.count()  # calls started (C-level: atomic without a lock)
        self._finished = 0  # calls started and folded in
        self._max_series = max_series
        self._series: dict[tuple[str, str], _Series] = {}
        # the series of each record key seen (a skill given as a path tuple, a label to cut)
        self._aliases: dict[tuple[Any, str], _Series] = {}
        self._connections: dict[str, int] = {}  # open now, by listener
        self._accepted: dict[str, int] = {}  # since start, by listener
        self._refused: dict[str, int] = {}  # refused handshakes, by listener

    # -- skill calls ---------------------------------------------------------------------------
    # The hot path only appends to a deque (atomic, no lock, little memory touched: it runs in
    # the middle of every call); the records are folded into the counters in batches by
    # ``fold``: the core's main loop, whoever reads the counters, or the MAX_QUEUED-th call.
    # A record is (skill, caller, nanoseconds, error type name or None, bytes in, bytes out,
    # started); the skill is a dotted str, a path tuple (dotted when folded) or None (UNRESOLVED).
    def recorder(self) -> tuple[Callable[[], int], Callable[[tuple], None]]:
        """``(start, record)`` for a server's hot path, both C functions: ``start()`` counts a
        call as started and returns how many were started before it (fold, without waiting,
        when that is a multiple of FOLD_EVERY); ``record(record)`` queues its record (above)."""
        return self._starts.__next__, self._append

    def call_started(self) -> None:
        """A call begins (every ``call_started`` is followed by one ``observe_call``)."""
        next(self._starts)

    def observe_call(
        self,
        skill_path: str,
        caller: str,
        seconds: float,
        error: str | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        *,
        started: bool = True,
    ) -> None:
        """A call of ``skill_path`` (dotted, without ``aigis.``) by ``caller`` ended after
        ``seconds``, raising an exception of type ``error`` (its class name) or not, with
        ``bytes_in`` bytes of request and ``bytes_out`` of reply. ``started``: whether
        ``call_started`` was called for it (the in-flight gauge)."""
        self._append(
            (skill_path, caller, round(seconds * 1e9), error, bytes_in, bytes_out, started)
        )
        if len(self._queue) >= MAX_QUEUED:
            self.fold(wait=False)

    def fold(self, wait: bool = True) -> None:
        """Fold the call records queued so far into the counters, off the calls' path (the
        core's main loop does it every tick; readers do it first). ``wait``: even if another
        thread is folding; else leave them to it."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            popleft, series_of, finished = self._queue.popleft, self._aliases.get, 0
            for _ in range(len(self._queue)):  # what is queued now: bounded work
                skill, caller, nanoseconds, error, bytes_in, bytes_out, started = popleft()
                finished += started
                series = series_of((skill, caller))
                if series is None:
                    series = self._add(skill, caller)
                series.calls += 1
                series.nanoseconds += nanoseconds
                series.buckets[bisect_left(_BOUNDS_NS, nanoseconds)] += 1
                series.bytes_in += bytes_in
                series.bytes_out += bytes_out
                if error is not None:
                    errors = series.errors
                    if error not in errors and len(errors) >= MAX_ERROR_TYPES:
                        error = OVERFLOW
                    errors[error] = errors.get(error, 0) + 1
            self._finished += finished
        finally:
            self._lock.release()

    def _add(self, skill: str | tuple[str, ...] | None, caller: str) -> _Series:
        """The series of a record key not seen yet (lock held): the pair with its labels dotted
        and cut, or the overflow pair once MAX_SERIES exist; remembered for the next record."""
        if skill is None:
            name = UNRESOLVED
        elif type(skill) is tuple:
            name = ".".join(map(str, skill))
        else:
            name = str(skill)
        cut = (label(name), label(caller))
        series = self._series.get(cut)
        if series is None and len(self._series) >= self._max_series:
            cut = (OVERFLOW, OVERFLOW)
            series = self._series.get(cut)
        if series is None:
            series = self._series[cut] = _Series()
        if len(self._aliases) >= _MAX_ALIASES:
            self._aliases.clear()  # bounded, whatever paths callers make up
        self._aliases[(skill, caller)] = series
        return series

    # -- connections ---------------------------------------------------------------------------
    def connection_opened(self, listener: str) -> None:
        """A peer connected to ``listener`` (``control``, ``unix``, ``tcp``, ``http``)."""
        with self._lock:
            self._connections[listener] = self._connections.get(listener, 0) + 1
            self._accepted[listener] = self._accepted.get(listener, 0) + 1

    def connection_closed(self, listener: str) -> None:
        """A connection to ``listener`` ended."""
        with self._lock:
            self._connections[listener] = self._connections.get(listener, 0) - 1

    def handshake_refused(self, listener: str) -> None:
        """A peer of ``listener`` was refused (bad key, malformed greeting, too many peers)."""
        with self._lock:
            self._refused[listener] = self._refused.get(listener, 0) + 1

    # -- reading -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Every counter as plain data (JSON-ready), consistent at one instant."""
        self.fold()
        with self._lock:
            skills = [
                {
                    "skill": skill,
                    "caller": caller,
                    "calls": s.calls,
                    "seconds": s.nanoseconds / 1e9,
                    "buckets": list(s.buckets),
                    "errors": dict(s.errors),
                    "bytes_in": s.bytes_in,
                    "bytes_out": s.bytes_out,
                }
                for (skill, caller), s in self._series.items()
            ]
            return {
                "bounds": list(BUCKETS),
                "skills": skills,
                "in_flight": max(0, _count(self._starts) - self._finished),
                "connections": dict(self._connections),
                "accepted": dict(self._accepted),
                "refused": dict(self._refused),
            }


def _count(counter: itertools.count) -> int:
    """How many values ``counter`` gave so far, without taking one (its repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile (0..1) of a histogram of per-bucket ``counts`` (the last one +Inf),
    interpolated linearly inside the bucket as Prometheus' ``histogram_quantile`` does; None
    when it is empty. A quantile in the +Inf bucket is the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * max(0.0, rank - seen) / count
        seen += count
    return bounds[-1]


def merged(skills: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The snapshot's per-(skill, caller) rows summed per skill: calls, seconds, buckets,
    errors (total), bytes."""
    out: dict[str, dict[str, Any]] = {}
    for row in skills:
        into = out.get(row["skill"])
        if into is None:
            into = out[row["skill"]] = {
                "skill": row["skill"],
                "calls": 0,
                "seconds": 0.0,
                "buckets": [0] * len(row["buckets"]),
                "errors": 0,
                "bytes_in": 0,
                "bytes_out": 0,
            }
        into["calls"] += row["calls"]
        into["seconds"] += row["seconds"]
        into["buckets"] = [a + b for a, b in zip(into["buckets"], row["buckets"])]
        into["errors"] += sum(row["errors"].values())
        into["bytes_in"] += row["bytes_in"]
        into["bytes_out"] += row["bytes_out"]
    return out
