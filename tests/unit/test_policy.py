"""The restart policy as a table: exit, limit and history in, decision out."""

from __future__ import annotations

import pytest

from aigis._supervise.base import State
from aigis._supervise.policy import Action, backoff_delay, decide, describe_exit

BASE, CAP = 1.0, 60.0

# returncode, RESTART, restarts done, stop requested -> action, delay, state, reason
TABLE = [
    (1, None, 0, False, Action.GIVE_UP, 0.0, State.FAILED,
     "exit 1; not restarted (RESTART not set)"),
    (0, None, 0, False, Action.EXITED, 0.0, State.EXITED, "exited cleanly (exit 0)"),
    (0, 5, 0, False, Action.EXITED, 0.0, State.EXITED, "exited cleanly (exit 0)"),
    (0, 5, 5, False, Action.EXITED, 0.0, State.EXITED, "exited cleanly (exit 0)"),
    (1, 0, 0, False, Action.GIVE_UP, 0.0, State.FAILED, "gave up after 0 restarts (last: exit 1)"),
    (1, 2, 0, False, Action.RESTART, 1.0, State.BACKOFF, "exit 1; restart 1/2 in 1s"),
    (1, 2, 1, False, Action.RESTART, 2.0, State.BACKOFF, "exit 1; restart 2/2 in 2s"),
    (1, 2, 2, False, Action.GIVE_UP, 0.0, State.FAILED, "gave up after 2 restarts (last: exit 1)"),
    (1, 1, 1, False, Action.GIVE_UP, 0.0, State.FAILED, "gave up after 1 restart (last: exit 1)"),
    (-9, 3, 0, False, Action.RESTART, 1.0, State.BACKOFF, "signal 9 (SIGKILL); restart 1/3 in 1s"),
    (-15, None, 0, False, Action.GIVE_UP, 0.0, State.FAILED,
     "signal 15 (SIGTERM); not restarted (RESTART not set)"),
    (2, 10, 6, False, Action.RESTART, 60.0, State.BACKOFF, "exit 2; restart 7/10 in 60s"),
    (-15, 3, 0, True, Action.STOPPED, 0.0, State.STOPPED,
     "stopped by request (last: signal 15 (SIGTERM))"),
    (1, 3, 3, True, Action.STOPPED, 0.0, State.STOPPED, "stopped by request (last: exit 1)"),
    (0, 3, 0, True, Action.STOPPED, 0.0, State.STOPPED, "stopped by request (last: exit 0)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("returncode", "limit", "restarts", "stopping", "action", "delay", "state", "reason"), TABLE
)
def test_decide_table(returncode, limit, restarts, stopping, action, delay, state, reason):
    decision = decide(
        returncode=returncode,
        restart_limit=limit,
        restarts=restarts,
        stop_requested=stopping,
        base_delay=BASE,
        max_delay=CAP,
    )
    assert (decision.action, decision.delay, decision.state, decision.reason) == (
        action,
        delay,
        state,
        reason,
    )


def test_exit_while_starting_counts_as_failure_and_says_so():
    decision = decide(
        returncode=3,
        restart_limit=1,
        restarts=1,
        stop_requested=False,
        base_delay=BASE,
        max_delay=CAP,
        while_starting=True,
    )
    assert decision.action is Action.GIVE_UP
    assert decision.reason == "gave up after 1 restart (last: exit 3 while starting)"


def test_clean_exit_while_starting_is_still_clean():
    decision = decide(
        returncode=0,
        restart_limit=3,
        restarts=0,
        stop_requested=False,
        base_delay=BASE,
        max_delay=CAP,
        while_starting=True,
    )
    assert decision.action is Action.EXITED


@pytest.mark.parametrize(
    ("restarts", "base", "cap", "delay"),
    [
        (0, 0.2, 60.0, 0.2),
        (1, 0.2, 60.0, 0.4),
        (2, 0.2, 60.0, 0.8),
        (3, 1.0, 5.0, 5.0),
        (0, 0.0, 60.0, 0.0),
        (0, 10.0, 3.0, 3.0),
        (5000, 1.0, 60.0, 60.0),  # a huge RESTART must not overflow
    ],
)
def test_backoff_doubles_up_to_the_cap(restarts, base, cap, delay):
    assert backoff_delay(restarts, base, cap) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exit 0"),
        (1, "exit 1"),
        (255, "exit 255"),
        (-9, "signal 9 (SIGKILL)"),
        (-15, "signal 15 (SIGTERM)"),
        (-11, "signal 11 (SIGSEGV)"),
        (-99, "signal 99"),
    ],
)
def test_describe_exit(returncode, text):
    assert describe_exit(returncode) == text
