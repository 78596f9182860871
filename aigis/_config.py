"""The AIGIS config file (TOML): plugin lists and ``[aigis]`` settings, parsed and validated.

Pure: ``parse_config(text, path)`` never touches anything but its arguments (and the
environment for defaults); ``load_config(path)`` reads the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from aigis._errors import ConfigError

PLUGIN_TABLES = ("core", "internal", "external")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SUPERVISORS = ("auto", "systemd", "embedded")
RESERVED_NAME = "aigis"  # owner of the built-in skills (aigis.AIGISReload)
REQUIREMENT_POLICIES = ("run", "skip")


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


#: What aigis.toml accepts as ``user``: a user name (as useradd and systemd-sysusers do).
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,31}")
ENTRY_KEYS = ("source", "ref", "user", "sandbox")


@dataclass(frozen=True)
class Settings:
    """The ``[aigis]`` table, with every path made absolute."""

    state_dir: Path
    secrets_dir: Path
    runtime_dir: Path
    socket: Path
    tcp: tuple[str, int] | None
    authkey_file: Path
    supervisor: str = "auto"
    requirements: str = "run"
    requirements_timeout: float = 900.0
    restart_delay: float = 1.0
    restart_delay_max: float = 60.0
    stop_timeout: float = 10.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3

    @property
    def plugins_dir(self) -> Path:
        """Where plugin sources are fetched to: ``<state>/ext``."""
        return self.state_dir / "ext"

    @property
    def control_socket(self) -> Path:
        """The operators' socket (``aigisctl``), beside the plugins' socket; never on TCP."""
        return self.runtime_dir / "control.sock"

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


# key -> (expected type(s), description for error messages)
_SETTING_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "state_dir": ((str,), "a path"),
    "secrets_dir": ((str,), "a path"),
    "runtime_dir": ((str,), "a path"),
    "socket": ((str,), "a path"),
    "tcp": ((str,), 'an address "host:port" or "" to disable'),
    "authkey_file": ((str,), "a path"),
    "supervisor": ((str,), "one of " + ", ".join(SUPERVISORS)),
    "requirements": ((str,), "one of " + ", ".join(REQUIREMENT_POLICIES)),
    "requirements_timeout": ((int, float), "a number of seconds > 0"),
    "restart_delay": ((int, float), "a number of seconds >= 0"),
    "restart_delay_max": ((int, float), "a number of seconds >= 0"),
    "stop_timeout": ((int, float), "a number of seconds > 0"),
    "log_max_bytes": ((int,), "a number of bytes > 0"),
    "log_backups": ((int,), "a count >= 0"),
}


class _Problems:
    """Collects one line per problem, each naming the file and, when known, the line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.items: list[str] = []

    def line_of(self, table: str | None, key: str) -> int | None:
        """The line where ``key`` is assigned inside ``[table]`` (None: the top level)."""
        current: str | None = None
        key_re = re.compile(r'\s*(?:"%s"|\'%s\'|%s)\s*=' % ((re.escape(key),) * 3))
        for number, line in enumerate(self.lines, 1):
            header = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
            if header and not line.lstrip().startswith("[["):
                current = header.group(1).strip("\"'")
                if table is not None and current == table and key == "":
                    return number
                continue
            if current == table and key_re.match(line):
                return number
        return None

    def add(self, table: str | None, key: str, message: str) -> None:
        """Record a problem about ``key`` in ``[table]``."""
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        self.items.append(f"{where}: {message}")


def _duplicate_names(text: str) -> list[tuple[str, str, int, int]]:
    """(name, table, first line, second line) for a key assigned twice in one plugin table.

    tomllib rejects these with a terse "Cannot overwrite a value"; we say which plugin.
    """
    seen: dict[tuple[str | None, str], int] = {}
    found = []
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1).strip("\"'")
            continue
        match = re.match(r"\s*(\"[^\"]+\"|'[^']+'|[A-Za-z0-9_.-]+)\s*=", line)
        if match and current in PLUGIN_TABLES:
            key = match.group(1).strip("\"'")
            if (current, key) in seen:
                found.append((key, current, seen[(current, key)], number))
            else:
                seen[(current, key)] = number
    return found


def parse_config(text: str, path: Path) -> Config:
    """Validate the TOML ``text`` of the config at ``path``; ConfigError lists every problem."""
    path = Path(path).absolute()
    problems = _Problems(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        dups = _duplicate_names(text)
        if dups and "overwrite" in str(exc):
            for name, table, first, second in dups:
                problems.items.append(
                    f'{path}:{second}: [{table}] duplicate plugin name "{name}" '
                    f"(first at line {first})"
                )
        else:
            where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
            if where:
                message = str(exc)[: where.start()]
                problems.items.append(
                    f"{path}:{where.group(1)}: TOML syntax error: {message} "
                    f"(column {where.group(2)})"
                )
            else:
                problems.items.append(f"{path}: TOML syntax error: {exc}")
        raise ConfigError(problems.items) from None

    for key, value in data.items():
        if key not in (*PLUGIN_TABLES, "aigis"):
            problems.add(
                None,
                key,
                f'unknown table or key "{key}"; expected [aigis], [core], [internal] or [external]',
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
    if problems.items:
        raise ConfigError(problems.items)
    assert settings is not None
    return Config(path=path, settings=settings, plugins=tuple(plugins))


def _parse_entry(problems: _Problems, table: str, name: str, value: object) -> PluginEntry | None:
    """One ``name = source`` or ``name = {source = ..., ref = ...}`` line."""
    ok = True
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
            f'[{table}] invalid plugin name "{name}": expected a letter '
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
                f'[{table}] plugin "{name}": unknown key(s) '
                f"{', '.join(unknown)}; expected source and optional ref, user, sandbox",
            )
            ok = False
        source, ref = value.get("source"), value.get("ref")
        ok = _check_privilege(problems, table, name, value) and ok
        if not isinstance(source, str):
            problems.add(
                table,
                name,
                f'[{table}] plugin "{name}": "source" must be a string (a git URL or a local path)',
            )
            ok = False
        if ref is not None and not (isinstance(ref, str) and ref):
            problems.add(
                table,
                name,
                f'[{table}] plugin "{name}": "ref" must be a non-empty '
                "string (branch, tag or commit)",
            )
            ok = False
    else:
        problems.add(
            table,
            name,
            f'[{table}] plugin "{name}": expected a source string or '
            f"{{ source = ..., ref = ... }}, got {type(value).__name__}",
        )
        return None
    if ok and not source.strip():
        problems.add(table, name, f'[{table}] plugin "{name}": source is empty')
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
    )


