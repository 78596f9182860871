"""The embedded supervisor with hundreds of real processes: threads, stop time, open files."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from aigis._supervise.base import ProcessSpec, State
from aigis._supervise.procs import FDS_PER_PLUGIN
from tests.integration.test_embedded import make_sup, uid, wait_for  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

#: Exits 1 s after SIGTERM (a plugin that tidies up); its sleeps are in its process group.
SLOW_STOP = "trap 'sleep 1; exit 0' TERM; while :; do sleep 600 & wait $!; done"


def os_threads() -> int:
    """Threads of this process as the kernel counts them (Python's count could miss some)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


def sleepers(sup, names: list[str], cwd: Path, argv: tuple[str, ...] = ("sleep", "600")) -> None:
    for name in names:
        sup.add(ProcessSpec(name, "external", argv, cwd, startsecs=0, stop_timeout=20))
    wait_for(
        sup,
        "every plugin running",
        lambda: all(s.state is State.RUNNING and s.pid for s in sup.status(names)),
        timeout=120,
    )


def test_threads_do_not_grow_with_the_number_of_plugins(make_sup, tmp_path, uid):  # noqa: F811
    """Each plugin cost a log-reader thread: 1,000 plugins, 1,003 threads."""
    counts = {}
    for n in (2, 200):
        sup = make_sup()
        names = [f"t{n}-{i}-{uid}" for i in range(n)]
        sleepers(sup, names, tmp_path)
        counts[n] = (threading.active_count(), os_threads())
        sup.stop_all([names])
        sup.close()
    assert counts[200] == counts[2]


def test_a_step_of_200_slow_stoppers_stops_side_by_side(make_sup, tmp_path, uid):  # noqa: F811
    """Shutdown stopped plugins one at a time; 200 plugins taking 1 s each would take 200 s."""
    sup = make_sup()
    names = [f"slow-{i}-{uid}" for i in range(200)]
    sleepers(sup, names, tmp_path, ("sh", "-c", SLOW_STOP))
    started = time.monotonic()
    sup.stop_all([names])
    took = time.monotonic() - started
    rows = sup.status()
    assert {s.state for s in rows} == {State.STOPPED}
    # Every one had its own SIGTERM and took its second: none needed SIGKILL.
    assert {s.reason for s in rows} == {"stopped by request (last: exit 0)"}
    assert took < 30, f"stopping 200 plugins that take 1 s each took {took:.1f} s"


def test_more_plugins_than_the_default_open_files_limit_allows(tmp_path):
    """With `ulimit -n 1024` the embedded supervisor failed at plugin 505 (Too many open files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open files limit ({hard}) leaves no room to raise")
    count = 600
    script = textwrap.dedent(
        f"""
        import logging, resource, sys, time
        from pathlib import Path
        from aigis._supervise.base import ProcessSpec, State
        from aigis._supervise.embedded import EmbeddedSupervisor
        from tests.conftest import settings_for
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("aigis._supervise.embedded").setLevel(logging.WARNING)
        tmp = Path({str(tmp_path)!r})
        sup = EmbeddedSupervisor(settings_for(tmp, state_dir=tmp), console=None)
        names = [f"n{{i}}" for i in range({count})]
        for name in names:
            sup.add(ProcessSpec(name, "external", ("sleep", "600"), tmp, startsecs=0))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = sum(s.state is State.RUNNING for s in sup.status())
            if running == len(names):
                break
            time.sleep(0.05)
        print("running", running, "soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        sup.stop_all([names])
        sup.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert proc.stdout.split() == ["running", str(count), "soft", str(target)], proc.stderr[-3000:]
    room = (target - 64) // FDS_PER_PLUGIN
    assert (
        f"raised: open files limit 1024 -> {target}: room for about {room} plugins "
        f"({FDS_PER_PLUGIN} fds each)"
    ) in proc.stderr
