"""Pending budgets and refusal log limits of the RPC server (pure logic)."""

from __future__ import annotations

import pytest

from aigis._rpc.admission import Admission, RefusalLog


def test_the_oldest_pending_connection_of_a_listener_makes_room():
    admission = Admission(per_listener=3, per_peer=10)
    assert [admission.admit(n, "unix", ("uid", n)) for n in range(3)] == [[], [], []]
    assert admission.admit(3, "unix", ("uid", 3)) == [0]
    assert admission.admit(4, "unix", ("uid", 4)) == [1]
    assert list(admission.oldest()) == [2]
    assert len(admission) == 3


def test_listeners_have_separate_budgets():
    admission = Admission(per_listener=2, per_peer=10)
    for n in range(5):
        admission.admit(("tcp", n), "tcp", ("host", "10.0.0.1"))
    assert admission.admit("unix-1", "unix", ("uid", 0)) == []
    assert admission.admit("unix-2", "unix", ("uid", 1)) == []
    assert admission.count("unix") == 2
    assert admission.count("tcp") == 2
    assert set(admission.oldest()) == {("tcp", 3), "unix-1"}


def test_one_peer_only_evicts_its_own_connections():
    admission = Admission(per_listener=10, per_peer=2)
    admission.admit("a1", "tcp", "a")
    admission.admit("b1", "tcp", "b")
    admission.admit("a2", "tcp", "a")
    assert admission.admit("a3", "tcp", "a") == ["a1"]
    assert admission.admit("b2", "tcp", "b") == []
    assert admission.count("tcp") == 4


def test_release_is_idempotent_and_frees_the_slot():
    admission = Admission(per_listener=1, per_peer=1)
    admission.admit("x", "unix", 0)
    admission.release("x", "unix")
    admission.release("x", "unix")
    admission.release("never", "tcp")
    assert len(admission) == 0
    assert admission.admit("y", "unix", 0) == []


def test_budgets_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        Admission(per_listener=0, per_peer=1)


def test_refusals_are_logged_in_bursts_then_counted():
    log = RefusalLog(burst=2, window=10.0)
    assert [log.allow(0.0), log.allow(1.0), log.allow(2.0), log.allow(3.0)] == [
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
    ]
    assert log.allow(10.0) == (True, 2)  # a new window reports what went unlogged
    assert log.allow(11.0) == (True, 0)
    assert log.allow(12.0) == (False, 0)
    assert log.flush() == 1
    assert log.flush() == 0