def _check_privilege(problems: _Problems, table: str, name: str, value: dict) -> bool:
    """``user`` (an account name) and ``sandbox`` (a boolean) of one plugin entry."""
    ok = True
    user = value.get("user")
    if user is not None and not (isinstance(user, str) and USER_RE.fullmatch(user)):
        problems.add(
            table,
            name,
            f'[{table}] plugin "{name}": "user" must be a user name such as "root", got {user!r}',
        )
        ok = False
    sandbox = value.get("sandbox", True)
    if not isinstance(sandbox, bool):
        problems.add(
            table,
            name,
            f'[{table}] plugin "{name}": "sandbox" must be true or false, got {sandbox!r}',
        )
        ok = False
    return ok


def _parse_settings(problems: _Problems, table: dict, config_path: Path) -> Settings | None:
    """The ``[aigis]`` table with defaults; relative paths resolve against the config's dir."""
    base = config_path.parent
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in _SETTING_TYPES:
            problems.add(
                "aigis",
                key,
                f'[aigis] unknown setting "{key}"; known: ' + ", ".join(_SETTING_TYPES),
            )
            continue
        types, expected = _SETTING_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.add(
                "aigis",
                key,
                f"[aigis] {key} must be {expected}, got {type(value).__name__} {value!r}",
            )
            continue
        values[key] = value

    def path_of(key: str, default: str) -> Path:
        raw = str(values.get(key, default))
        return (base / os.path.expanduser(raw)).absolute()

    system = _system_wide(config_path)
    state_dir = path_of("state_dir", _default_state_dir(system))
    runtime_dir = path_of("runtime_dir", _default_runtime_dir(str(state_dir), system))
    tcp = None
    raw_tcp = values.get("tcp", "")
    if raw_tcp:
        tcp = _parse_tcp(problems, str(raw_tcp))
    for key in ("supervisor", "requirements"):
        allowed = SUPERVISORS if key == "supervisor" else REQUIREMENT_POLICIES
        if key in values and values[key] not in allowed:
            problems.add(
                "aigis",
                key,
                f"[aigis] {key} must be one of {', '.join(allowed)}, got {values[key]!r}",
            )
    for key in ("requirements_timeout", "stop_timeout", "log_max_bytes"):
        if key in values and values[key] <= 0:  # type: ignore[operator]
            problems.add("aigis", key, f"[aigis] {key} must be > 0, got {values[key]!r}")
    for key in ("restart_delay", "restart_delay_max", "log_backups"):
        if key in values and values[key] < 0:  # type: ignore[operator]
            problems.add("aigis", key, f"[aigis] {key} must be >= 0, got {values[key]!r}")
    if problems.items:
        return None
    return Settings(
        state_dir=state_dir,
        secrets_dir=path_of("secrets_dir", "secrets"),
        runtime_dir=runtime_dir,
        socket=path_of("socket", str(runtime_dir / "aigis.sock")),
        tcp=tcp,
        authkey_file=path_of("authkey_file", str(state_dir / "authkey")),
        supervisor=str(values.get("supervisor", "auto")),
        requirements=str(values.get("requirements", "run")),
        requirements_timeout=float(values.get("requirements_timeout", 900.0)),  # type: ignore[arg-type]
        restart_delay=float(values.get("restart_delay", 1.0)),  # type: ignore[arg-type]
        restart_delay_max=float(values.get("restart_delay_max", 60.0)),  # type: ignore[arg-type]
        stop_timeout=float(values.get("stop_timeout", 10.0)),  # type: ignore[arg-type]
        log_max_bytes=int(values.get("log_max_bytes", 10 * 1024 * 1024)),  # type: ignore[call-overload]
        log_backups=int(values.get("log_backups", 3)),  # type: ignore[call-overload]
    )


def _parse_tcp(problems: _Problems, raw: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port``."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", raw)
    if not match:
        problems.add(
            "aigis", "tcp", f'[aigis] tcp must be "host:port" (e.g. "127.0.0.1:7878"), got {raw!r}'
        )
        return None
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        problems.add("aigis", "tcp", f"[aigis] tcp port must be 0-65535, got {port}")
        return None
    return host, port


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc}"]) from None
    return parse_config(text, path)
