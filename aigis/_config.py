"""The AIGIS config file (TOML): plugin lists and ``[aigis]`` settings, parsed and validated.

Pure: ``parse_config(text, path)`` never touches anything but its arguments (and the
environment for defaults); ``load_config(path)`` reads the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from aigis import _settings
from aigis._errors import ConfigError
from aigis._quote import escape, shown
from aigis._remote.hosts import HostSpec, hosts_from_table

PLUGIN_TABLES = ("core", "internal", "external")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAME = "aigis"  # owner of the built-in skills (aigis.AIGISReload)


@dataclass(frozen=True)
class PluginEntry:
    """One plugin as the config lists it: its name, table (load order) and source."""

    name: str
    table: str
    source: str
    ref: str | None = None
    #: The account its process runs as under systemd; None: the plugin's own (aigis-NAME).
    user: str | None = None
    #: False: no systemd sandbox for its process (the operator grants it, never the manifest).
    sandbox: bool = True
    #: Where its process runs, overriding the manifest's HOST (a [hosts] name or a destination).
    host: str | None = None


ENTRY_KEYS = ("source", "ref", "user", "sandbox", "host")


@dataclass(frozen=True)
class Settings:
    """The ``[aigis]`` table, with every path made absolute."""

    state_dir: Path
    secrets_dir: Path
    runtime_dir: Path
    socket: Path
    tcp: tuple[str, int] | None
    authkey_file: Path
    supervisor: str = _settings.default("supervisor")  # type: ignore[assignment]
    requirements: str = _settings.default("requirements")  # type: ignore[assignment]
    requirements_timeout: float = _settings.REQUIREMENTS_TIMEOUT
    restart_delay: float = _settings.RESTART_DELAY
    restart_delay_max: float = _settings.RESTART_DELAY_MAX
    stop_timeout: float = _settings.STOP_TIMEOUT
    load_timeout: float = _settings.LOAD_TIMEOUT
    reload_skill: str = _settings.default("reload_skill")  # type: ignore[assignment]
    log_max_bytes: int = _settings.LOG_MAX_BYTES
    log_backups: int = _settings.LOG_BACKUPS
    http: tuple[str, int] | None = None
    http_token_file: Path | None = None
    connect_timeout: float = _settings.CONNECT_TIMEOUT
    known_hosts: Path | None = None
    ssh_config: Path | None = None
    plugin_user: str = _settings.DEFAULT_PLUGIN_USER
    tcp_plaintext: bool = _settings.default("tcp_plaintext")  # type: ignore[assignment]

    @property
    def plugins_dir(self) -> Path:
        """Where plugin sources are fetched to: ``<state>/ext``."""
        return self.state_dir / "ext"

    @property
    def snapshots_dir(self) -> Path:
        """The core's own copies of the plugins' sources: ``<state>/snapshots``."""
        return self.state_dir / "snapshots"

    @property
    def tls_cert_file(self) -> Path:
        """The core's TLS certificate (PEM, 0644), made at its first start with TCP on:
        ``<state>/tls/cert.pem``. Remote plugins pin it (``AIGIS_TLS_CERT_FILE``)."""
        return self.state_dir / "tls" / "cert.pem"

    @property
    def tls_key_file(self) -> Path:
        """The private key of ``tls_cert_file``, beside it (0600): the core's alone, never
        shipped."""
        return self.state_dir / "tls" / "key.pem"

    @property
    def control_socket(self) -> Path:
        """The operators' socket (``aigisctl``), beside the plugins' socket; never on TCP."""
        return self.runtime_dir / "control.sock"

    def plugin_key_file(self, name: str) -> Path:
        """Plugin ``name``'s own key, ``<state>/keys/<name>.key``: it opens the plugins' socket
        as that plugin, and only that plugin receives it."""
        return self.state_dir / "keys" / f"{name}.key"

    @property
    def log_dir(self) -> Path:
        """Where the embedded supervisor writes plugin logs: ``<state>/log``."""
        return self.state_dir / "log"


@dataclass(frozen=True)
class Config:
    """A validated config: where it came from, its settings and plugins in load order."""

    path: Path
    settings: Settings
    plugins: tuple[PluginEntry, ...] = field(default_factory=tuple)
    #: The ``[hosts]`` table: where plugins with a remote HOST run.
    hosts: dict[str, HostSpec] = field(default_factory=dict)

    def plugin(self, name: str) -> PluginEntry | None:
        """The entry called ``name``, or None."""
        return next((p for p in self.plugins if p.name == name), None)


def _system_wide(config_path: Path) -> bool:
    """System paths for root, and for anyone reading a config under /etc (aigisctl run by a
    member of the aigis group must find the system core, not a per-user one)."""
    return os.geteuid() == 0 or config_path.is_relative_to("/etc")


def _default_state_dir(system: bool) -> str:
    """systemd's StateDirectory=, else /var/lib/aigis system-wide, else the XDG state home."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if system:
        return "/var/lib/aigis"
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(xdg, "aigis")


