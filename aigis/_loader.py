"""The per-plugin load pipeline: fetch, manifest, requirements, secrets, skills; and unload.

One plugin failing any step is marked failed with its reason; the others still load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aigis import _sources
from aigis._config import PluginEntry, Settings
from aigis._coreplugin import CoreModule, forget_modules_under, import_core
from aigis._errors import AigisError, ManifestError, PluginError, SkillError
from aigis._log import about, plugin_logger
from aigis._manifest import CORE_FILE, MANIFEST, Manifest, own_names
from aigis._namespace import Namespace, Skill
from aigis._paths import make_dir
from aigis._plugindir import validate_plugin
from aigis._remote.hosts import HostSpec
from aigis._remote.plan import placement
from aigis._requirements import check_system, install
from aigis._secrets import copy_secrets, plan_secrets
from aigis._snapshot import in_snapshot, take_snapshot
from aigis._states import PROCESS_KINDS, Kind, State

log = logging.getLogger(__name__)


@dataclass
class Plugin:
    """A plugin as the core knows it: entry, where it lives, what was loaded, its state."""

    entry: PluginEntry
    root: Path
    state: State = State.NEW  # NEW, LOADED or FAILED; a process's states come from its supervisor
    reason: str = ""
    manifest: Manifest | None = None
    commit: str | None = None
    core: CoreModule | None = None
    skills: list[Skill] = field(default_factory=list)
    loaded_at: float = 0.0
    supervised: bool = False  # its process is handed to the supervisor
    #: The remote host its process runs on (None: this machine), and the secrets shipped there
    #: as (path inside the plugin directory, file in the secrets directory).
    remote: HostSpec | None = None
    remote_secrets: list[tuple[str, Path]] = field(default_factory=list)
    #: The core's own copy of the source (aigis._snapshot): everything the core reads, imports
    #: or runs comes from here, never from ``root``, which the plugin's account may rewrite.
    files: Path | None = None

    @property
    def name(self) -> str:
        """The plugin's unique name from the config."""
        return self.entry.name

    @property
    def plugin_type(self) -> Kind:
        """core, internal or external (from the manifest), or the config table before that."""
        return Kind(self.manifest.plugin_type if self.manifest else self.entry.table)

    @property
    def host(self) -> str:
        """Where its process runs: a remote host's name, else ``localhost``."""
        return self.remote.name if self.remote is not None else "localhost"

    @property
    def source(self) -> str:
        """The source the config lists."""
        return self.entry.source

    @property
    def ref(self) -> str | None:
        """The branch, tag or commit the config pins, if any."""
        return self.entry.ref

    @property
    def has_process(self) -> bool:
        """Loaded, and of a kind that runs a process."""
        return self.state is State.LOADED and self.plugin_type in PROCESS_KINDS


