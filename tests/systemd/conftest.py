"""Fixtures booting a real systemd "box" (see box.py). Tests here are marked ``systemd``.

They skip when not root or without /lib/systemd/systemd, except under CI (``CI=true``), where
that is a failure: CI machines are root with systemd installed.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .box import SYSTEMD, Box, reap_stale_boxes


def _require_box_support() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "systemd box tests need root"
    elif not SYSTEMD.exists():
        reason = f"systemd box tests need {SYSTEMD}"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI must run them", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _box_session() -> Iterator[None]:
    """Once per session: reap boxes of killed earlier runs; guard the host's /tmp with a canary."""
    _require_box_support()
    reap_stale_boxes()
    canary = Path(f"/tmp/aigis-canary-{secrets.token_hex(6)}")
    canary.write_text("boxes must never wipe the host's /tmp\n")
    yield
    assert canary.exists(), f"{canary} vanished: a box wiped the host's /tmp. STOP."
    canary.unlink()


def _finish(box: Box) -> None:
    """Save the box's journal into its work directory (for failure reports), then shut down."""
    try:
        if box.pid:
            (box.workdir / "journal.txt").write_text(box.journal(None, "-o", "short-monotonic"))
    finally:
        box.shutdown()


@pytest.fixture
def boot_box(_box_session: None, tmp_path: Path) -> Iterator[Callable[..., Box]]:
    """``boot_box(net=False, timeout=30, overlay_usr=False) -> Box``: boot any number of boxes,
    each in its own directory under tmp_path; all are shut down at teardown."""
    boxes: list[Box] = []
    numbers = itertools.count(1)  # thread-safe: tests may boot boxes in parallel

    def boot(*, net: bool = False, timeout: float = 30, overlay_usr: bool = False) -> Box:
        workdir = tmp_path / f"box{next(numbers)}"
        box = Box.boot(workdir, net=net, timeout=timeout, overlay_usr=overlay_usr)
        boxes.append(box)
        return box

    yield boot
    errors = []
    for box in boxes:
        try:
            _finish(box)
        except Exception as e:  # shut down the others anyway
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def box(boot_box: Callable[..., Box]) -> Box:
    """A freshly booted box for this test (shut down afterwards)."""
    return boot_box()


@pytest.fixture(scope="module")
def module_box(_box_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """One box shared by a module's tests: cheaper, but tests must not depend on its state."""
    box = Box.boot(tmp_path_factory.mktemp("module-box"))
    try:
        yield box
    finally:
        _finish(box)
