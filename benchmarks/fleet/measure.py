"""One tool with N plugins, measured: launch -> all running, footprint, status latency, restart
after kill -9, restart of one plugin through the control command, SIGTERM -> all stopped.

Children are found in the process table (descendants of the supervisor whose argv is a plugin's),
never by asking the tool, so every tool is judged by the same observer. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fleet.proctable import Proc, ProcessTable, alive, footprint, kill_all
from benchmarks.fleet.tools import SLEEP_BASE, Tool, plugin_name

POLL = 0.005  # seconds between process-table scans while timing


def coarse_poll(n: int) -> float:
    """The scan interval while waiting for all ``n`` plugins: a scan of a table of thousands of
    processes costs ~2 ms of CPU, which the tools under test need more than the resolution."""
    return POLL + n * 0.00002


CTL_TIMEOUT = 120.0
STEADY = 1.0  # seconds of calm before SIGTERM


@dataclass
class Result:
    """What one tool did with N plugins; None where not measured (or it failed: see errors)."""

    tool: str
    n: int
    start_s: float | None = None
    rss_mib: float | None = None
    threads: int | None = None
    status_s: list[float] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)
    restart_one_s: list[float] = field(default_factory=list)
    reload_one_s: float | None = None
    stop_s: float | None = None
    exit_s: float | None = None
    #: systemd backend only: the states of the N plugin units read over D-Bus as the backend's
    #: status does (a warm read: units that ran on since the last one)
    backend_status_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def plugin_index(proc: Proc, sleep: str) -> int | None:
    """Which plugin ``proc`` is (by its argv), or None when it is not a plugin process."""
    if len(proc.argv) != 2 or proc.argv[0] != sleep or not proc.argv[1].isdigit():
        return None
    return int(proc.argv[1]) - SLEEP_BASE


class Watch:
    """The plugin processes below ``root`` (a supervisor, or a systemd box's PID 1), as the
    process table shows them; ``up`` says whether the watched thing still runs."""

    def __init__(self, name: str, root: int, sleep: str, up: Callable[[], bool]) -> None:
        self.name, self.root, self.sleep, self.up = name, root, sleep, up
        self.table = ProcessTable()
        self.seen: dict[int, Proc] = {}  # every descendant ever seen, for cleanup

    def plugins(self) -> dict[int, Proc]:
        """Scan; the running plugin processes by plugin index."""
        self.table.scan()
        found, pending = {}, set()
        for proc in self.table.descendants(self.root):
            self.seen[proc.pid] = proc
            index = plugin_index(proc, self.sleep)
            if index is None:
                pending.add(proc.pid)  # maybe forked, not yet exec'd: read it again next scan
            else:
                found[index] = proc
        self.table.forget(pending)
        return found

    def wait(
        self,
        done: Callable[[dict[int, Proc]], bool],
        timeout: float,
        what: str,
        interval: float = POLL,
    ) -> float:
        """Poll every ``interval`` until ``done(plugins)``; the time it took. Raises TimeoutError
        naming ``what``."""
        start = time.monotonic()
        while not done(self.plugins()):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{self.name}: {what} not within {timeout:.0f} s")
            if not self.up():
                raise RuntimeError(f"{self.name}: exited while waiting for {what}")
            time.sleep(interval)
        return time.monotonic() - start

    def wait_replaced(self, old: Proc, index: int, timeout: float) -> float:
        """Poll until plugin ``index`` runs as another process than ``old``; the time it took."""

        def replaced(plugins: dict[int, Proc]) -> bool:
            return index in plugins and plugins[index].pid != old.pid

        return self.wait(replaced, timeout, f"{plugin_name(index)} running again")

    def wait_all(self, n: int, timeout: float) -> float:
        """Poll until all ``n`` plugins run; a timeout names the missing ones."""
        try:
            return self.wait(lambda p: len(p) == n, timeout, f"all {n} running", coarse_poll(n))
        except TimeoutError as exc:
            missing = sorted(set(range(n)) - set(self.plugins()))
            names = ", ".join(plugin_name(i) for i in missing[:5])
            raise TimeoutError(f"{exc} ({len(missing)} missing: {names})") from None


def ctl(name: str, argv: Sequence[str]) -> float:
    """Run a control command; its wall time. Raises RuntimeError naming the tool when it fails."""
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=CTL_TIMEOUT)
    wall = time.monotonic() - start
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
        command = " ".join(argv[-2:])
        raise RuntimeError(f"{name}: {command} -> {done.returncode}: {err}")
    return wall


class Run(Watch):
    """A launched tool: its process, its plugin children, and cleanup that leaves nothing."""

    def __init__(self, tool: Tool, workdir: Path, env: dict[str, str], sleep: str) -> None:
        self.tool = tool
        self._log = open(workdir / f"{tool.name}.out", "wb")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            tool.launch,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        super().__init__(tool.name, self.proc.pid, sleep, lambda: self.proc.poll() is None)

    def ctl(self, argv: Sequence[str]) -> float:
        """Run one of the tool's control commands; its wall time."""
        return ctl(self.name, argv)

    def close(self) -> None:
        """Kill the tool's process group and every descendant it ever had; reap it."""
        if self.proc.poll() is None:
            self.plugins()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        kill_all(list(self.seen.values()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def launched(tool: Tool, workdir: Path, env: dict[str, str], sleep: str) -> Iterator[Run]:
    """A running ``tool``, cleaned up on the way out whatever happened (Ctrl-C included)."""
    run = Run(tool, workdir, env, sleep)
    try:
        yield run
    finally:
        run.close()


def measure(
    tool: Tool,
    n: int,
    workdir: Path,
    env: dict[str, str],
    sleep: str,
    restarts: int = 10,
    statuses: int = 5,
    restart_ones: int = 3,
) -> Result:
    """Every measure of ``tool`` with ``n`` plugins, in one launch. The first failure (a bound
    exceeded, a command refused) is recorded in ``errors`` and ends the launch; the figures
    taken before it stand."""
    result = Result(tool.name, n)
    settle = 30.0 + 0.3 * n  # bound for launch and stop: generous, today's AIGIS is slow
    with launched(tool, workdir, env, sleep) as run:
        try:
            if n:
                run.wait_all(n, settle)
                result.start_s = time.monotonic() - run.started
            else:  # idle: up once its control command answers
                _until_ctl_answers(run, settle)
            for _ in range(statuses):
                result.status_s.append(run.ctl(tool.status))
            _sample_footprint(run, result)
            result.restart_s = restarts_after_kill(run, restarts if n else 0, n, settle)
            result.restart_one_s = _restart_ones(run, min(restart_ones, n), settle)
            if n:
                reload = run.tool.reload
                result.reload_one_s = reload_one(
                    run, n, run.tool.change_one, lambda: run.ctl(reload), settle
                )
            # stop from a steady state: the tool answers, and has had a moment to finish
            # bookkeeping after the restarts (circus refuses a stop while a command runs)
            run.ctl(tool.status)
            time.sleep(STEADY)
            _stop(run, result, n, settle)
        except (TimeoutError, RuntimeError, subprocess.TimeoutExpired) as exc:
            result.errors.append(str(exc))
            _sample_footprint(run, result)
    return result


def _until_ctl_answers(run: Run, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            run.ctl(run.tool.status)
            return
        except RuntimeError:
            if time.monotonic() > deadline or run.proc.poll() is not None:
                raise
            time.sleep(0.05)


def _sample_footprint(run: Run, result: Result) -> None:
    if result.rss_mib is None and run.proc.poll() is None:
        fp = footprint(run.proc.pid)
        if fp is not None:
            result.rss_mib, result.threads = fp.rss_mib, fp.threads


def restarts_after_kill(watch: Watch, count: int, n: int, timeout: float) -> list[float]:
    """``count`` times: kill -9 plugin i (0, 1, ... n-1, 0, ...), time until its new process runs;
    seconds each. Every tool is set to restart at once (see tools.py), so this is all overhead."""
    samples = []
    for i in (k % n for k in range(count)):
        old = watch.plugins()[i]
        start = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        watch.wait_replaced(old, i, timeout)
        samples.append(time.monotonic() - start)
        deadline = time.monotonic() + timeout
        while alive(old):  # a zombie until its parent reaps it: let the tool finish that first
            if time.monotonic() > deadline:
                raise TimeoutError(f"{watch.name}: {plugin_name(i)}'s old process not reaped")
            time.sleep(POLL)
    return samples


def _restart_ones(run: Run, count: int, timeout: float) -> list[float]:
    """``CTL restart NAME`` of one plugin among N, until its new process runs; seconds each."""
    samples = []
    for i in range(count):
        old = run.plugins()[i]
        start = time.monotonic()
        run.ctl((*run.tool.restart_one, plugin_name(i)))
        run.wait_replaced(old, i, timeout)
        samples.append(time.monotonic() - start)
    return samples


def reload_one(
    watch: Watch, n: int, change: Callable[[], object], reload: Callable[[], object], timeout: float
) -> float:
    """``change`` plugin 0 in the config, ``reload``, time until plugin 0's new process runs;
    a reload that also restarted any other plugin is an error."""
    before = watch.plugins()
    if len(before) != n:
        raise RuntimeError(f"{watch.name}: {len(before)} of {n} running before the reload")
    change()
    start = time.monotonic()
    reload()
    watch.wait_replaced(before[0], 0, timeout)
    took = time.monotonic() - start
    after = watch.plugins()

    def key(proc: Proc | None) -> tuple[int, int] | None:
        return None if proc is None else (proc.pid, proc.start)

    touched = [plugin_name(i) for i in range(1, n) if key(after.get(i)) != key(before[i])]
    if touched:
        raise RuntimeError(f"{watch.name}: reloading p0000 also restarted {touched[:5]}")
    return took


def until_gone(name: str, children: list[Proc], deadline: float) -> None:
    """Poll until every one of ``children`` is gone; TimeoutError at ``deadline``."""
    interval, left = coarse_poll(len(children)), list(children)
    while True:
        while left and not alive(left[-1]):  # one read per check while the last one lives
            left.pop()
        if not left:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {len(left)} plugins still running after the stop")
        time.sleep(interval)


def _stop(run: Run, result: Result, n: int, timeout: float) -> None:
    """SIGTERM the tool; time until every plugin process is gone, then until the tool exited."""
    children = list(run.plugins().values())
    if len(children) != n:
        raise RuntimeError(f"{run.tool.name}: {len(children)} of {n} running before stop")
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    deadline = start + timeout
    until_gone(run.name, children, deadline)
    if n:
        result.stop_s = time.monotonic() - start
    try:
        run.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        result.exit_s = time.monotonic() - start
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{run.tool.name}: did not exit {timeout:.0f} s after SIGTERM") from None