class Loader:
    """Runs the load pipeline against one namespace and one set of settings."""

    def __init__(
        self,
        settings: Settings,
        namespace: Namespace,
        base_dir: Path,
        skip_requirements: bool = False,
        cancel: threading.Event | None = None,
        progress: Callable[[str, str], None] | None = None,
        hosts: dict[str, HostSpec] | None = None,
    ) -> None:
        self.settings = settings
        self.hosts = hosts or {}
        self.namespace = namespace
        self.base_dir = base_dir
        self.skip_requirements = skip_requirements or settings.requirements == "skip"
        # Set when AIGIS is asked to stop: a running requirements command is killed.
        self.cancel = cancel
        # Told (plugin, step) as each step of a load begins: start-up can take minutes.
        self._progress = progress or (lambda _name, _step: None)

    def root_of(self, name: str) -> Path:
        """``<state>/ext/<name>``."""
        return self.settings.plugins_dir / name

    def load(self, entry: PluginEntry) -> Plugin:
        """Run every step for ``entry``; never raises for a plugin's own fault."""
        plugin = Plugin(entry=entry, root=self.root_of(entry.name))
        try:
            self._prepare(plugin)
            files = plugin.files
            if (
                plugin.manifest
                and files is not None
                and (files / CORE_FILE).is_file()
                and plugin.manifest.plugin_type in (Kind.CORE, Kind.INTERNAL)
            ):
                self._load_core(plugin)
            elif plugin.manifest and plugin.manifest.plugin_type == Kind.CORE:
                raise SkillError(entry.name, f"core plugins need {plugin.root / CORE_FILE}")
        except PluginError as exc:
            return self._failed(plugin, exc.reason)
        except AigisError as exc:
            return self._failed(plugin, str(exc))
        except Exception as exc:  # a bug or an OS error: this plugin fails, the daemon goes on
            log.debug("traceback of the failure", exc_info=True)
            return self._failed(plugin, f"unexpected {type(exc).__name__}: {exc}")
        plugin.state = State.LOADED
        plugin.loaded_at = time.time()
        names = ", ".join(s.path for s in plugin.skills)
        log.info(
            'loaded: plugin "%s" (%s)%s',
            plugin.name,
            plugin.plugin_type,
            f": {len(plugin.skills)} skills: {names}" if plugin.skills else "",
            **about(plugin.name),
        )
        return plugin

    def _failed(self, plugin: Plugin, reason: str) -> Plugin:
        plugin.state, plugin.reason = State.FAILED, reason
        log.error('failed: plugin "%s": %s', plugin.name, reason, **about(plugin.name))
        return plugin

    def _prepare(self, plugin: Plugin) -> None:
        """fetch -> manifest -> system requirements -> requirements -> secrets."""
        entry = plugin.entry
        make_dir(self.settings.plugins_dir)
        self._progress(entry.name, "fetching")
        fetched = _sources.fetch(
            entry.name, entry.source, plugin.root, ref=entry.ref, base_dir=self.base_dir
        )
        plugin.commit = fetched.commit
        plugin.files = files = take_snapshot(
            entry.name, fetched, entry.source, self.base_dir, self.settings.snapshots_dir
        )
        self._progress(entry.name, "reading its manifest")
        checked = validate_plugin(plugin.root, entry.name, entry.table, files)
        plugin.manifest = manifest = checked.manifest
        for warning in checked.warnings:
            log.warning('manifest: plugin "%s": %s', entry.name, warning, **about(entry.name))
        if checked.errors:
            raise ManifestError(entry.name, checked.errors)
        assert manifest is not None
        plugin.remote = placement(
            entry.name, manifest.plugin_type, entry.host, manifest.host, self.hosts, own_names()
        )
        if plugin.remote is not None:
            # System requirements, requirements and secrets are the host's business: checked,
            # run and shipped there by its supervisor. Missing secrets fail the load here.
            pairs = plan_secrets(entry.name, manifest.secrets, self.settings.secrets_dir,
                                 plugin.root)  # fmt: skip
            plugin.remote_secrets = [(str(t.relative_to(plugin.root)), s) for s, t in pairs]
            return
        check_system(entry.name, manifest.system_requirements, str(plugin.root / MANIFEST))
        if self.skip_requirements:
            if manifest.requirements_command:
                log.info(
                    'skipped: plugin "%s": requirements (policy "skip")',
                    entry.name,
                    **about(entry.name),
                )
        else:
            self._progress(entry.name, "running requirements")
            # As the core's account, so from the snapshot only: the command, its file and its
            # working directory are the operator's source, never files the plugin can write.
            file = manifest.requirements_file
            install(
                entry.name,
                manifest.requirements_command,
                str(in_snapshot(Path(file), plugin.root, files)) if file else None,
                cwd=in_snapshot(manifest.entrypoint, plugin.root, files),
                marker=self.settings.state_dir / "requirements" / f"{entry.name}.sha256",
                timeout=self.settings.requirements_timeout,
                logger=plugin_logger(entry.name),
                cancel=self.cancel,
            )
        if manifest.secrets:
            self._progress(entry.name, "copying secrets")
            count = copy_secrets(
                entry.name, manifest.secrets, self.settings.secrets_dir, plugin.root
            )
            log.info('secrets: plugin "%s": %d copied', entry.name, count, **about(entry.name))

    def _load_core(self, plugin: Plugin) -> None:
        """Import AIGIS.core and register its SKILLS (all or nothing)."""
        assert plugin.manifest is not None and plugin.files is not None
        self._progress(plugin.name, "importing AIGIS.core")
        entrypoint = in_snapshot(plugin.manifest.entrypoint, plugin.root, plugin.files)
        core = import_core(
            plugin.name, plugin.files / CORE_FILE, entrypoint, plugin.root / CORE_FILE
        )
        plugin.skills = self.namespace.register(
            plugin.name, core.module, core.skills, core.origin, plugin_logger(plugin.name)
        )
        plugin.core = core

    def forget(self, plugin: Plugin) -> None:
        """Undo whatever an interrupted load left: its skills and its imported modules."""
        self.namespace.remove(plugin.name)
        if plugin.files is not None:
            forget_modules_under(plugin.files)

    def unload(self, plugin: Plugin) -> None:
        """Run the plugin's cleanup once (errors logged) and remove its skills."""
        self.namespace.remove(plugin.name)
        core, plugin.core = plugin.core, None
        imported = core is not None
        if core is not None and core.cleanup is not None:
            try:
                core.cleanup()
                log.info('cleaned up: plugin "%s"', plugin.name, **about(plugin.name))
            except (Exception, SystemExit) as exc:  # one cleanup must not stop the others
                log.error(
                    'cleanup failed: plugin "%s": %s: %s',
                    plugin.name,
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                    **about(plugin.name),
                )
        if imported and plugin.files is not None:
            # only an AIGIS.core brings modules into the core (a scan of sys.modules)
            forget_modules_under(plugin.files)
