"""The AIGIS core daemon: serves the namespace, loads and supervises plugins, applies reloads.

Signal handlers only enqueue; the main loop reads like a to-do list and dispatches signals to
``handle_<signame>`` (gunicorn's arbiter is the model).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aigis
from aigis._config import Config, PluginEntry, load_config
from aigis._control import Control, status_row
from aigis._errors import AigisError, ConfigError, PluginError
from aigis._loader import Loader, Plugin
from aigis._log import about, setup_logging
from aigis._namespace import BUILTIN_OWNER, Namespace
from aigis._notify import Notifier
from aigis._reload import diff
from aigis._rpc.server import CoreServer, load_or_create_authkey
from aigis._supervise import pick_supervisor
from aigis._supervise.base import ProcessSpec, Supervisor
from aigis._version import __version__

log = logging.getLogger("aigis.core")

DEFAULT_CONFIG = "/etc/aigis/aigis.toml"
PUBLIC_API = ("AigisError", "CoreUnavailable", "RemoteError")
TICK = 0.2  # main-loop period: supervisor poll, watchdog


class Daemon:
    """Owns the plugin set, the namespace, the servers, the supervisor and the main loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(
        self, config: Config, *, skip_requirements: bool = False, supervisor: str | None = None
    ) -> None:
        self.config = config
        self.skip_requirements = skip_requirements
        self.cancel = threading.Event()  # set by SIGTERM/SIGINT: abandon slow start-up work
        self.namespace = Namespace(aigis, reserved=PUBLIC_API)
        self.loader = Loader(
            config.settings,
            self.namespace,
            config.path.parent,
            skip_requirements=skip_requirements,
            cancel=self.cancel,
        )
        self.supervisor: Supervisor = pick_supervisor(
            supervisor or config.settings.supervisor, config.settings
        )
        self.plugins: dict[str, Plugin] = {}
        # The plugin set is changed by the main loop, control calls and AIGISReload.
        self.lock = threading.RLock()
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.notifier = Notifier()
        self.stopping = False
        self.reload_pending = False
        self.reloader: threading.Thread | None = None
        self.started_at = time.time()
        self.servers: list[CoreServer] = []

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Serve, load everything, loop until SIGTERM/SIGINT, then stop cleanly; exit code."""
        self.install_signals()
        self.register_builtins()
        log.info(
            "starting: AIGIS %s with %s (%d plugins, %s supervisor)",
            __version__,
            self.config.path,
            len(self.config.plugins),
            self.supervisor_name,
        )
        try:
            self.start_server("control")
            loaded = []
            for entry in self.config.plugins:
                if self._startup_signals():
                    break
                loaded.append(self.load_plugin(entry))
            # Plugins' socket only once every skill is registered: a plugin reconnecting to a
            # restarted core never sees a half-loaded namespace.
            self.start_server("plugins")
        except (OSError, AigisError) as exc:
            log.error("failed: cannot listen: %s", exc)
            self.shutdown()
            return 1
        for plugin in loaded:
            if self._startup_signals():
                break
            self.start_process(plugin)
        self.retire_unknown()
        log.info("ready: %s", self.summary())
        self.notifier.ready(self.summary())
        if self.reload_pending and not self.stopping:
            self.handle_sighup()
        last_error = ""
        while not self.stopping:
            try:
                self.supervisor.poll()
            except Exception as exc:  # a supervision bug must not take every plugin down
                if type(exc).__name__ != last_error:  # once per kind of error, not every tick
                    log.exception("failed: supervising plugins")
                last_error = type(exc).__name__
            else:
                last_error = ""
            self.notifier.watchdog()
            try:
                signum = self.signals.get(timeout=TICK)
            except queue.Empty:
                continue
            self.dispatch(signum)
        self.shutdown()
        return 0

    @property
    def supervisor_name(self) -> str:
        """``embedded`` or ``systemd``."""
        return getattr(self.supervisor, "NAME", type(self.supervisor).__name__)

    def retire_unknown(self) -> None:
        """Stop plugin processes an earlier core left that this config no longer has."""
        retire = getattr(self.supervisor, "retire_unknown", None)
        if retire is None or self.stopping:
            return
        with self.lock:
            try:
                retire([p.name for p in self.config.plugins])
            except AigisError as exc:
                log.error("failed: %s", exc)

    def start_server(self, which: str) -> None:
        """``plugins``: the namespace on the Unix socket (and TCP when configured);
        ``control``: the operators' socket for aigisctl, never on TCP."""
        settings = self.config.settings
        settings.runtime_dir.mkdir(parents=True, exist_ok=True)
        authkey = load_or_create_authkey(settings.authkey_file)
        if which == "plugins":
            server = CoreServer(
                self.namespace.resolve, unix_path=settings.socket, tcp=settings.tcp, authkey=authkey
            )
        else:
            server = CoreServer(
                Control(self).resolve, unix_path=settings.control_socket, tcp=None, authkey=authkey
            )
        server.start()
        self.servers.append(server)

    def _startup_signals(self) -> bool:
        """Between plugin loads: act on SIGTERM at once, keep SIGHUP for after start-up."""
        while not self.signals.empty():
            signum = self.signals.get()
            if signum == signal.SIGHUP:
                log.info("deferred: SIGHUP until every plugin is loaded")
                self.reload_pending = True
            else:
                self.dispatch(signum)
        return self.stopping

    def install_signals(self) -> None:
        """Handlers only enqueue the signal number."""
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Enqueue; a stop request also cancels a requirements command that is running."""
        self.signals.put(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.cancel.set()

    def dispatch(self, signum: int) -> None:
        """Call ``handle_<signame>``."""
        getattr(self, f"handle_{signal.Signals(signum).name.lower()}")()

    def handle_sigterm(self) -> None:
        """Stop everything and exit 0."""
        log.info("stopping: SIGTERM received")
        self.stopping = True

    def handle_sigint(self) -> None:
        """Same as SIGTERM."""
        log.info("stopping: SIGINT received")
        self.stopping = True

    def handle_sighup(self) -> None:
        """Reload in a worker thread: the main loop keeps supervising and pinging the watchdog."""
        self.reload_pending = False
        if self.reloader is not None and self.reloader.is_alive():
            log.info("deferred: SIGHUP while a reload is running; reloading again after it")
            self.reload_pending = True
            return
        self.reloader = threading.Thread(
            target=self._reload_from_signal, name="aigis-reload", daemon=True
        )
        self.reloader.start()

    def _reload_from_signal(self) -> None:
        """A bad config changes nothing; an unexpected error is logged, never fatal."""
        try:
            self.reload_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
        except Exception:  # a bug in a reload must not take the daemon down
            log.exception("reload failed")
        if self.reload_pending:
            self.signals.put(signal.SIGHUP)

    def shutdown(self) -> None:
        """Stop plugin processes in reverse load order while the namespace is still served,
        then close the plugins' socket (callers retry against the next core), then run
        cleanups in reverse load order, then close the control socket.

        When systemd is restarting the core's unit, plugin units keep running: the next core
        adopts them (a package upgrade must not bounce every plugin)."""
        self.notifier.stopping()
        if self.reloader is not None:
            self.reloader.join()  # a reload in progress finishes first (it holds the lock)
        restarting = getattr(self.supervisor, "core_restarting", lambda: False)()
        if restarting:
            log.info("restarting: the core only; plugin units keep running for the next core")
        with self.lock:
            plugins = list(reversed(list(self.plugins.values())))
            for plugin in [] if restarting else plugins:
                if plugin.supervised:
                    try:
                        self.supervisor.remove(plugin.name)
                    except AigisError as exc:  # one plugin's trouble never stops the shutdown
                        log.error(
                            'failed: plugin "%s": %s',
                            plugin.name,
                            exc,
                            **about(plugin.name),
                        )
                    plugin.supervised = False
            try:
                if not restarting:
                    self.supervisor.stop_all([])
            except AigisError as exc:
                log.error("failed: stopping the remaining plugins: %s", exc)
        for server in [s for s in self.servers if s.unix_path == self.config.settings.socket]:
            server.stop()
        with self.lock:
            for plugin in plugins:
                self.loader.unload(plugin)
        for server in self.servers:
            server.stop()  # idempotent for the one already stopped
        log.info("stopped: AIGIS")

    # -- plugins -------------------------------------------------------------------------------
    def add_plugin(self, entry: PluginEntry) -> Plugin:
        """Load ``entry`` (skills first), then start its process if it has one."""
        with self.lock:
            return self.start_process(self.load_plugin(entry))

    def load_plugin(self, entry: PluginEntry) -> Plugin:
        """Run the load pipeline for ``entry`` and record the plugin."""
        with self.lock:
            plugin = self.loader.load(entry)
            self.plugins[entry.name] = plugin
            return plugin

    def start_process(self, plugin: Plugin) -> Plugin:
        """Hand a loaded internal/external plugin's process to the supervisor."""
        with self.lock:
            if plugin.state == "loaded" and plugin.plugin_type in ("internal", "external"):
                try:
                    self.supervisor.add(self.process_spec(plugin))
                    plugin.supervised = True
                except (PluginError, OSError, ValueError) as exc:
                    plugin.state, plugin.reason = "failed", f"could not start: {exc}"
                    log.error(
                        'failed: plugin "%s": %s',
                        plugin.name,
                        plugin.reason,
                        **about(plugin.name),
                    )
            return plugin

    def _take_down(self, plugin: Plugin) -> None:
        """Stop the plugin's process (if any), then run its cleanup and remove its skills."""
        if plugin.supervised:
            try:
                self.supervisor.remove(plugin.name)
            except PluginError as exc:
                if "not supervised" not in exc.reason:
                    raise
            plugin.supervised = False
        self.loader.unload(plugin)

    def remove_plugin(self, name: str) -> None:
        """Stop and forget one plugin."""
        with self.lock:
            plugin = self.plugins.get(name)
            if plugin is None:
                return
            self._take_down(plugin)  # raises if the process could not be stopped: keep it listed
            del self.plugins[name]
            log.info('removed: plugin "%s"', name, **about(name))

    def process_spec(self, plugin: Plugin) -> ProcessSpec:
        """What to run for an internal or external plugin, and how to supervise it."""
        manifest = plugin.manifest
        assert manifest is not None and manifest.launch is not None
        settings = self.config.settings
        env = {
            "AIGIS_PLUGIN": plugin.name,
            "AIGIS_PLUGIN_DIR": str(plugin.root),
            "AIGIS_ADDRESS": str(settings.socket),
            "AIGIS_AUTHKEY_FILE": str(settings.authkey_file),
            "PYTHONUNBUFFERED": "1",
        }
        if manifest.plugin_type == "internal":
            argv: tuple[str, ...] = (
                sys.executable,
                "-m",
                "aigis._runner",
                "--name",
                plugin.name,
                "--entrypoint",
                str(manifest.entrypoint),
                "--launch",
                str(manifest.launch),
            )
        else:
            argv = tuple(manifest.launch)
        return ProcessSpec(
            name=plugin.name,
            kind=manifest.plugin_type,
            argv=argv,
            cwd=manifest.entrypoint,
            env=env,
            restart=manifest.restart,
            restart_delay=settings.restart_delay,
            restart_delay_max=settings.restart_delay_max,
            stop_timeout=settings.stop_timeout,
        )

    # -- operations (control socket, AIGISReload, SIGHUP) ----------------------------------------
    def register_builtins(self) -> None:
        """``aigis.AIGISReload(name)``."""
        holder = type("Builtins", (), {"AIGISReload": staticmethod(self.reload_plugin)})
        self.namespace.register(BUILTIN_OWNER, holder, ["AIGISReload"], "AIGIS built-ins")

    def reload_plugin(self, name: str) -> str:
        """Re-fetch, re-read and re-load one plugin (restarting its process) alone."""
        with self.lock:
            plugin = self.plugins.get(name)
            if plugin is None:
                raise PluginError(name, f"no such plugin in {self.config.path}")
            log.info('reloading: plugin "%s"', name, **about(name))
            self._take_down(plugin)
            fresh = self.add_plugin(plugin.entry)
            if fresh.state == "failed":
                raise PluginError(name, f"reload failed: {fresh.reason}")
            return fresh.state

    def reload_config(self) -> str:
        """Re-read the config; add, remove and reload only what changed. Returns a summary."""
        with self.lock:
            new = load_config(self.config.path)  # a bad config raises here: nothing changes
            self.notifier.reloading()
            try:
                failed = [p.name for p in self.plugins.values() if p.state == "failed"]
                plan = diff(self.config, new, retry=failed)
                log.info("reloading: config %s: %s", new.path, plan.describe())
                for key in plan.settings_changed:
                    log.warning("not applied: [aigis] %s changed; restart AIGIS to apply it", key)
                for name in plan.removed:
                    self.remove_plugin(name)
                for entry in plan.changed:
                    self.remove_plugin(entry.name)
                self.config = new
                for entry in (*plan.changed, *plan.added):
                    self.add_plugin(entry)
                # Keep load order = config order for status and for shutdown.
                self.plugins = {
                    p.name: self.plugins[p.name] for p in new.plugins if p.name in self.plugins
                }
                log.info("reloaded: %s", self.summary())
                return plan.describe()
            finally:
                self.notifier.ready(self.summary())

    def start_plugin(self, name: str) -> dict[str, Any]:
        """Start a stopped/exited/failed plugin; a plugin that failed to load is loaded again."""
        with self.lock:
            plugin = self.plugins[name]
            if plugin.supervised:
                self.supervisor.start(name)
            elif plugin.state == "failed":
                plugin = self.add_plugin(plugin.entry)
            return self.status_rows([name])[0]

    def stop_plugin(self, name: str) -> dict[str, Any]:
        """Stop a plugin's process; core plugins have none."""
        with self.lock:
            plugin = self.plugins[name]
            if not plugin.supervised:
                raise PluginError(
                    name, f"{plugin.plugin_type} plugins have no process to stop; use reload"
                )
        self.supervisor.stop(name)  # outside the lock: stopping may take stop_timeout
        return self.status_rows([name])[0]

    def restart_plugin(self, name: str) -> dict[str, Any]:
        """Restart a plugin's process (count reset), or reload a core plugin."""
        with self.lock:
            plugin = self.plugins[name]
            if not plugin.supervised:
                self.reload_plugin(name)
                return self.status_rows([name])[0]
        self.supervisor.restart(name)
        return self.status_rows([name])[0]

    def status_rows(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Status of ``names`` (all when None), in load order; unknown names raise."""
        # No lock: a snapshot of the dict is enough, and status must answer during a reload.
        current = dict(self.plugins)
        wanted = list(current) if not names else list(names)
        for name in wanted:
            if name not in current:
                raise PluginError(name, f"no such plugin in {self.config.path}")
        plugins = [current[n] for n in wanted]
        supervised = [p.name for p in plugins if p.supervised]
        procs = {}
        for name in supervised:
            try:  # outside the lock: status stays fast while a reload stops plugins
                procs.update((s.name, s) for s in self.supervisor.status([name]))
            except PluginError:  # removed by a concurrent reload
                continue
            except AigisError as exc:  # systemd unreachable: say so in the row, never crash
                log.warning("status: %s", exc)
                break
        return [status_row(p, procs.get(p.name)) for p in plugins]

    def log_location(self, name: str) -> dict[str, Any]:
        """Where a plugin's output goes."""
        path = self.supervisor.log_path(name) if self.plugins[name].supervised else None
        if path is not None:
            return {"file": str(path)}
        unit = getattr(self.supervisor, "unit_of", None)
        if unit is not None:
            return {"journal": unit(name)}
        raise PluginError(name, "has no process output (core plugins log into the core's log)")

    def describe(self) -> dict[str, Any]:
        """What ``aigisctl`` shows about the core itself."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(self.config.path),
            "supervisor": self.supervisor_name,
            "started_at": self.started_at,
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line: plugin counts per state, e.g. ``2 running, 1 loaded, 1 failed``."""
        counts: dict[str, int] = {}
        for row in self.status_rows():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
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
    parser.add_argument(
        "--supervisor",
        choices=("auto", "systemd", "embedded"),
        help="process supervisor (default: [aigis] supervisor, else auto)",
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
    try:
        daemon = Daemon(
            config, skip_requirements=args.skip_requirements, supervisor=args.supervisor
        )
    except AigisError as exc:  # e.g. the systemd backend asked for but unavailable
        print(f"aigis: {exc}", file=sys.stderr)
        return 1
    return daemon.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
