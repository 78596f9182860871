"""Fixtures for integration tests: daemons that are always killed at the end."""

from __future__ import annotations

import pytest

from tests.integration.daemon import DaemonProcess


@pytest.fixture
def daemons():
    """A list to append started DaemonProcess objects to; each is killed in the finalizer."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.stop()
