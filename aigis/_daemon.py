"""The AIGIS core daemon: serves the namespace, loads and supervises plugins, applies reloads.

Signal handlers only enqueue; the main loop reads like a to-do list and dispatches signals to
``handle_<signame>`` (gunicorn's arbiter is the model).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
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
from aigis._control import Control, ControlServer
from aigis._ctlwire import control_key_path
from aigis._errors import AigisError, ConfigError, NotSupervised, PluginError
from aigis._instance import InstanceLock
from aigis._keys import PLUGIN_KEY_MODE, create_missing_keys, load_or_create_key
from aigis._launch import process_spec
from aigis._loader import Loader, Plugin
from aigis._log import about, setup_logging
from aigis._metrics import Metrics
from aigis._namespace import BUILTIN_OWNER, Namespace
from aigis._notify import Notifier
from aigis._paths import make_dir
from aigis._reload import diff
from aigis._remote.plan import remote_spec
from aigis._requirements import fingerprint
from aigis._rpc import wire
from aigis._rpc.server import ROOT, CoreServer, load_or_create_authkey
from aigis._settings import DEFAULT_CONFIG_PATH, PUBLIC_API, SUPERVISORS
from aigis._states import Kind, State
from aigis._status import Row, plugin_row, summary
from aigis._supervise import pick_supervisor
from aigis._supervise.base import LogLocation, ProcessSpec, Status, Supervisor
from aigis._supervise.identity import retire_foreign_key
from aigis._supervise.usage import UsageReader, own_usage
from aigis._version import __version__

log = logging.getLogger("aigis.core")


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this host alone: a loopback address or
    ``localhost``; a wildcard (``0.0.0.0``, ``::``) or any other name is not. Pure."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


TICK = 0.2  # main-loop period: supervisor poll, watchdog
STARTUP_GRACE = 5.0  # after SIGTERM, how long a plugin load in progress may take to finish


class LoadTimedOut(BaseException):
    """A start-up load ran past ``load_timeout`` (a BaseException for the same reason)."""


class StartupAbandoned(BaseException):
    """A start-up load still running STARTUP_GRACE seconds after SIGTERM (not an Exception, so
    plugin code's ``except Exception`` cannot swallow it)."""


class Daemon:
    """Owns the plugin set, the namespace, the servers, the supervisor and the main loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(
        self, config: Config, supervisor: Supervisor, *, skip_requirements: bool = False
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
            progress=self._on_progress,
            hosts=config.hosts,
        )
        self.supervisor = supervisor
        self.metrics = Metrics()
        self.usage = UsageReader(supervisor.name)
        self.http: Any = None  # aigis._http.HttpServer when [aigis] http is set
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
        self.control: ControlServer | None = None
        self.plugin_keys: dict[str, bytes] = {}  # each plugin process's own key, by name
        self.loading: tuple[int, int, str] | None = None  # (3, 12, name) while start-up loads
        self.step: tuple[str, float] = ("", 0.0)  # what the load in progress does, since when
        self.activity: str | None = None  # the same as one line, while a load runs

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Serve, load everything, loop until SIGTERM/SIGINT, then stop cleanly; exit code."""
        self.install_signals()
        if not self.startup():
            self.shutdown()
            return 1
        self.loop()
        self.shutdown()
        return 0

    def startup(self) -> bool:
        """Control socket, every plugin's skills, the plugins' socket, then every process;
        False when a socket cannot be served."""
        self.register_builtins()
        log.info(
            "starting: AIGIS %s with %s (%d plugins, %s supervisor)",
            __version__,
            self.config.path,
            len(self.config.plugins),
            self.supervisor.name,
        )
        missing = wire.dill_missing()
        if missing:
            log.warning("missing: %s", missing)
        try:
            self.start_server("control")
            self.start_http()
            loaded = []
            for index, entry in enumerate(self.config.plugins, 1):
                if self._startup_signals():
                    break
                self.loading = (index, len(self.config.plugins), entry.name)
                self.step = ("", 0.0)
                if self.config.settings.load_timeout > 0:
                    signal.setitimer(signal.ITIMER_REAL, self.config.settings.load_timeout)
                try:
                    loaded.append(self.load_plugin(entry))
                except LoadTimedOut:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    loaded.append(self._timed_out(entry))
                except StartupAbandoned:
                    log.warning(
                        'abandoned: plugin "%s" still loading %gs after the stop request',
                        entry.name,
                        STARTUP_GRACE,
                        **about(entry.name),
                    )
                    break
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)  # no alarm outside a load
                    self.loading = self.activity = None
            # Plugins' socket only once every skill is registered: a plugin reconnecting to a
            # restarted core never sees a half-loaded namespace.
            self.start_server("plugins")
        except (OSError, AigisError) as exc:
            log.error("failed: cannot listen: %s", exc)
            return False
        self.create_plugin_keys(loaded)
        for plugin in loaded:
            if self._startup_signals():
                break
            self.start_process(plugin)
        self.retire_unknown()
        line = self.summary()
        log.info("ready: %s", line)
        self.notifier.ready(line)
        if self.reload_pending and not self.stopping:
            self.handle_sighup()
        return True

    def loop(self) -> None:
        """Until SIGTERM/SIGINT: supervise, ping the watchdog, dispatch signals."""
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
            self.metrics.fold()  # here, not on the calls' path
            try:
                signum = self.signals.get(timeout=TICK)
            except queue.Empty:
                continue
            self.dispatch(signum)

    def retire_unknown(self) -> None:
        """Stop plugin processes an earlier core left that this config no longer has."""
        if self.stopping:
            return
        with self.lock:
            try:
                self.supervisor.retire_unknown([p.name for p in self.config.plugins])
            except AigisError as exc:
                log.error("failed: %s", exc)

    def start_server(self, which: str) -> None:
        """``plugins``: the namespace on the Unix socket (and TCP when configured);
        ``control``: the operators' JSON socket for aigisctl, never on TCP."""
        settings = self.config.settings
        make_dir(settings.runtime_dir)
        if which == "plugins":
            authkey = load_or_create_authkey(settings.authkey_file)
            tls_context = None
            if settings.tcp is not None and settings.tcp_plaintext:
                if not is_loopback(settings.tcp[0]):
                    log.warning(
                        "exposed: plaintext TCP on %s port %d ([aigis] tcp_plaintext = true in "
                        "%s): calls, arguments and results cross the network unencrypted",
                        settings.tcp[0],
                        settings.tcp[1],
                        self.config.path,
                    )
            elif settings.tcp is not None:
                from aigis._rpc import tls  # ssl and cryptography only for a TLS listener

                tls_context = tls.listener_context(settings.tls_cert_file, settings.tls_key_file)
            server = CoreServer(
                self.namespace.resolve,
                unix_path=settings.socket,
                tcp=settings.tcp,
                authkey=authkey,
                metrics=self.metrics,
                keys=lambda: self.plugin_keys,
                authorize=self.authorize_call,
                tls_context=tls_context,
            )
            server.start()
            self.servers.append(server)
        else:
            key = load_or_create_key(control_key_path(settings.state_dir), "control key")
            self.control = ControlServer(
                Control(self), settings.control_socket, key, metrics=self.metrics
            )
            self.control.start()

    def start_http(self) -> None:
        """The optional HTTP listener (``[aigis] http``): /metrics and the status page. It is
        an observer: when it cannot listen, the error is logged and the core runs without it."""
        settings = self.config.settings
        if settings.http is None:
            return
        from aigis._http import HttpServer, json_body, read_token

        try:
            from aigis import _exposition as expo
        except ImportError as exc:
            log.error("failed: http listener needs prometheus_client: %s", exc)
            return
        from aigis import _page as page

        registry = expo.registry(self.view)
        routes = {
            "/": ("text/html; charset=utf-8", lambda: page.HTML.encode()),
            "/status.js": ("text/javascript; charset=utf-8", lambda: page.JS.encode()),
            "/status.css": ("text/css; charset=utf-8", lambda: page.CSS.encode()),
            "/status.json": (
                "application/json",
                lambda: json_body(page.page_data(self.view())),
            ),
            "/metrics": (expo.CONTENT_TYPE, lambda: expo.exposition(registry)),
        }
        try:
            token = read_token(settings.http_token_file) if settings.http_token_file else None
            server = HttpServer(settings.http, routes, self.metrics, token)
            server.start()
        except AigisError as exc:
            log.error("failed: %s; running without the http listener", exc)
            return
        self.http = server

    def _timed_out(self, entry: PluginEntry) -> Plugin:
        """The plugin whose load ran past ``load_timeout``: failed, with the step it was in."""
        step = self.step[0]
        reason = f"load timed out after {self.config.settings.load_timeout:g} s" + (
            f" while {step}" if step else ""
        )
        plugin = Plugin(entry, self.loader.root_of(entry.name), state=State.FAILED, reason=reason)
        with self.lock:
            self.loader.forget(plugin)
            self.plugins[entry.name] = plugin
        log.error('failed: plugin "%s": %s', entry.name, reason, **about(entry.name))
        return plugin

    def _on_progress(self, name: str, step: str) -> None:
        """A load moved on to ``step``: systemd's STATUS= line, ``aigisctl status`` and
        ``aigisctl reload`` (through ``describe``) say so."""
        self.step = (step, time.monotonic())
        self.activity = f'plugin "{name}": {step}'
        loading = self.loading
        if loading is not None and loading[2] == name:
            self.activity = f"loading {loading[0]}/{loading[1]}: {self.activity}"
            self.notifier.status(self.activity)

    def current_activity(self) -> str | None:
        """What a start-up or reload is doing now, with how long it has been at it."""
        activity = self.activity
        if activity is None:
            return None
        return f"{activity} ({time.monotonic() - self.step[1]:.0f} s)"

    def loading_reason(self) -> str:
        """``loading (3/12): running requirements (41 s)`` for the plugin being loaded."""
        loading, (step, since) = self.loading, self.step
        if loading is None:
            return ""
        reason = f"loading ({loading[0]}/{loading[1]})"
        if step:
            reason += f": {step} ({time.monotonic() - since:.0f} s)"
        return reason

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
        """Handlers only enqueue the signal number (SIGALRM: see ``_on_alarm``)."""
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Enqueue; a stop request also cancels a requirements command that is running and,
        during a start-up load, gives that load STARTUP_GRACE seconds before abandoning it."""
        self.signals.put(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.cancel.set()
            if self.loading is not None:
                signal.setitimer(signal.ITIMER_REAL, STARTUP_GRACE)

    def _on_alarm(self, _signum: int, _frame: object) -> None:
        """Runs in the main thread, inside whatever a stuck start-up load is doing: unwind it."""
        if self.loading is None:
            return
        if self.cancel.is_set():
            raise StartupAbandoned(self.loading[2])
        raise LoadTimedOut(self.loading[2])

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
        """Stop plugin processes in reverse load order (each config table's at once) while the
        namespace is still served, then close the plugins' socket (callers retry against the
        next core), then run cleanups in reverse load order, then close the control socket.
        One plugin's failure never skips the others, the cleanups or the exit.

        When systemd is restarting the core's unit, plugin units keep running: the next core
        adopts them (a package upgrade must not bounce every plugin)."""
        self.notifier.stopping()
        if self.reloader is not None:
            self.reloader.join()  # a reload in progress finishes first (it holds the lock)
        restarting = self._core_restarting()
        if restarting:
            log.info("restarting: the core only; plugin units keep running for the next core")
        with self.lock:
            plugins = list(reversed(list(self.plugins.values())))
            if not restarting:
                self._stop_processes(plugins)
        for server in [s for s in self.servers if s.unix_path == self.config.settings.socket]:
            self._quietly("closing the plugins' socket", server.stop)
        with self.lock:
            for plugin in plugins:
                self._quietly(f'cleaning up plugin "{plugin.name}"', self.loader.unload, plugin)
        self._quietly("closing the supervisor", self.supervisor.close)
        for server in self.servers:
            self._quietly("closing a socket", server.stop)  # idempotent for the one stopped
        if self.http is not None:
            self._quietly("closing the http listener", self.http.stop)
        if self.control is not None:
            self._quietly("closing the control socket", self.control.stop)
        self._quietly("closing the usage reader", self.usage.close)
        log.info("stopped: AIGIS")

    def _core_restarting(self) -> bool:
        try:
            return self.supervisor.core_restarting()
        except Exception:  # cannot tell: stop the plugins, as a stop would
            log.exception("failed: asking whether the core is being restarted")
            return False

    def stop_steps(self, plugins: list[Plugin]) -> list[list[str]]:
        """Supervised plugins grouped by config table, in reverse load order (``plugins`` is
        already reversed): each group is stopped at once, the groups one after the other."""
        steps: list[list[str]] = []
        table = None
        for plugin in plugins:
            if not plugin.supervised:
                continue
            if plugin.entry.table != table:
                steps.append([])
                table = plugin.entry.table
            steps[-1].append(plugin.name)
        return steps

    def _stop_processes(self, plugins: list[Plugin]) -> None:
        """Every supervised process, stopped step by step, then forgotten one by one."""
        self._quietly("stopping the plugins", self.supervisor.stop_all, self.stop_steps(plugins))
        for plugin in plugins:
            if not plugin.supervised:
                continue
            try:
                self.supervisor.remove(plugin.name)
            except NotSupervised:
                pass
            except Exception as exc:  # one plugin's trouble never stops the shutdown
                why = exc.reason if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                log.error('failed: plugin "%s": %s', plugin.name, why, **about(plugin.name))
            plugin.supervised = False

    @staticmethod
    def _quietly(what: str, action: Any, *args: Any) -> None:
        """Run one shutdown step; an error is logged and the shutdown goes on."""
        try:
            action(*args)
        except AigisError as exc:
            log.error("failed: %s: %s", what, exc)
        except Exception:
            log.exception("failed: %s", what)

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

    def create_plugin_keys(self, plugins: list[Plugin]) -> None:
        """Create the missing keys of ``plugins`` with processes in one batch (start_process
        reads them, or creates one itself and names the file when that fails)."""
        settings = self.config.settings
        create_missing_keys(
            [
                (settings.plugin_key_file(p.name), f'key of plugin "{p.name}"', PLUGIN_KEY_MODE)
                for p in plugins
                if p.has_process
            ]
        )

    def start_process(self, plugin: Plugin) -> Plugin:
        """Hand a loaded internal/external plugin's process to the supervisor."""
        with self.lock:
            if plugin.has_process:
                try:
                    assert plugin.manifest is not None
                    settings = self.config.settings
                    # Under systemd each plugin gets its own account (aigis-NAME); the embedded
                    # backend has one default account, [aigis] plugin_user.
                    # A remote host's systemd gives each plugin its own account there as well.
                    embedded = self.supervisor.name == "embedded" and plugin.remote is None
                    default = settings.plugin_user if embedded else None
                    spec = process_spec(
                        plugin.name,
                        str(plugin.root),
                        plugin.manifest,
                        settings,
                        user=plugin.entry.user or default,
                        sandbox=plugin.entry.sandbox,
                    )
                    key_file = self.config.settings.plugin_key_file(plugin.name)
                    retire_foreign_key(plugin.name, key_file, spec.user)
                    self.plugin_keys[plugin.name] = load_or_create_key(
                        key_file,
                        f'key of plugin "{plugin.name}"',
                        PLUGIN_KEY_MODE,
                    )
                    if plugin.remote is not None:
                        spec = self._remote_spec(plugin, spec)
                    self.supervisor.add(spec)
                    plugin.supervised = True
                except (AigisError, OSError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, PluginError) else str(exc)
                    plugin.state, plugin.reason = State.FAILED, f"could not start: {reason}"
                    log.error(
                        'failed: plugin "%s": %s',
                        plugin.name,
                        plugin.reason,
                        **about(plugin.name),
                    )
            return plugin

    def _remote_spec(self, plugin: Plugin, spec: ProcessSpec) -> ProcessSpec:
        """``spec`` as the plugin's remote host runs it, with what to ship there first."""
        manifest, settings = plugin.manifest, self.config.settings
        assert manifest is not None and plugin.remote is not None
        requirements = None
        command, file = manifest.requirements_command, manifest.requirements_file
        if command and not self.skip_requirements:
            stamp = fingerprint(command, file)
            requirements = (command, file or "", str(manifest.entrypoint), stamp)
        return remote_spec(
            spec,
            plugin.remote,
            source=plugin.files,
            tcp=settings.tcp,
            key_file=settings.plugin_key_file(plugin.name),
            secrets=plugin.remote_secrets,
            system_requirements=manifest.system_requirements,
            requirements=requirements,
            tls_cert_file=self.tls_cert_file(),
        )

    def tls_cert_file(self) -> Path | None:
        """The core's certificate that remote internal plugins pin (None: plaintext TCP, as
        ``[aigis] tcp_plaintext`` allows)."""
        settings = self.config.settings
        return None if settings.tcp_plaintext else settings.tls_cert_file

    def _take_down(self, plugin: Plugin) -> None:
        """Stop the plugin's process (if any), then run its cleanup and remove its skills."""
        if plugin.supervised:
            with contextlib.suppress(NotSupervised):  # e.g. removed by a concurrent reload
                self.supervisor.remove(plugin.name)
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
            self.plugin_keys.pop(name, None)  # its key no longer opens anything
            log.info('removed: plugin "%s"', name, **about(name))

    # -- operations (control socket, AIGISReload, SIGHUP) ----------------------------------------
    def authorize_call(self, path: tuple[str, ...], caller: str) -> None:
        """What a plugin may call: every skill, and ``AIGISReload`` as ``[aigis] reload_skill``
        allows (the authkey's holder, root, may call everything)."""
        if path[0] != "AIGISReload" or caller == ROOT:
            return
        allowed = self.config.settings.reload_skill
        if allowed == "all" or caller in allowed.split():
            return
        raise PermissionError(
            f'plugin "{caller}" may not call aigis.AIGISReload ([aigis] reload_skill = '
            f'"{allowed}" in {self.config.path})'
        )

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
            if fresh.state is State.FAILED:
                raise PluginError(name, f"reload failed: {fresh.reason}")
            return str(fresh.state)  # plain data: the caller may not have our enum

    def reload_config(self) -> str:
        """Re-read the config; add, remove and reload only what changed. Every step is tried
        (one plugin that cannot be stopped does not hold up the others); returns one line:
        the plan, and the plugins that failed with why."""
        with self.lock:
            new = load_config(self.config.path)  # a bad config raises here: nothing changes
            self.notifier.reloading()
            failures: dict[str, str] = {}
            try:
                failed = [p.name for p in self.plugins.values() if p.state is State.FAILED]
                moved = [  # on a host whose [hosts] entry changed: placed again
                    p.name
                    for p in self.plugins.values()
                    if p.remote is not None and new.hosts.get(p.remote.name) != p.remote
                ]
                plan = diff(self.config, new, retry=[*failed, *moved])
                log.info("reloading: config %s: %s", new.path, plan.describe())
                for key in plan.settings_changed:
                    log.warning("not applied: [aigis] %s changed; restart AIGIS to apply it", key)
                wanted = {p.name for p in new.plugins}
                # Also plugins an earlier reload could not remove: they are tried again.
                removed = [n for n in reversed(self.plugins) if n not in wanted]
                for name in [*removed, *(e.name for e in plan.changed)]:
                    self._try(failures, name, self.remove_plugin, name)
                self.config = new
                self.loader.hosts = new.hosts
                for entry in (*plan.changed, *plan.added):
                    if entry.name in failures:
                        continue  # its old process still runs: never two of one plugin
                    self._try(failures, entry.name, self.add_plugin, entry)
                    plugin = self.plugins.get(entry.name)
                    if plugin is not None and plugin.state is State.FAILED:
                        failures[entry.name] = plugin.reason
                # Load order = config order for status and for shutdown; plugins that could not
                # be removed stay listed (last) so that status shows them and shutdown stops them.
                order = [p.name for p in new.plugins if p.name in self.plugins]
                order += [n for n in self.plugins if n not in order]
                self.plugins = {name: self.plugins[name] for name in order}
                line = summary_of_reload(plan.describe(), failures)
                log.info("reloaded: %s", line)
                return line
            finally:
                self.activity = None
                self.notifier.ready(self.summary())

    @staticmethod
    def _try(failures: dict[str, str], name: str, action: Any, *args: Any) -> None:
        """One reload step for plugin ``name``; its error is recorded and logged, not raised."""
        try:
            action(*args)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            failures[name] = reason
            log.error('failed: plugin "%s": %s', name, reason, **about(name))

    def start_plugin(self, name: str) -> dict[str, Any]:
        """Start a stopped/exited/failed plugin; a plugin that failed to load is loaded again."""
        with self.lock:
            plugin = self.plugins[name]
            if plugin.supervised:
                self.supervisor.start(name)
            elif plugin.state is State.FAILED:
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

    def status_rows(self, names: list[str] | None = None, usage: bool = False) -> list[Row]:
        """Status of ``names`` (all when None), in load order; unknown names raise. ``usage``:
        with the CPU time and memory of each plugin's processes (else null)."""
        # No lock: a snapshot of the dict is enough, and status must answer during a reload.
        current: dict[str, Plugin] = dict(self.plugins)
        loading = self.loading
        if loading is not None:  # start-up: plugins not loaded yet are shown as starting
            busy = loading[2]
            for entry in self.config.plugins:
                if entry.name not in current:
                    reason = self.loading_reason() if entry.name == busy else "waiting"
                    root = self.loader.root_of(entry.name)
                    current[entry.name] = Plugin(entry, root, reason=reason)
        wanted = list(current) if not names else list(names)
        for name in wanted:
            if name not in current:
                raise PluginError(name, f"no such plugin in {self.config.path}")
        plugins = [current[n] for n in wanted]
        procs = self._snapshots([p.name for p in plugins if p.supervised])
        costs = {}
        if usage:
            here = {p.name for p in plugins if p.remote is None}  # remote pids are not ours
            pids = {name: proc.pid for name, proc in procs.items() if proc.pid and name in here}
            try:
                costs = self.usage.read(pids)
            except Exception:  # usage is a nicety: status must answer without it
                log.exception("failed: reading plugin usage")
        return [plugin_row(p, procs.get(p.name), usage=costs.get(p.name)) for p in plugins]

    def view(self) -> dict[str, Any]:
        """Everything an observer sees, as plain data: the core, every plugin's row (with
        usage), every skill and its owner, and the call metrics. Never plugin output."""
        return {
            "time": time.time(),
            "core": {**self.describe(), **own_usage()},
            "plugins": self.status_rows(usage=True),
            "skills": [
                {"path": f"aigis.{s.path}", "kind": s.kind, "plugin": s.plugin}
                for s in self.namespace.skills()
            ],
            "metrics": {**self.metrics.snapshot(), **self.output_metrics()},
        }

    def output_metrics(self) -> dict[str, dict[str, int]]:
        """Lines each plugin printed and bytes its log lost, as the backend counted them (read
        when observed: nothing is pushed per line)."""
        try:
            counts = self.supervisor.output_counts()
        except Exception:  # a nicety, like usage: the view must answer without it
            log.exception("failed: reading plugin output counts")
            counts = {}
        return {
            "log_lines": {name: c.lines for name, c in counts.items()},
            "log_dropped_bytes": {name: c.dropped_bytes for name, c in counts.items()},
        }

    def _snapshots(self, names: list[str]) -> dict[str, Status]:
        """The supervisor's snapshots of ``names`` in one round; a name removed meanwhile (by a
        concurrent reload) is asked again alone, so the others still get theirs."""
        if not names:
            return {}
        try:  # outside the lock: status stays fast while a reload stops plugins
            return {s.name: s for s in self.supervisor.status(names)}
        except NotSupervised:
            pass
        except AigisError as exc:  # systemd unreachable: the rows say unknown, never crash
            log.warning("status: %s", exc)
            return {}
        found: dict[str, Status] = {}
        for name in names:
            with contextlib.suppress(NotSupervised):
                found.update((s.name, s) for s in self.supervisor.status([name]))
        return found

    def log_location(self, name: str) -> LogLocation:
        """Where a plugin's output goes."""
        if self.plugins[name].plugin_type is Kind.CORE:
            raise PluginError(name, "has no process output (core plugins log into the core's log)")
        return self.supervisor.log_location(name)

    def describe(self) -> dict[str, Any]:
        """What ``aigisctl`` shows about the core itself."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(self.config.path),
            "supervisor": self.supervisor.name,
            "started_at": self.started_at,
            "summary": self.summary(),
            "activity": self.current_activity(),
        }

    def summary(self) -> str:
        """One line: plugin counts per state, e.g. ``2 running, 1 loaded, 1 failed``."""
        return summary(self.status_rows())


def summary_of_reload(plan: str, failures: dict[str, str]) -> str:
    """The reload plan's line, then each plugin that failed and why."""
    if not failures:
        return plan
    return plan + "; failed: " + "; ".join(f"{n}: {why}" for n, why in failures.items())


def build_parser() -> argparse.ArgumentParser:
    """The ``aigis`` command line."""
    parser = argparse.ArgumentParser(prog="aigis", description="Run the AIGIS core daemon.")
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("AIGIS_CONFIG", DEFAULT_CONFIG_PATH),
        help="config file (default: $AIGIS_CONFIG or %(default)s)",
    )
    parser.add_argument(
        "--skip-requirements",
        action="store_true",
        help="never run REQUIREMENTS_COMMAND (dependencies are preinstalled)",
    )
    parser.add_argument(
        "--supervisor",
        choices=SUPERVISORS,
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
    lock = InstanceLock(config.settings.state_dir)
    try:
        lock.acquire()  # before anything else: a second core must not touch the first's sockets
        choice = args.supervisor or config.settings.supervisor
        supervisor = pick_supervisor(choice, config.settings, config.hosts)
    except AigisError as exc:  # another core; the systemd backend asked for but unavailable
        print(f"aigis: {exc}", file=sys.stderr)
        return 1
    try:
        return Daemon(config, supervisor, skip_requirements=args.skip_requirements).run()
    finally:
        lock.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
