"""AIGIS's systemd backend with N plugins, inside a systemd box (``tests/systemd/box.py``, the
only way this project boots systemd): start to all units running, footprint, ``aigisctl status
--json``, the backend's read of all unit states, restart after kill -9, SIGTERM (``systemctl
stop aigis``) to all gone.

The core runs as ``aigis.service`` from packaging/systemd, its ExecStart the checkout's venv, as
in tests/systemd/test_service.py. Commands inside the box go through nsenter; its own cost (a
``true`` through the same path, median of 5) is subtracted from the control command timings.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.fleet.measure import (
    Result,
    Watch,
    reload_one,
    restarts_after_kill,
    until_gone,
)
from benchmarks.fleet.proctable import footprint
from benchmarks.fleet.tools import aigis_config, aigis_manifest, plugin_name

if TYPE_CHECKING:
    from tests.systemd.box import Box

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "packaging" / "systemd"
NAME = "AIGIS systemd"


def measure_systemd(ns: list[int], venv: Path, sleep: str, base: Path) -> list[Result]:
    """One box per N; every box shut down (which kills all inside it) whatever happens."""
    from tests.systemd.box import Box, BoxError, reap_stale_boxes  # noqa: F811 - at run time

    reap_stale_boxes()
    results = []
    for n in ns:
        print(f"measuring: {NAME} N={n}", flush=True)
        result = Result(NAME, n)
        box = None
        try:
            box = Box.boot(base / f"systemd-n{n}")
            _measure(box, n, venv, sleep, result)
        except (BoxError, TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
            result.errors.append(str(exc).splitlines()[0])
        finally:
            if box is not None:
                box.shutdown()
        for error in result.errors:
            print(f"  failed: {error}", flush=True)
        results.append(result)
    return results


def _config_text(n: int, changed: int | None = None) -> str:
    """The embedded benchmark's config with the systemd backend and the packaged state dir.
    Plugins run as root (still sandboxed): an account per plugin costs a systemd-sysusers run
    each (about 15 ms) and Debian's system uid range ends at 999, short of 1,000 plugins."""
    text = aigis_config(n, changed)
    for line in ('state_dir = "state"\n', 'runtime_dir = "run"\n', 'supervisor = "embedded"\n'):
        text = text.replace(line, "")
    head, plugins = text.split("[external]\n")
    plugins = re.sub(r'(?m)^(\S+) = ("\S+")$', r'\1 = { source = \2, user = "root" }', plugins)
    head = head.replace("[aigis]\n", '[aigis]\nsupervisor = "systemd"\n')
    return f"{head}[external]\n{plugins}"


def _install(box: Box, workdir: Path, n: int, venv: Path, sleep: str) -> Path:
    """aigis.service and its template, a drop-in running this tree's venv, and a config of ``n``
    external plugins, pre-fetched into the state directory; the config's path."""
    config = workdir / "aigis" / "aigis.toml"
    for i in range(n):
        source = workdir / "aigis" / "plugins" / plugin_name(i) / "AIGIS"
        source.mkdir(parents=True)
        (source / "AIGIS.config").write_text(aigis_manifest(i, sleep))
        box.write(
            f"/var/lib/aigis/ext/{plugin_name(i)}/AIGIS/AIGIS.config", aigis_manifest(i, sleep)
        )
    config.write_text(_config_text(n))
    for unit in ("aigis.service", "aigis-plugin@.service"):
        box.write(f"/etc/systemd/system/{unit}", (UNITS / unit).read_text())
    box.run("groupadd", "--system", "aigis")
    dropin = f"""\
        [Service]
        ExecStart=
        ExecStart={venv}/bin/python -m aigis -c {config}
        BindPaths={config.parent}
        BindReadOnlyPaths={REPO}
        """
    box.write("/etc/systemd/system/aigis.service.d/50-bench.conf", textwrap.dedent(dropin))
    box.run("systemctl", "daemon-reload")
    return config


def _backend_status(box: Box, n: int, rounds: int = 5) -> list[float]:
    """Seconds to read the states of the N plugin units as the backend's status does, over the
    box's bus from the host (one connection, a first read as the core's after start)."""
    from aigis._supervise.dbus import Systemd
    from aigis._supervise.units import unit_name

    units = [unit_name(plugin_name(i)) for i in range(n)]
    bus = Systemd(box.bus_address)
    try:
        bus.states(units)
        times = []
        for _ in range(rounds):
            start = time.monotonic()
            states = bus.states(units)
            times.append(time.monotonic() - start)
        running = sum(s.active_state == "active" for s in states)
        print(f"  backend status: {running}/{n} units active", flush=True)
        return times
    finally:
        bus.close()


def _measure(box: Box, n: int, venv: Path, sleep: str, result: Result) -> None:
    from tests.systemd.host import alive as box_alive

    settle = 60.0 + 0.3 * n
    config = _install(box, box.workdir, n, venv, sleep)
    pid, pid_start = box.pid, box.pid_start
    watch = Watch(NAME, pid, sleep, lambda: box_alive(pid, pid_start))
    run = box.run

    def timed(*argv: str) -> float:
        start = time.monotonic()
        run(*argv, timeout=settle)
        return time.monotonic() - start

    nsenter = statistics.median(timed("true") for _ in range(5))
    print(f"  nsenter overhead {1000 * nsenter:.0f} ms (subtracted from ctl timings)", flush=True)
    ctl = (f"{venv}/bin/aigisctl", "-c", str(config))

    start = time.monotonic()
    run("systemctl", "start", "aigis", timeout=settle)  # Type=notify: returns after READY=1
    watch.wait_all(n, settle)
    result.start_s = time.monotonic() - start
    result.status_s = [max(0.0, timed(*ctl, "status", "--json") - nsenter) for _ in range(5)]
    result.backend_status_s = _backend_status(box, n)
    watch.table.scan()  # plugins() forgot the non-plugin processes (the core among them)
    core = [p for p in watch.table.descendants(pid) if str(config) in p.argv and "-m" in p.argv]
    if core and (fp := footprint(core[0].pid)) is not None:
        result.rss_mib, result.threads = fp.rss_mib, fp.threads
    result.restart_s = restarts_after_kill(watch, 10, n, settle)
    for i in range(3):
        old = watch.plugins()[i]
        begin = time.monotonic()
        run(*ctl, "restart", plugin_name(i), timeout=settle)
        watch.wait_replaced(old, i, settle)
        result.restart_one_s.append(time.monotonic() - begin - nsenter)
    change = _config_text(n, changed=0)
    result.reload_one_s = (
        reload_one(
            watch,
            n,
            lambda: config.write_text(change),
            lambda: run(*ctl, "reload", timeout=settle),
            settle,
        )
        - nsenter
    )
    children = list(watch.plugins().values())
    start = time.monotonic()
    run("systemctl", "stop", "--no-block", "aigis", timeout=settle)
    until_gone(NAME, children, start + settle)
    result.stop_s = time.monotonic() - start
    deadline = start + settle
    while run("systemctl", "is-active", "aigis", check=False).stdout.strip() not in (
        "inactive",
        "failed",
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{NAME}: aigis.service still active {settle:.0f} s after stop")
        time.sleep(0.05)
    result.exit_s = time.monotonic() - start