def _default_runtime_dir(state_dir: str, system: bool) -> str:
    """systemd's RuntimeDirectory=, else /run/aigis system-wide, else XDG_RUNTIME_DIR/aigis."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    if system:
        return "/run/aigis"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "aigis")
    return os.path.join(state_dir, "run")


class _Problems:
    """Collects one line per problem, each naming the file and, when known, the line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.index = _key_index(text)
        self.items: list[str] = []

    def line_of(self, table: str | None, key: str) -> int | None:
        """The line where ``key`` is first assigned inside ``[table]`` (None: the top level,
        where an unknown ``[key]`` header counts too)."""
        line = self.index.get((table, key))
        return self.index.get((key, "")) if line is None and table is None else line

    def add(self, table: str | None, key: str, message: str) -> None:
        """Record a problem about ``key`` in ``[table]``."""
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        self.items.append(escape(f"{where}: {message}"))


_HEADER = re.compile(r"\s*\[\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=")


def _key_index(text: str) -> dict[tuple[str | None, str], int]:
    """First line of each ``(table, key)`` assignment, and of each ``[table]`` header under
    ``(table, "")``; a line scan (best effort, for messages), built once per file."""
    index: dict[tuple[str | None, str], int] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header and not line.lstrip().startswith("[["):
            current = header.group(1).strip("\"'")
            index.setdefault((current, ""), number)
            continue
        match = _KEY.match(line)
        if match:
            index.setdefault((current, _key_text(match.group(1))), number)
    return index


def _key_text(raw: str) -> str:
    """A key as TOML reads it: quotes removed, escapes (``"\\u001b"``) decoded."""
    if raw.startswith('"') and "\\" in raw:
        try:
            return next(iter(tomllib.loads(f"{raw} = 0")))
        except (tomllib.TOMLDecodeError, RecursionError):
            pass
    return raw.strip("\"'")


def _duplicate_names(text: str) -> list[tuple[str, str, int, int]]:
    """(name, table, first line, second line) for a key assigned twice in one plugin table.

    tomllib rejects these with a terse "Cannot overwrite a value"; we say which plugin.
    """
    seen: dict[tuple[str | None, str], int] = {}
    found = []
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = header.group(1).strip("\"'")
            continue
        match = _KEY.match(line)
        if match and current in PLUGIN_TABLES:
            key = match.group(1).strip("\"'")
            if (current, key) in seen:
                found.append((key, current, seen[(current, key)], number))
            else:
                seen[(current, key)] = number
    return found


