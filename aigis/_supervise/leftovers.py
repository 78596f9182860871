"""What a dead run left behind (its process group, escapees), looked at until it is gone."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field

from aigis._log import about
from aigis._supervise.procs import Os
from aigis._supervise.treestop import KILL_GRACE

log = logging.getLogger(__name__)


@dataclass
class Leftover:
    """Processes of one dead run: its group, escapees a scan found, SIGKILL at ``kill_at``."""

    tag: str
    groups: set[int]
    kill_at: float
    escapees: set[int] = field(default_factory=set)
    give_up_at: float | None = None  # set once SIGKILL went out

    def describe(self) -> str:
        """``process group 12, pid 34`` for log lines."""
        parts = [f"process group {g}" for g in sorted(self.groups)]
        return ", ".join(parts + [f"pid {p}" for p in sorted(self.escapees)])


def look(os_: Os, name: str, leftovers: list[Leftover], now: float) -> list[Leftover]:
    """One look: forget what is gone, SIGKILL what outlived its deadline, give up (loudly) on
    what outlived SIGKILL; returns what is still there."""
    still = []
    for left in leftovers:
        left.groups = {g for g in left.groups if os_.group_alive(g)}
        left.escapees = {p for p in left.escapees if os_.alive(p)}
        if not left.groups and not left.escapees:
            continue
        if left.give_up_at is None and now >= left.kill_at:
            log.warning(
                'killing: "%s" what the last run left: %s (SIGKILL)',
                name,
                left.describe(),
                **about(name),
            )
            for pgid in left.groups:
                os_.kill_group(pgid, signal.SIGKILL)
            for pid in left.escapees:
                os_.kill(pid, signal.SIGKILL)
            left.give_up_at = now + KILL_GRACE
        elif left.give_up_at is not None and now >= left.give_up_at:
            log.error('failed: "%s" %s survived SIGKILL', name, left.describe(), **about(name))
            continue
        still.append(left)
    return still
