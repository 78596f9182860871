"""Every ``[aigis]`` setting, declared once: name, kind, default, allowed range, one-line doc.

The config parser, the ``Settings`` dataclass defaults, the packaged ``etc/aigis/aigis.toml``
(checked by a test) and the backends' own defaults all read this table. Pure, imports nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_CONFIG_PATH = "/etc/aigis/aigis.toml"
PUBLIC_API = ("AigisError", "CoreUnavailable", "RemoteError")  # names `import aigis` reserves

SUPERVISORS = ("auto", "systemd", "embedded")
REQUIREMENT_POLICIES = ("run", "skip")

DEFAULT_PLUGIN_USER = "aigis-plugin"  # created by the packages (sysusers.d/aigis.conf)
MAX_PATH = 4096  # bytes of a path setting (PATH_MAX)
MAX_SECONDS = 7 * 24 * 3600.0  # beyond a week a timeout or delay is a typo, and threads overflow
MAX_LOG_BACKUPS = 1000


@dataclass(frozen=True)
class Setting:
    """One ``[aigis]`` key: what it holds, its default and the range it must fall in.

    ``default`` None means computed at parse time (paths that depend on the environment or on
    another setting); ``doc`` then says how.
    """

    name: str
    kind: str  # path | optional_path | address | choice | seconds | count | plugins | user | flag
    default: object
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float = 0.0
    exclusive: bool = False  # minimum itself is not allowed (> rather than >=)
    maximum: float = math.inf

    @property
    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        if self.kind == "path":
            return "a path (a non-empty string without NUL)"
        if self.kind == "optional_path":
            return 'a path, or "" for none'

        if self.kind == "plugins":
            return '"all", "none", or plugin names separated by spaces'
        if self.kind == "user":
            return 'a user name such as "aigis-plugin"'
        if self.kind == "flag":
            return "true or false"
        if self.kind == "address":
            return 'an address "host:port" or "" to disable'
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        low = f"{'>' if self.exclusive else '>='} {self.minimum:g}"
        if self.kind == "seconds":
            return f"a number of seconds {low} and <= {self.maximum:g}"
        unit = "a number of bytes" if self.name.endswith("_bytes") else "a count"
        top = "" if math.isinf(self.maximum) else f" and <= {self.maximum:g}"
        return f"{unit} {low}{top}"

    def valid(self, value: object) -> bool:
        if self.kind == "user":
            return isinstance(value, str) and is_user_name(value)
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "plugins":
            if not isinstance(value, str) or "\0" in value or len(value) > MAX_PATH:
                return False
            words = value.split()
            return value in ("all", "none") or (bool(words) and all(map(_plugin_name, words)))
        """Whether ``value`` (as TOML gave it) is acceptable for this setting."""
        if self.kind in ("path", "optional_path", "address", "choice"):
            if not isinstance(value, str) or "\0" in value:
                return False
            if self.kind == "optional_path" and value == "":
                return True
            if self.kind in ("path", "optional_path"):
                return 0 < len(value.encode("utf-8", "surrogateescape")) <= MAX_PATH
            return self.kind == "address" or value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "count" and not isinstance(value, int):
            return False
        if not math.isfinite(value) or value > self.maximum:
            return False
        return value > self.minimum if self.exclusive else value >= self.minimum


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "state_dir",
        "path",
        None,
        "plugins under <state_dir>/ext/<name>, requirement stamps, logs; default "
        "$STATE_DIRECTORY, else /var/lib/aigis system-wide, else ~/.local/state/aigis",
    ),
    Setting(
        "secrets_dir", "path", "secrets", "secrets are read from <secrets_dir>/<plugin>/<file>"
    ),
    Setting(
        "runtime_dir",
        "path",
        None,
        "holds the sockets; default $RUNTIME_DIRECTORY, else /run/aigis system-wide, "
        "else $XDG_RUNTIME_DIR/aigis, else <state_dir>/run",
    ),
    Setting("socket", "path", None, "the plugins' Unix socket; default <runtime_dir>/aigis.sock"),
    Setting("tcp", "address", "", 'TCP listener "host:port" for remote plugins; "" disables it'),
    Setting(
        "tcp_plaintext",
        "flag",
        False,
        "false: the TCP listener speaks TLS with the core's own certificate, which plugins pin; "
        "true: plaintext, for a trusted network only (anyone on the path reads every call)",
    ),
    Setting("authkey_file", "path", None, "shared secret; default <state_dir>/authkey"),
    Setting(
        "http",
        "address",
        "",
        'HTTP listener "host:port" for /metrics and the status page; "" disables it; an '
        "address other than loopback needs http_token_file",
    ),
    Setting(
        "http_token_file",
        "optional_path",
        "",
        'file whose first line is a bearer token every HTTP request must carry; "" for none',
    ),
    Setting("supervisor", "choice", "auto", "process supervisor", choices=SUPERVISORS),
    Setting(
        "requirements",
        "choice",
        "run",
        "run each plugin's REQUIREMENTS_COMMAND when its inputs changed, or skip it",
        choices=REQUIREMENT_POLICIES,
    ),
    Setting(
        "requirements_timeout",
        "seconds",
        900.0,
        "a requirements command running longer is killed",
        exclusive=True,
        maximum=MAX_SECONDS,
    ),
    Setting(
        "restart_delay",
        "seconds",
        1.0,
        "delay before restarting a failed plugin, doubling up to restart_delay_max",
        maximum=MAX_SECONDS,
    ),
    Setting("restart_delay_max", "seconds", 60.0, "longest restart delay", maximum=MAX_SECONDS),
    Setting(
        "stop_timeout",
        "seconds",
        10.0,
        "time between SIGTERM and SIGKILL when a plugin is stopped",
        exclusive=True,
        maximum=MAX_SECONDS,
    ),
    Setting(
        "reload_skill",
        "plugins",
        "all",
        "who may call the built-in aigis.AIGISReload(name): all plugins, none, or the plugins "
        "named (the operator's aigisctl reload is not affected)",
    ),
    Setting(
        "load_timeout",
        "seconds",
        0.0,
        "a plugin still loading at start-up after this long (fetch, requirements, import) "
        "fails, and the others load; 0: no limit",
        maximum=MAX_SECONDS,
    ),
    Setting(
        "plugin_user",
        "user",
        DEFAULT_PLUGIN_USER,
        "embedded supervisor started as root: the account plugin processes run as, unless "
        'aigis.toml names one for the plugin (user = "..."); the packages create it. Under '
        "systemd each plugin has its own account; a core that is not root runs them as itself",
    ),
    Setting(
        "connect_timeout",
        "seconds",
        5.0,
        "remote hosts: every ssh connection attempt gives up after this long",
        exclusive=True,
        maximum=300.0,
    ),
    Setting(
        "known_hosts",
        "optional_path",
        "",
        'remote hosts: the known_hosts file holding their keys; "" for ssh\'s own files',
    ),
    Setting(
        "ssh_config",
        "optional_path",
        "",
        'remote hosts: an ssh_config file for ssh -F; "" for ssh\'s usual files',
    ),
    Setting(
        "log_max_bytes",
        "count",
        10 * 1024 * 1024,
        "embedded supervisor: a plugin's log file is rotated at this size",
        exclusive=True,
    ),
    Setting(
        "log_backups",
        "count",
        3,
        "embedded supervisor: rotated log files kept per plugin",
        maximum=MAX_LOG_BACKUPS,
    ),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _plugin_name(word: str) -> bool:
    """Whether ``word`` is a plugin name (aigis._config's NAME_RE, kept free of imports here)."""
    head, tail = word[:1], word[1:]
    return (
        head.isascii()
        and head.isalnum()
        and len(tail) <= 63
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in tail)
    )


