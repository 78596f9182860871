"""Who may wait in the handshake: pending budgets per listener and per peer, and refusal logs.

Pure: connections are opaque keys and time is passed in. When a budget is full, the OLDEST
pending connection of that listener (or peer) makes room: an idle flood then only delays a real
client by one handshake, where refusing newcomers would lock every client out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator


class Admission:
    """Unauthenticated connections, in arrival order, capped per listener and per peer."""

    def __init__(self, per_listener: int, per_peer: int) -> None:
        if per_listener < 1 or per_peer < 1:
            raise ValueError("pending budgets must be at least 1")
        self.per_listener = per_listener
        self.per_peer = per_peer
        self._listeners: dict[Hashable, dict[Hashable, Hashable]] = {}  # conn -> peer, in order
        self._peers: dict[tuple[Hashable, Hashable], dict[Hashable, None]] = {}
        self.pending = 0  # all listeners together (a plain attribute: the I/O loop reads it)

    def admit(self, conn: Hashable, listener: Hashable, peer: Hashable) -> list[Hashable]:
        """Add ``conn``; return the connections evicted to make room (oldest first)."""
        pending = self._listeners.setdefault(listener, {})
        mine = self._peers.setdefault((listener, peer), {})
        pending[conn] = peer
        mine[conn] = None
        self.pending += 1
        evicted = []
        while len(mine) > self.per_peer:
            oldest = next(iter(mine))
            self.release(oldest, listener)
            evicted.append(oldest)
        while len(pending) > self.per_listener:
            oldest = next(iter(pending))
            self.release(oldest, listener)
            evicted.append(oldest)
        return evicted

    def release(self, conn: Hashable, listener: Hashable) -> None:
        """``conn`` is no longer pending (authenticated, refused or closed); idempotent."""
        pending = self._listeners.get(listener)
        if pending is None or conn not in pending:
            return
        peer = pending.pop(conn)
        self.pending -= 1
        mine = self._peers[(listener, peer)]
        del mine[conn]
        if not mine:
            del self._peers[(listener, peer)]

    def oldest(self) -> Iterator[Hashable]:
        """The oldest pending connection of each listener (their deadlines come first)."""
        for pending in self._listeners.values():
            if pending:
                yield next(iter(pending))

    def __len__(self) -> int:
        return self.pending

    def count(self, listener: Hashable) -> int:
        """Pending connections on ``listener``."""
        return len(self._listeners.get(listener, ()))


class RefusalLog:
    """At most ``burst`` refusal lines per ``window`` seconds; the rest are only counted."""

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._started = float("-inf")
        self._logged = 0
        self._suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether to log this refusal, and how many earlier ones went unlogged (to report now).

        The unlogged count is returned once, when a new window opens.
        """
        unreported = 0
        if now - self._started >= self.window:
            unreported, self._suppressed = self._suppressed, 0
            self._started, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            return True, unreported
        self._suppressed += 1
        return False, unreported

    def flush(self) -> int:
        """Refusals not logged and not yet reported (reported now, e.g. on stop)."""
        unreported, self._suppressed = self._suppressed, 0
        return unreported