def _toml(text: str, path: Path) -> dict:
    """``tomllib.loads`` with every failure turned into ConfigError lines naming the file."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        dups = _duplicate_names(text)
        if dups and "overwrite" in str(exc):
            raise ConfigError(
                [
                    escape(
                        f'{path}:{second}: [{table}] duplicate plugin name "{name}" '
                        f"(first at line {first})"
                    )
                    for name, table, first, second in dups
                ]
            ) from None
        where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
        if where:
            message = str(exc)[: where.start()]
            line = (
                f"{path}:{where.group(1)}: TOML syntax error: {message} (column {where.group(2)})"
            )
        else:
            line = f"{path}: TOML syntax error: {exc}"
        raise ConfigError([escape(line)]) from None
    except (RecursionError, MemoryError) as exc:
        raise ConfigError(
            [f"{escape(str(path))}: TOML too deeply nested or too large ({type(exc).__name__})"]
        ) from None


def parse_config(text: str, path: Path) -> Config:
    """Validate the TOML ``text`` of the config at ``path``; ConfigError lists every problem."""
    path = Path(path).absolute()
    data = _toml(text, path)
    problems = _Problems(path, text)

    for key, value in data.items():
        if key not in (*PLUGIN_TABLES, "aigis", "hosts"):
            problems.add(
                None,
                key,
                f'unknown table or key "{escape(key, 80)}"; '
                "expected [aigis], [hosts], [core], [internal] or [external]",
            )
        elif not isinstance(value, dict):
            problems.add(None, key, f'"{key}" must be a table [{key}], got {type(value).__name__}')

    plugins: list[PluginEntry] = []
    first_table: dict[str, str] = {}
    for table in PLUGIN_TABLES:
        entries = data.get(table, {})
        if not isinstance(entries, dict):
            continue
        for name, value in entries.items():
            entry = _parse_entry(problems, table, name, value)
            if entry is None:
                continue
            if name in first_table:
                problems.add(
                    table,
                    name,
                    f'[{table}] duplicate plugin name "{name}" '
                    f"(already listed in [{first_table[name]}])",
                )
                continue
            first_table[name] = table
            plugins.append(entry)

    aigis_table = data.get("aigis", {})
    settings = _parse_settings(problems, aigis_table if isinstance(aigis_table, dict) else {}, path)
    hosts_table = data.get("hosts", {})
    hosts = _parse_hosts(problems, hosts_table if isinstance(hosts_table, dict) else {})
    if problems.items:
        raise ConfigError(problems.items)
    assert settings is not None
    return Config(path=path, settings=settings, plugins=tuple(plugins), hosts=hosts)


def _parse_hosts(problems: _Problems, table: dict) -> dict[str, HostSpec]:
    """The ``[hosts]`` table; each problem names its key (``hosts.web1.port: ...``)."""
    try:
        return hosts_from_table(table)
    except ConfigError as exc:
        for line in exc.problems:
            name = line.split(":", 1)[0].split(".")[1] if line.startswith("hosts.") else ""
            problems.add("hosts", name, f"[hosts] {line}")
        return {}


def _parse_entry(problems: _Problems, table: str, name: str, value: object) -> PluginEntry | None:
    """One ``name = source`` or ``name = {source = ..., ref = ...}`` line."""
    ok = True
    quoted = escape(name, 80)
    if name == RESERVED_NAME:
        problems.add(
            table,
            name,
            f'[{table}] plugin name "{name}" is reserved for AIGIS\'s '
            "built-in skills; choose another name",
        )
        ok = False
    elif not NAME_RE.fullmatch(name):
        problems.add(
            table,
            name,
            f'[{table}] invalid plugin name "{quoted}": expected a letter '
            "or digit, then up to 63 of letters, digits, '_', '.', '-'",
        )
        ok = False
    if isinstance(value, str):
        source, ref = value, None
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(ENTRY_KEYS))
        if unknown:
            problems.add(
                table,
                name,
                f'[{table}] plugin "{quoted}": unknown key(s) {escape(", ".join(unknown), 120)}; '
                "expected source and optional ref, user, sandbox, host",
            )
            ok = False
        source, ref = value.get("source"), value.get("ref")  # type: ignore[assignment]
        ok = _check_privilege(problems, table, name, value) and ok
        if not isinstance(source, str):
            problems.add(
                table,
                name,
                f'[{table}] plugin "{quoted}": "source" must be a string '
                "(a git URL or a local path)",
            )
            ok = False
        if ref is not None and not (isinstance(ref, str) and ref):
            problems.add(
                table,
                name,
                f'[{table}] plugin "{quoted}": "ref" must be a non-empty '
                "string (branch, tag or commit)",
            )
            ok = False
    else:
        problems.add(
            table,
            name,
            f'[{table}] plugin "{quoted}": expected a source string or '
            f"{{ source = ..., ref = ... }}, got {type(value).__name__}",
        )
        return None
    for key, text in (("source", source), ("ref", ref)):
        if ok and isinstance(text, str) and "\0" in text:
            problems.add(table, name, f'[{table}] plugin "{quoted}": {key} contains a NUL byte')
            ok = False
    if ok and not source.strip():
        problems.add(table, name, f'[{table}] plugin "{quoted}": source is empty')
        ok = False
    if not ok:
        return None
    options = value if isinstance(value, dict) else {}
    return PluginEntry(
        name=name,
        table=table,
        source=source,
        ref=ref,
        user=options.get("user"),
        sandbox=options.get("sandbox", True),
        host=options.get("host"),
    )


def _check_privilege(problems: _Problems, table: str, name: str, value: dict) -> bool:
    """``user`` (an account name) and ``sandbox`` (a boolean) of one plugin entry."""
    ok = True
    user = value.get("user")
    if user is not None and not (isinstance(user, str) and _settings.is_user_name(user)):
        problems.add(
            table,
            name,
            f'[{table}] plugin "{escape(name, 80)}": "user" must be a user name such as "root", '
            f"got {shown(user)}",
        )
        ok = False
    host = value.get("host")
    if host is not None and not (isinstance(host, str) and host.strip() and "\0" not in host):
        problems.add(
            table,
            name,
            f'[{table}] plugin "{escape(name, 80)}": "host" must be a host of [hosts], an ssh '
            f'destination or "localhost", got {shown(host)}',
        )
        ok = False
    sandbox = value.get("sandbox", True)
    if not isinstance(sandbox, bool):
        problems.add(
            table,
            name,
            f'[{table}] plugin "{escape(name, 80)}": "sandbox" must be true or false, '
            f"got {shown(sandbox)}",
        )
        ok = False
    return ok


def _parse_settings(problems: _Problems, values: dict, config_path: Path) -> Settings | None:
    """The ``[aigis]`` table with defaults; relative paths resolve against the config's dir."""
    base = config_path.parent
    for key, value in values.items():
        setting = _settings.BY_NAME.get(key)
        if setting is None:
            problems.add(
                "aigis",
                key,
                f'[aigis] unknown setting "{escape(key, 80)}"; known: '
                + ", ".join(s.name for s in _settings.SETTINGS),
            )
        elif not setting.valid(value):
            problems.add(
                "aigis",
                key,
                f"[aigis] {key} must be {setting.expected}, "
                f"got {type(value).__name__} {shown(value)}",
            )
    tcp = _parse_tcp(problems, values["tcp"]) if values.get("tcp") else None
    http = _parse_tcp(problems, values["http"], "http") if values.get("http") else None
    if http is not None and not is_loopback(http[0]) and not values.get("http_token_file"):
        problems.add(
            "aigis",
            "http",
            f'[aigis] http "{escape(values["http"], 80)}" is not a loopback address: set '
            "http_token_file too (a file with the bearer token every request must carry)",
        )
    if problems.items:
        return None

    def get(key: str, computed: object = None) -> object:
        default = _settings.default(key)
        return values.get(key, computed if default is None else default)

    def path_of(key: str, computed: str | None = None) -> Path:
        raw = str(get(key, computed))
        return (base / os.path.expanduser(raw)).absolute()

    system = _system_wide(config_path)
    state_dir = path_of("state_dir", _default_state_dir(system))
    runtime_dir = path_of("runtime_dir", _default_runtime_dir(str(state_dir), system))
    return Settings(
        state_dir=state_dir,
        secrets_dir=path_of("secrets_dir"),
        runtime_dir=runtime_dir,
        socket=path_of("socket", str(runtime_dir / "aigis.sock")),
        tcp=tcp,
        authkey_file=path_of("authkey_file", str(state_dir / "authkey")),
        supervisor=str(get("supervisor")),
        requirements=str(get("requirements")),
        requirements_timeout=float(get("requirements_timeout")),  # type: ignore[arg-type]
        restart_delay=float(get("restart_delay")),  # type: ignore[arg-type]
        restart_delay_max=float(get("restart_delay_max")),  # type: ignore[arg-type]
        stop_timeout=float(get("stop_timeout")),  # type: ignore[arg-type]
        load_timeout=float(get("load_timeout")),  # type: ignore[arg-type]
        reload_skill=" ".join(str(get("reload_skill")).split()),
        log_max_bytes=int(get("log_max_bytes")),  # type: ignore[call-overload]
        log_backups=int(get("log_backups")),  # type: ignore[call-overload]
        http=http,
        http_token_file=path_of("http_token_file") if values.get("http_token_file") else None,
        connect_timeout=float(get("connect_timeout")),  # type: ignore[arg-type]
        known_hosts=path_of("known_hosts") if values.get("known_hosts") else None,
        ssh_config=path_of("ssh_config") if values.get("ssh_config") else None,
        plugin_user=str(get("plugin_user")),
        tcp_plaintext=bool(get("tcp_plaintext")),
    )


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1); any other name is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_tcp(problems: _Problems, raw: object, key: str = "tcp") -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` (an invalid type was already reported)."""
    if not isinstance(raw, str) or "\0" in raw:
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", raw)
    if not match:
        problems.add(
            "aigis",
            key,
            f'[aigis] {key} must be "host:port" (e.g. "127.0.0.1:7878"), got {shown(raw)}',
        )
        return None
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        problems.add("aigis", key, f"[aigis] {key} port must be 0-65535, got {port}")
        return None
    return host, port


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path`` (a regular file, size-capped)."""
    path = Path(path).absolute()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError([f"{escape(str(path))}: config file not found"]) from None
    except (OSError, ValueError) as exc:  # ValueError: NUL in the path
        raise ConfigError([escape(f"{path}: cannot read config file: {exc}")]) from None
    try:
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ConfigError([escape(f"{path}: config file is not a regular file")])
            data = file.read(_settings.MAX_CONFIG_FILE + 1)
        if len(data) > _settings.MAX_CONFIG_FILE:
            raise ConfigError(
                [escape(f"{path}: config file is larger than {_settings.MAX_CONFIG_FILE} bytes")]
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([escape(f"{path}: cannot read config file: {exc}")]) from None
    return parse_config(text, path)
