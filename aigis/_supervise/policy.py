"""The restart policy as a pure function: after an exit, restart (when), give up, or rest."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from aigis._states import State


class Action(enum.StrEnum):
    """What to do after a plugin's main process exited."""

    RESTART = "restart"  # wait ``delay`` seconds in BACKOFF, then spawn again
    GIVE_UP = "give up"  # FAILED
    EXITED = "exited"  # clean exit 0: EXITED, not restarted
    STOPPED = "stopped"  # the exit was asked for: STOPPED


@dataclass(frozen=True)
class Decision:
    """The policy's answer: an action, the delay before a restart and a reason for humans."""

    action: Action
    reason: str
    delay: float = 0.0
    detail: str = ""  # the reason without the verb, for a ``gave up: NAME <detail>`` log line

    @property
    def state(self) -> State:
        """The state the plugin enters."""
        return {
            Action.RESTART: State.BACKOFF,
            Action.GIVE_UP: State.FAILED,
            Action.EXITED: State.EXITED,
            Action.STOPPED: State.STOPPED,
        }[self.action]


def describe_exit(returncode: int) -> str:
    """``exit 1`` for an exit code, ``signal 9 (SIGKILL)`` for subprocess's negative codes."""
    if returncode >= 0:
        return f"exit {returncode}"
    signum = -returncode
    try:
        return f"signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"


def backoff_delay(restarts: int, base: float, cap: float) -> float:
    """Delay before restart number ``restarts + 1``: base, 2*base, 4*base, ... at most ``cap``."""
    # The exponent is clamped because 2.0**1024 overflows; a huge RESTART must not crash the loop.
    return min(base * 2.0 ** min(restarts, 64), cap)


def decide(
    *,
    returncode: int,
    restart_limit: int | None,
    restarts: int,
    stop_requested: bool,
    base_delay: float,
    max_delay: float,
    while_starting: bool = False,
) -> Decision:
    """Decide what follows an exit; ``restarts`` is how many restarts were already done."""
    last = describe_exit(returncode)
    if while_starting:
        last += " while starting"
    if stop_requested:
        return Decision(Action.STOPPED, f"stopped by request (last: {last})")
    # A clean exit is a finished job, not a failure, even before startsecs: systemd's
    # Restart=on-failure agrees, so both backends behave the same.
    if returncode == 0:
        return Decision(Action.EXITED, "exited cleanly (exit 0)")
    if restart_limit is None:
        reason = f"{last}; not restarted (RESTART not set)"
        return Decision(Action.GIVE_UP, reason, detail=reason)
    if restarts >= restart_limit:
        noun = "restart" if restarts == 1 else "restarts"
        detail = f"after {restarts} {noun} (last: {last})"
        return Decision(Action.GIVE_UP, f"gave up {detail}", detail=detail)
    delay = backoff_delay(restarts, base_delay, max_delay)
    return Decision(
        Action.RESTART, f"{last}; restart {restarts + 1}/{restart_limit} in {delay:g}s", delay
    )
