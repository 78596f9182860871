"""N internal plugins, each calling a core skill once: launch -> all N have made their first call.

Each plugin's LAUNCH imports ``aigis`` (the proxy), calls ``aigis.arrived(NAME)`` once
and then waits, as a long-running plugin would. The skill, in a core plugin, appends the name to
a file; the figure is the time from launching ``aigis`` until that file names every plugin.
Nearly all of it is interpreter start-up of the plugin runner, so its floor, measured in the
same run, is N bare interpreters (this Python, ``-c``) started one after another from a launcher
in a session of its own, each connecting to a Unix socket and sending its index: the same
processes without AIGIS, scheduled alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The core plugin holding the skill every internal plugin calls.
ARRIVALS = "arrivals"
ARRIVALS_FILE = "arrived.txt"
POLL = 0.01


def internal_name(i: int) -> str:
    """The name of internal plugin ``i``: ``i0007``."""
    return f"i{i:04d}"


# --- files (pure text) ------------------------------------------------------------------------


def internal_config(n: int) -> str:
    """``aigis.toml``: the arrivals core plugin, then ``n`` internal plugins, embedded."""
    lines = [
        "[aigis]",
        'state_dir = "state"',
        'runtime_dir = "run"',
        'secrets_dir = "secrets"',
        'supervisor = "embedded"',
        "",
        "[core]",
        f'{ARRIVALS} = "plugins/{ARRIVALS}"',
        "",
        "[internal]",
    ]
    lines += [f'{internal_name(i)} = "plugins/{internal_name(i)}"' for i in range(n)]
    return "\n".join(lines) + "\n"


ARRIVALS_MANIFEST = '''"""Benchmark: records which internal plugin called."""
PLUGIN_TYPE = "core"
ENTRYPOINT = "{root}"
'''

ARRIVALS_CORE = f'''"""Benchmark skill: ``aigis.arrived(name)`` appends name to a file."""
import os

SKILLS = ["arrived"]
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(_ROOT, "{ARRIVALS_FILE}")


def arrived(name):
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (name + "\\n").encode())
    finally:
        os.close(fd)
    return name
'''

INTERNAL_MANIFEST = '''"""Benchmark: an internal plugin that calls the core once, then waits."""
PLUGIN_TYPE = "internal"
ENTRYPOINT = "{root}"
LAUNCH = "probe"
'''

PROBE = '''"""Call the core once, then wait as a long-running plugin would."""
import os
import threading

import aigis


def launch():
    aigis.arrived(os.environ["AIGIS_PLUGIN"])
    threading.Event().wait()
'''


def write_internal(workdir: Path, n: int, venv: Path) -> tuple[str, ...]:
    """Config and plugins (also pre-fetched into the state dir) in ``workdir``; the launch argv."""
    (workdir / "aigis.toml").write_text(internal_config(n))
    files = {ARRIVALS: {"AIGIS/AIGIS.config": ARRIVALS_MANIFEST, "AIGIS/AIGIS.core": ARRIVALS_CORE}}
    for i in range(n):
        files[internal_name(i)] = {"AIGIS/AIGIS.config": INTERNAL_MANIFEST, "probe.py": PROBE}
    for name, contents in files.items():
        for base in (workdir / "plugins", workdir / "state" / "ext"):
            for rel, text in contents.items():
                path = base / name / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return (str(venv / "bin" / "aigis"), "-c", str(workdir / "aigis.toml"))


def arrivals(workdir: Path) -> set[str]:
    """The plugins that have called so far."""
    try:
        text = (workdir / "state" / "ext" / ARRIVALS / ARRIVALS_FILE).read_text()
    except FileNotFoundError:
        return set()
    return set(text.split())


# --- measuring --------------------------------------------------------------------------------


@dataclass
class InternalResult:
    """Seconds until all ``n`` called (AIGIS) and until all ``n`` bare interpreters connected."""

    n: int
    aigis_s: float | None = None
    floor_s: float | None = None
    error: str | None = None


def measure_aigis(workdir: Path, n: int, venv: Path, env: dict[str, str], timeout: float) -> float:
    """Launch AIGIS with ``n`` internal plugins; seconds until each has made its first call.
    The core gets SIGTERM afterwards (and SIGKILL to its group if it lingers)."""
    argv = write_internal(workdir, n, venv)
    names = {internal_name(i) for i in range(n)}
    with open(workdir / "aigis.out", "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while not names <= arrivals(workdir):
                if time.monotonic() - started > timeout:
                    missing = sorted(names - arrivals(workdir))
                    raise TimeoutError(
                        f"{len(missing)} of {n} internal plugins had not called within "
                        f"{timeout:.0f} s (e.g. {', '.join(missing[:3])}; see {out.name})"
                    )
                if proc.poll() is not None:
                    raise RuntimeError(f"aigis exited ({proc.returncode}); see {out.name}")
                time.sleep(POLL)
            return time.monotonic() - started
        finally:
            _end(proc)


#: One bare plugin: connect, say which one it is, wait for the end.
_BARE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode() + b'\\n')\n"
    "s.recv(1)\n"
)
#: Starts the bare plugins as AIGIS starts its plugins: one after another, each in its own
#: process group of the launcher's session. (A session of its own each would give each one a
#: scheduler autogroup, hence a CPU share of its own on a loaded machine, which AIGIS's plugins,
#: sharing the core's session, do not get: the floor would not be a floor.)
_LAUNCHER = (
    "import subprocess, sys\n"
    "path, n = sys.argv[1], int(sys.argv[2])\n"
    "procs = [subprocess.Popen([sys.executable, '-c', sys.argv[3], path, str(i)],\n"
    "                          stdin=subprocess.DEVNULL, process_group=0) for i in range(n)]\n"
    "for proc in procs:\n"
    "    proc.wait()\n"
)


def measure_floor(workdir: Path, n: int, env: dict[str, str], timeout: float) -> float:
    """``n`` interpreters started one after another by a launcher in a session of its own (as
    the core is), each connecting to a socket and sending its index; seconds until all ``n``
    arrived."""
    path = workdir / "floor.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(n)
        listener.settimeout(timeout)
        started = time.monotonic()
        launcher = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(path), str(n), _BARE],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        conns = []
        try:
            for _ in range(n):
                conn, _ = listener.accept()
                conn.settimeout(timeout)
                conn.recv(16)
                conns.append(conn)
            return time.monotonic() - started
        finally:
            for conn in conns:
                conn.close()  # each bare plugin exits, then the launcher
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the core (it stops its plugins); SIGKILL its session's group after 60 s."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def measure_internal(
    base: Path, n: int, rounds: int, venv: Path, env: dict[str, str]
) -> InternalResult:
    """``rounds`` interleaved pairs (floor, AIGIS); medians kept. The first failure ends it."""
    import statistics

    result = InternalResult(n)
    ours: list[float] = []
    floors: list[float] = []
    timeout = 60.0 + 0.5 * n
    try:
        for rnd in range(rounds):
            print(f"measuring: {n} internal plugins calling (round {rnd + 1})", flush=True)
            workdir = base / f"internal-r{rnd}"
            workdir.mkdir(parents=True)
            floors.append(measure_floor(workdir, n, env, timeout))
            ours.append(measure_aigis(workdir, n, venv, env, timeout))
    except (TimeoutError, RuntimeError, OSError) as exc:
        result.error = str(exc)
    result.aigis_s = statistics.median(ours) if ours else None
    result.floor_s = statistics.median(floors) if floors else None
    return result


def internal_table(result: InternalResult) -> str:
    """One Markdown table: the figure, its floor, the ratio, the goal (<= 3 s at N = 100)."""
    head = "| measure | AIGIS | floor (bare interpreters) | AIGIS / floor | goal | met |"
    rule = "|---|---|---|---|---|---|"
    mine, floor = result.aigis_s, result.floor_s
    ratio = f"{mine / floor:.2f}x" if mine is not None and floor else "-"
    goal, met = "", ""
    if result.n == 100:
        goal, met = "<= 3 s", "yes" if mine is not None and mine <= 3 else "no"
    cells = [
        f"{result.n} internal plugins: launch -> all called once",
        "-" if mine is None else f"{mine:.2f} s",
        "-" if floor is None else f"{floor:.2f} s",
        ratio,
        goal,
        met if mine is not None else "-",
    ]
    return "\n".join([head, rule, "| " + " | ".join(cells) + " |"])
