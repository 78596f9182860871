"""The AIGIS core daemon: loads plugins in config order, then idles until told to stop.

Signal handlers only enqueue; the main loop dispatches to ``handle_<signame>`` (gunicorn's
arbiter is the model).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
from pathlib import Path

import aigis
from aigis._config import Config, load_config
from aigis._errors import ConfigError, PluginError
from aigis._loader import Loader, Plugin
from aigis._log import setup_logging
from aigis._namespace import BUILTIN_OWNER, Namespace
from aigis._version import __version__

log = logging.getLogger("aigis.core")

DEFAULT_CONFIG = "/etc/aigis/aigis.toml"
PUBLIC_API = ("AigisError", "CoreUnavailable", "RemoteError")


class Daemon:
    """Owns the plugin set, the namespace and the main loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, config: Config, *, skip_requirements: bool = False) -> None:
        self.config = config
        self.namespace = Namespace(aigis, reserved=PUBLIC_API)
        self.loader = Loader(
            config.settings, self.namespace, config.path.parent, skip_requirements=skip_requirements
        )
        self.plugins: dict[str, Plugin] = {}
        self.lock = threading.RLock()  # plugin set is changed by the loop and by AIGISReload
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Load everything, idle until SIGTERM/SIGINT, then stop cleanly; return exit code."""
        self.install_signals()
        self.register_builtins()
        log.info(
            "starting: AIGIS %s with %s (%d plugins)",
            __version__,
            self.config.path,
            len(self.config.plugins),
        )
        for entry in self.config.plugins:
            if self._peek_stop():
                break
            with self.lock:
                self.plugins[entry.name] = self.loader.load(entry)
        log.info("ready: %s", self.summary())
        while not self.stopping:
            try:
                signum = self.signals.get(timeout=1.0)
            except queue.Empty:
                continue
            self.dispatch(signum)
        self.shutdown()
        return 0

    def _peek_stop(self) -> bool:
        """Handle queued signals between plugin loads so SIGTERM is not delayed by a slow load."""
        while not self.signals.empty():
            self.dispatch(self.signals.get())
        return self.stopping

    def install_signals(self) -> None:
        """Handlers only enqueue the signal number."""
        for signum in self.SIGNALS:
            signal.signal(signum, lambda s, _frame: self.signals.put(s))

    def dispatch(self, signum: int) -> None:
        """Call ``handle_<signame>``."""
        name = signal.Signals(signum).name.lower()
        getattr(self, f"handle_{name}")()

    def handle_sigterm(self) -> None:
        """Stop everything and exit 0."""
        log.info("stopping: SIGTERM received")
        self.stopping = True

    def handle_sigint(self) -> None:
        """Same as SIGTERM."""
        log.info("stopping: SIGINT received")
        self.stopping = True

    def handle_sighup(self) -> None:
        """Config reload comes with live reload; for now say so."""
        log.warning("ignored: SIGHUP (live config reload is not available yet)")

    def shutdown(self) -> None:
        """Unload plugins in reverse load order; every cleanup runs once."""
        with self.lock:
            for plugin in reversed(list(self.plugins.values())):
                self.loader.unload(plugin)
                plugin.state = "stopped"
        log.info("stopped: AIGIS")

    # -- built-in skills ----------------------------------------------------------------------
    def register_builtins(self) -> None:
        """``aigis.AIGISReload(name)``."""
        holder = type("Builtins", (), {"AIGISReload": staticmethod(self.reload_plugin)})
        self.namespace.register(BUILTIN_OWNER, holder, ["AIGISReload"], "AIGIS built-ins")

    def reload_plugin(self, name: str) -> str:
        """Re-fetch, re-read and re-load one plugin without touching the others."""
        with self.lock:
            plugin = self.plugins.get(name)
            if plugin is None:
                raise PluginError(name, "no such plugin in " + str(self.config.path))
            log.info('reloading: plugin "%s"', name, extra={"plugin": name})
            self.loader.unload(plugin)
            fresh = self.loader.load(plugin.entry)
            self.plugins[name] = fresh
            if fresh.state == "failed":
                raise PluginError(name, f"reload failed: {fresh.reason}")
            return fresh.state

    def summary(self) -> str:
        """One line: counts per state."""
        counts: dict[str, int] = {}
        for plugin in self.plugins.values():
            counts[plugin.state] = counts.get(plugin.state, 0) + 1
        parts = [f"{n} {state}" for state, n in sorted(counts.items())]
        return ", ".join(parts) if parts else "no plugins configured"


def build_parser() -> argparse.ArgumentParser:
    """The ``aigis`` command line."""
    parser = argparse.ArgumentParser(prog="aigis", description="Run the AIGIS core daemon.")
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("AIGIS_CONFIG", DEFAULT_CONFIG),
        help="config file (default: $AIGIS_CONFIG or %(default)s)",
    )
    parser.add_argument(
        "--skip-requirements",
        action="store_true",
        help="never run REQUIREMENTS_COMMAND (dependencies are preinstalled)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"aigis {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aigis`` and ``python -m aigis``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"aigis: {problem}", file=sys.stderr)
        return 1
    return Daemon(config, skip_requirements=args.skip_requirements).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
