"""AIGIS against supervisord and circus, N trivial external plugins each: ``make bench``.

    .venv/bin/python -m benchmarks.run [--n 0,10,100,1000] [--rounds R] [--no-proxy] [--systemd]

For every N (interleaved: each round visits every N, and at each N every tool, in a rotating
order) it launches each tool with N ``sleep`` plugins and measures, by watching the process table:
launch -> all running, supervisor RSS and threads, status command wall time, restart after
kill -9, restart of one plugin via the control command, SIGTERM -> all gone. Then it runs
``bench_proxy.py`` and ``bench_tls.py``. It prints one table per measure, with AIGIS / peer
ratios from this run, and a Markdown summary. Numbers from a shared machine: read the ratios,
not the absolutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fleet import proctable, report  # noqa: E402
from benchmarks.fleet.measure import Result, measure  # noqa: E402
from benchmarks.fleet.peers import ensure_peers  # noqa: E402
from benchmarks.fleet.tools import (  # noqa: E402
    LEFTOVER_PATTERN,
    Tool,
    sleep_path,
    write_aigis,
    write_circus,
    write_supervisord,
)

TOOLS = ("AIGIS", "supervisord", "circus")
MARKER_KEY = "AIGIS_BENCH_RUN"


def parse_ns(text: str) -> list[int]:
    """``"0,10,1_000"`` -> [0, 10, 1000]."""
    try:
        ns = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n: expected numbers (10,100), got {text!r}") from None
    if not ns or any(n < 0 or n > 9999 for n in ns):
        raise argparse.ArgumentTypeError(f"--n: each N must be 0..9999, got {text!r}")
    return ns


def parse_tools(text: str) -> list[str]:
    """``"AIGIS,circus"`` -> the tools in their canonical order."""
    wanted = {t.strip().lower() for t in text.split(",") if t.strip()}
    unknown = wanted - {t.lower() for t in TOOLS}
    if unknown:
        raise argparse.ArgumentTypeError(f"--tools: unknown {sorted(unknown)}; pick from {TOOLS}")
    return [t for t in TOOLS if t.lower() in wanted]


def build_parser() -> argparse.ArgumentParser:
    """The runner's command line."""
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=parse_ns, default=[0, 10, 100, 1000], help="plugin counts")
    parser.add_argument("--rounds", type=int, default=1, help="visits of every N (median kept)")
    parser.add_argument("--tools", type=parse_tools, default=list(TOOLS), help="which tools")
    parser.add_argument(
        "--no-proxy", action="store_true", help="skip bench_proxy.py and bench_tls.py"
    )
    parser.add_argument(
        "--systemd", action="store_true", help="also the AIGIS systemd backend, in a systemd box"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit (capped at 2**20); every tool
    inherits it, so none is favoured (supervisord would otherwise raise its own to ``minfds``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(target, soft)


def rotate(items: list[str], k: int) -> list[str]:
    """``items`` rotated left by ``k``: each visit starts with a different tool."""
    k %= len(items) or 1
    return items[k:] + items[:k]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGINT too: a shell starting us in the background leaves it ignored
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    venv = Path(sys.executable).parent.parent
    peers_venv = ROOT / "benchmarks" / ".venv-peers"
    versions = ensure_peers(peers_venv) if set(args.tools) - {"AIGIS"} else {}
    nofile = raise_nofile()
    sleep = sleep_path()
    token = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, MARKER_KEY: token, "PYTHONUNBUFFERED": "1"}
    base = Path(tempfile.mkdtemp(prefix="aigis-bench-"))
    writers: dict[str, Callable[[Path, int], Tool]] = {
        "AIGIS": lambda d, n: write_aigis(d, n, sleep, venv),
        "supervisord": lambda d, n: write_supervisord(d, n, sleep, peers_venv, nofile),
        "circus": lambda d, n: write_circus(d, n, sleep, peers_venv),
    }
    _print_context(args, versions, nofile)
    results: list[Result] = []
    settings: dict[str, str] = {}
    interrupted = False
    try:
        for rnd in range(args.rounds):
            for k, n in enumerate(args.n):
                for tool_name in rotate(list(args.tools), rnd + k):
                    workdir = base / f"r{rnd}-n{n}-{tool_name}"
                    workdir.mkdir(parents=True)
                    tool = writers[tool_name](workdir, n)
                    settings[tool.name] = tool.restart_delay
                    print(f"measuring: {tool_name} N={n} (round {rnd + 1})", flush=True)
                    result = measure(tool, n, workdir, env, sleep)
                    for error in result.errors:
                        print(f"  failed: {error}", flush=True)
                    results.append(result)
        if args.systemd:
            from benchmarks.fleet.systemd_box import measure_systemd

            results += measure_systemd([n for n in args.n if n], venv, sleep, base)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up, then printing what was measured", file=sys.stderr)
    finally:
        leftovers = _sweep(token)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    tools = list(args.tools) + (["AIGIS systemd"] if args.systemd else [])
    _print_tables(results, tools, settings)
    if leftovers:
        print(f"\nleftover processes after the run (killed): {leftovers}", file=sys.stderr)
    if interrupted:
        return 130
    if not args.no_proxy:
        _run_proxy_bench(venv)
    return 1 if leftovers else 0


def _print_context(args: argparse.Namespace, versions: dict[str, str], nofile: int) -> None:
    from aigis import __version__

    peers = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(
        f"# AIGIS {__version__} vs {peers or 'no peers'} on {platform.node()}: "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"python {platform.python_version()}\n"
        f"# N = {args.n}, rounds = {args.rounds}; open-file soft limit {nofile} for every tool "
        f"(supervisord minfds = {nofile}); plugins are `sleep`; AIGIS plugins pre-fetched into "
        f"its state dir; restart delay 0 where settable; each tool's output to a file",
        flush=True,
    )


def _print_tables(results: list[Result], tools: list[str], settings: dict[str, str]) -> None:
    print(f"\n# Results (load average now {os.getloadavg()[0]:.2f}; a shared machine: medians)\n")
    for tool, delay in settings.items():
        print(f"- {tool}: restart delay {delay}")
    print()
    for m in report.MEASURES:
        if any(m.value(r) is not None for r in results):
            print(report.measure_table(m, results, tools) + "\n")
    print("## Summary (Markdown)\n")
    print(report.summary_table(results, tools))
    errors = [f"{r.tool} N={r.n}: {e}" for r in results for e in r.errors]
    if errors:
        print("\nFailures:\n" + "\n".join(f"- {e}" for e in errors))


def _sweep(token: str) -> list[int]:
    """Kill whatever still carries this run's marker; then check no plugin ``sleep`` is left."""
    left = proctable.with_environ(f"{MARKER_KEY}={token}")
    proctable.kill_all(left)
    deadline = time.monotonic() + 10
    while any(proctable.alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    pgrep = subprocess.run(["pgrep", "-f", LEFTOVER_PATTERN], capture_output=True, text=True)
    print(f"\nchecked: pgrep -f '{LEFTOVER_PATTERN}' -> {pgrep.stdout.split() or 'none'}")
    return [p.pid for p in left]


def _run_proxy_bench(venv: Path) -> None:
    print("\n# Proxy benchmark (benchmarks/bench_proxy.py)\n", flush=True)
    try:
        subprocess.run(
            [str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "bench_proxy.py")],
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print("failed: bench_proxy.py did not finish within 900 s", file=sys.stderr)
    print("\n# Proxy over TCP with TLS (benchmarks/bench_tls.py)\n", flush=True)
    try:
        subprocess.run(
            [str(venv / "bin" / "python"), str(ROOT / "benchmarks" / "bench_tls.py")],
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print("failed: bench_tls.py did not finish within 600 s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
