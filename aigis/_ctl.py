"""``aigisctl``: the operator's command line. It talks to the core over the control socket;
``check`` works offline. Exit codes follow LSB: 0 ok, 1 error, 2 usage, 3 not running,
4 not answering (the core accepted the connection but did not answer in time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from aigis._settings import DEFAULT_CONFIG_PATH
from aigis._version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_NOT_ANSWERING = 0, 1, 2, 3, 4


class CtlError(Exception):
    """A failure to report on one line, with its exit code (and the core's error type)."""

    def __init__(self, message: str, code: int = EXIT_ERROR, error: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.error = error


def build_parser() -> argparse.ArgumentParser:
    """The ``aigisctl`` command line."""
    parser = argparse.ArgumentParser(
        prog="aigisctl",
        description="Control and inspect the AIGIS core and its plugins.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 not running, 4 not answering "
        "(wait: $AIGISCTL_TIMEOUT seconds, default 5).",
    )
    parser.add_argument("--version", action="version", version=f"aigisctl {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("AIGIS_CONFIG", DEFAULT_CONFIG_PATH),
        help="config file of the core to talk to (default: $AIGIS_CONFIG or %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        # Accept -c after the command too: `aigisctl check -c PATH`.
        sub.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    check = add("check", "validate a config and its plugin manifests without running anything")
    check.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach each remote host: ssh, python, systemd, free space",
    )
    status = add("status", "show plugins: state, pid, restarts, uptime, reason")
    status.add_argument("names", nargs="*", metavar="NAME")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    for verb in ("start", "stop", "restart"):
        add(verb, f"{verb} one plugin").add_argument("name", metavar="NAME")
    add("reload", "re-read the config and apply only the differences")
    logs = add("logs", "show a plugin's output")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n",
        "--lines",
        type=int,
        default=50,
        metavar="N",
        help="how many recent lines (default 50)",
    )
    skills = add("skills", "list the skills in the aigis namespace")
    skills.add_argument("--json", action="store_true", help="machine-readable output")
    call = add("call", "call a skill: aigisctl call dnd.roll 20")
    call.add_argument("path", metavar="PATH", help="skill path, with or without 'aigis.'")
    call.add_argument(
        "args",
        nargs="*",
        metavar="ARG",
        help="Python literals (strings may be bare); NAME=VALUE for keywords",
    )
    add("shell", "an interactive Python shell with `aigis` connected to the core")
    top = add("top", "live view: plugins' state, CPU, memory; the busiest skills (q quits)")
    top.add_argument(
        "-d",
        "--delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="refresh interval (default 1)",
    )
    top.add_argument(
        "--once", action="store_true", help="print one snapshot (also when not on a terminal)"
    )
    # For the shell completion scripts (not listed): plugin names or skill paths, one a line.
    names = commands.add_parser(
        "_complete",
        description="print the running core's plugin names or skill paths, one a line "
        "(for shell completion; prints nothing and exits 1 when the core is down)",
    )
    names.add_argument("what", choices=("plugins", "skills"))
    names.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# -- talking to the core ----------------------------------------------------------------------
def _settings(args: argparse.Namespace):
    from aigis._config import load_config
    from aigis._errors import ConfigError

    try:
        return load_config(Path(args.config)).settings
    except ConfigError as exc:
        raise CtlError("\n".join(exc.problems)) from None


def _client(args: argparse.Namespace):
    """A proxy client for the plugins' socket (``aigisctl shell``), failing fast."""
    from aigis._errors import AigisError
    from aigis._rpc.client import CoreClient, read_authkey

    settings = _settings(args)
    path = settings.socket
    try:
        os.stat(path)
    except PermissionError:
        raise CtlError(
            f"permission denied: {path} (members of the aigis group, or root, may use aigisctl)"
        ) from None
    except OSError:
        raise CtlError(
            f"the AIGIS core is not running (no socket at {path})", EXIT_NOT_RUNNING
        ) from None
    try:
        authkey = read_authkey(settings.authkey_file)
    except AigisError as exc:
        raise CtlError(str(exc)) from None
    return CoreClient(path, authkey, retry_for=1.0)


def _control(args: argparse.Namespace, operation: str, *call_args: Any, wait: bool = False) -> Any:
    """``operation(*call_args)`` in the core, over the control socket (plain JSON)."""
    from aigis import _ctlclient as client
    from aigis._ctlwire import control_key_path

    settings = _settings(args)
    key = control_key_path(settings.state_dir)
    try:
        return client.request(settings.control_socket, key, operation, list(call_args), wait=wait)
    except client.NotRunning as exc:
        raise CtlError(str(exc), EXIT_NOT_RUNNING) from None
    except client.NotAnswering as exc:
        raise CtlError(str(exc), EXIT_NOT_ANSWERING) from None
    except client.Failed as exc:  # the core's own error: one line
        raise CtlError(str(exc) or exc.error, error=exc.error) from None
    except client.ControlError as exc:  # refused, or not a core we understand
        raise CtlError(str(exc) or type(exc).__name__) from None


# -- commands ----------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    """Validate without starting anything; one line per problem."""
    from aigis._check import check_config
    from aigis._redact import redact

    report = check_config(Path(args.config), connect=args.connect)
    for line in report.errors:
        print(f"error: {redact(line)}", file=sys.stderr)
    for line in report.warnings:
        print(f"warning: {redact(line)}", file=sys.stderr)
    if not args.quiet:
        for line in report.notes:
            print(redact(line))
    if report.errors:
        print(f"{args.config}: {len(report.errors)} problem(s)", file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        print(f"{args.config}: ok")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """A table (or JSON) of plugins; exit 3 when a named plugin is not running. When the core is
    down, say so and show what systemd knows of the plugin units."""
    from aigis._states import UP

    try:
        rows = _control(args, "status", args.names)
    except CtlError as exc:
        down = (EXIT_NOT_RUNNING, EXIT_NOT_ANSWERING)
        if exc.code not in down or not Path("/run/systemd/system").is_dir():
            raise
        print(f"aigisctl: {exc}", file=sys.stderr)
        rows = _rows_from_systemd(args.names)
        if rows and not args.json:
            print("What systemd reports about the plugin units:")
        elif not rows:
            print("systemd knows no AIGIS plugin unit.", file=sys.stderr)
        _print_status(rows, args.json)
        return exc.code
    _print_status(rows, args.json)
    if args.names and not all(row["state"] in UP for row in rows):
        return EXIT_NOT_RUNNING
    return EXIT_OK


def _print_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    """The status table (or JSON) of ``rows``."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from aigis._top import cpu_time, duration, size

    table: list[tuple[str, ...]] = [
        ("NAME", "TYPE", "HOST", "STATE", "PID", "RESTARTS", "UPTIME", "CPU", "MEM", "REASON")
    ]
    for row in rows:
        table.append(
            (
                row["name"],
                row["type"],
                row.get("host") or "-",
                row["state"],
                str(row["pid"] or "-"),
                str(row["restarts"]),
                duration(row["uptime"]),
                cpu_time(row.get("cpu_seconds")),
                size(row.get("memory_bytes")),
                row["reason"] or (row["last_exit"] or ""),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1])


def _rows_from_systemd(names: list[str]) -> list[dict[str, Any]]:
    """Status rows of the ``aigis-plugin@`` units (all, or ``names``) read from systemd."""
    from aigis._status import unit_row
    from aigis._supervise.dbus import Systemd, SystemdError
    from aigis._supervise.units import unit_name
    from aigis._supervise.usage import process_usage, unit_usage

    bus = Systemd(timeout=5.0)
    try:
        units = [unit_name(n) for n in names] or sorted(bus.list_units("aigis-plugin@*"))
        states = bus.states(units)
        running = {s.unit: s for s in states if s.main_pid}
        usage = unit_usage(bus, {unit: unit for unit in running})
    except (OSError, SystemdError) as exc:
        raise CtlError(
            f"cannot ask systemd about the plugin units: {exc}", EXIT_NOT_RUNNING
        ) from None
    finally:
        bus.close()
    # Without cgroup accounting: the unit's main process tree.
    usage.update(process_usage({u: s.main_pid for u, s in running.items() if u not in usage}))
    return [unit_row(unit, usage=usage.get(unit.unit)) for unit in states]


def _verb(args: argparse.Namespace) -> int:
    row = _control(args, args.command, args.name, wait=True)
    print(
        f"{row['name']}: {row['state']}"
        + (f" (pid {row['pid']})" if row.get("pid") else "")
        + (f": {row['reason']}" if row.get("reason") else "")
    )
    return EXIT_OK


cmd_start = cmd_stop = cmd_restart = _verb


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the core to re-read its config; while it works, say on stderr what it is doing."""
    import threading

    done = threading.Event()

    def watch() -> None:
        shown = None
        while not done.wait(1.0):
            try:
                activity = _control(args, "ping").get("activity")
            except CtlError:
                return
            step = activity.rpartition(" (")[0] if activity else None
            if step and step != shown:
                print(f"reloading: {activity}", file=sys.stderr, flush=True)
                shown = step

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        print(f"reloaded: {_control(args, 'reload', wait=True)}")
    finally:
        done.set()
    return EXIT_OK


def cmd_skills(args: argparse.Namespace) -> int:
    """Every skill with its kind and owning plugin."""
    rows = _control(args, "skills")
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max([len(r["path"]) for r in rows] + [4])
    for row in rows:
        print(f"{row['path'].ljust(width)}  {row['kind']:<8}  {row['plugin']}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """The last N lines of a plugin's output, optionally following."""
    from aigis._tail import follow, last_lines

    where = _control(args, "logs", args.name)
    if where.get("ssh"):
        # A plugin on another host: its unit's journal there, over the core's ssh connection.
        if os.geteuid() != 0:
            raise CtlError(
                f'"{args.name}" runs on another host: reading its journal there takes the '
                "core's ssh connection, which is root's"
            )
        remote = ["journalctl", "-u", where["journal"], "-n", str(args.lines), "--no-pager"]
        if args.follow:
            remote.append("-f")
        argv = [*where["ssh"], shlex.join(remote)]
        os.execvp(argv[0], argv)
    if "journal" in where:
        # The unit's output, the core's records about the plugin and PID 1's messages about the
        # unit (how it died, watchdog, start limit), in time order. Trusted fields only
        # (_SYSTEMD_UNIT, _PID are set by journald): anyone can send an AIGIS_PLUGIN= field.
        unit = where["journal"]
        argv = [
            "journalctl", f"_SYSTEMD_UNIT={unit}",
            "+", "_SYSTEMD_UNIT=aigis.service", f"AIGIS_PLUGIN={args.name}",
            "+", "_PID=1", f"UNIT={unit}",
            "-n", str(args.lines), "--no-pager",
        ]  # fmt: skip
        if args.follow:
            argv.append("-f")
        os.execvp(argv[0], argv)
    path = Path(where["file"])
    out = sys.stdout.buffer
    out.writelines(last_lines(path, args.lines))
    out.flush()
    if args.follow:
        for chunk in follow(path):
            out.write(chunk)
            out.flush()
    return EXIT_OK


def cmd_call(args: argparse.Namespace) -> int:
    """Call a skill in the core and print its result (its repr, made in the core). Arguments
    travel as the strings typed here and become Python literals in the core."""
    path = args.path.removeprefix("aigis.")
    try:
        print(_control(args, "call", path, list(args.args), wait=True))
    except CtlError as exc:
        if exc.code != EXIT_ERROR:
            raise
        raise CtlError(f"aigis.{path}: {exc.error}: {exc}" if exc.error else str(exc)) from None
    return EXIT_OK


def cmd_shell(args: argparse.Namespace) -> int:
    """A REPL where ``aigis`` is the proxy to the running core."""
    import code

    from aigis._rpc.proxy import make_proxy_module

    proxy = make_proxy_module(_client(args))
    sys.modules["aigis"] = proxy
    code.interact(
        banner=f"AIGIS {__version__} shell: `aigis` is connected to the core "
        f"({args.config}). Ctrl-D exits.",
        local={"aigis": proxy},
        exitmsg="",
    )
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    """A live table refreshed every ``--delay`` seconds until ``q``; one snapshot when stdout
    is not a terminal (or with ``--once``)."""
    from aigis._top import render

    if args.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        view = _control(args, "top")
        print("\n".join(render(None, view, width=1000, height=1000, interactive=False)))
        return EXIT_OK
    if not 0.1 <= args.delay <= 3600:
        raise CtlError("--delay must be between 0.1 and 3600 seconds", EXIT_USAGE)
    import contextlib
    import curses

    def run(screen: Any) -> None:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        previous = None
        while True:
            current = _control(args, "top")
            height, width = screen.getmaxyx()
            screen.erase()
            for y, line in enumerate(render(previous, current, width - 1, height)):
                with contextlib.suppress(curses.error):
                    screen.addstr(y, 0, line)
            screen.refresh()
            previous = current
            screen.timeout(int(args.delay * 1000))
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return

    curses.wrapper(run)
    return EXIT_OK


def cmd__complete(args: argparse.Namespace) -> int:
    """Plugin names or skill paths of the running core, one a line; nothing when it is down."""
    from aigis import _ctlclient as client
    from aigis._ctlwire import control_key_path

    try:
        settings = _settings(args)
        op = "status" if args.what == "plugins" else "skills"
        rows = client.request(
            settings.control_socket, control_key_path(settings.state_dir), op, timeout=2.0
        )
    except (CtlError, client.ControlError):
        return EXIT_ERROR
    for row in rows:
        print(row["name"] if args.what == "plugins" else row["path"].removeprefix("aigis."))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aigisctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(args)
    except CtlError as exc:
        print(f"aigisctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # e.g. journalctl missing, a log file unreadable: one line
        print(
            f"aigisctl: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