def is_user_name(word: str) -> bool:
    """Whether ``word`` is a user name as useradd and systemd-sysusers accept it (ASCII letter
    or ``_``, then up to 31 letters, digits, ``_`` or ``-``)."""
    head, tail = word[:1], word[1:]
    return (
        head.isascii()
        and (head.isalpha() or head == "_")
        and len(tail) <= 31
        and all(c.isascii() and (c.isalnum() or c in "_-") for c in tail)
    )


def default(name: str) -> object:
    """The declared default of setting ``name`` (None: computed at parse time)."""
    return BY_NAME[name].default


RESTART_DELAY: float = default("restart_delay")  # type: ignore[assignment]
RESTART_DELAY_MAX: float = default("restart_delay_max")  # type: ignore[assignment]
STOP_TIMEOUT: float = default("stop_timeout")  # type: ignore[assignment]
REQUIREMENTS_TIMEOUT: float = default("requirements_timeout")  # type: ignore[assignment]
LOAD_TIMEOUT: float = default("load_timeout")  # type: ignore[assignment]
CONNECT_TIMEOUT: float = default("connect_timeout")  # type: ignore[assignment]
LOG_MAX_BYTES: int = default("log_max_bytes")  # type: ignore[assignment]
LOG_BACKUPS: int = default("log_backups")  # type: ignore[assignment]

# Limits on what plugins (and local sources) may make AIGIS read or copy.
MAX_PLUGIN_FILE = 1024 * 1024  # bytes of AIGIS/AIGIS.config or AIGIS/AIGIS.core
MAX_CONFIG_FILE = 1024 * 1024  # bytes of the config file itself
LOCAL_COPY_MAX_BYTES = 1024**3  # total bytes copied from one local source
LOCAL_COPY_MAX_FILES = 100_000  # files and directories copied from one local source
