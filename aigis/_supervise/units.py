"""systemd unit names and per-plugin drop-ins, rendered by pure functions (golden-tested)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from aigis._states import Kind
from aigis._supervise.base import ProcessSpec

TEMPLATE = "aigis-plugin@.service"
DROPIN_NAME = "50-aigis.conf"
#: Where each unit's ExecStopPost= leaves how its last process ended (``dropins.read_exit``):
#: systemd collects an inactive unit, and with it ExecMainStatus, soon after a clean exit.
EXIT_DIR = "/run/aigis/exits"
# Restart counting needs a window longer than any plausible crash loop: one day.
START_LIMIT_INTERVAL = "1d"
_UNIT_SAFE = re.compile(r"[A-Za-z0-9:_.]")
#: What systemd-sysusers accepts as a user name (strict: no dots, at most 31 characters).
_USER_SAFE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")
USER_PREFIX = "aigis-"

#: The sandbox of every plugin unit that does not opt out (``sandbox = false`` in aigis.toml).
#: Each line is a systemd.exec(5) setting; together they give the unit no capabilities, a
#: read-only system, private /tmp and devices, no kernel, clock or cgroup access, and a syscall
#: filter that still runs ordinary Python and shell programs.
SANDBOX = (
    "UMask=0077",
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateIPC=yes",
    "PrivateUsers=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "RestrictSUIDSGID=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "LockPersonality=yes",
    "RemoveIPC=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    # PrivateDevices= keeps the host's /dev/shm, shared by every unit: give each its own.
    "TemporaryFileSystem=/dev/shm:mode=1777,nosuid,nodev",
)


def systemd_escape(name: str) -> str:
    """Escape ``name`` for use as a unit instance, as ``systemd-escape`` does."""
    out = []
    for index, char in enumerate(name):
        if char == "/":
            out.append("-")
        elif _UNIT_SAFE.fullmatch(char) and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def unit_name(plugin: str) -> str:
    """``aigis-plugin@NAME.service`` with NAME escaped."""
    return f"aigis-plugin@{systemd_escape(plugin)}.service"


def plugin_of_unit(unit: str) -> str | None:
    """The plugin name of an ``aigis-plugin@….service`` unit, else None."""
    match = re.fullmatch(r"aigis-plugin@(.+)\.service", unit)
    if not match:
        return None
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), match.group(1))


def plugin_user(plugin: str) -> str:
    """The plugin's own account: ``aigis-NAME``, or for names systemd-sysusers would refuse
    (dots, too long) ``aigis_`` + a readable prefix + a hash. The two forms never collide."""
    user = USER_PREFIX + plugin
    if _USER_SAFE.fullmatch(user):
        return user
    digest = hashlib.sha256(plugin.encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", plugin)[:16]
    return f"aigis_{readable}_{digest}"


def quote(value: str, variables: bool = True) -> str:
    """One word for a unit file line: specifiers (%) kept literal, and variables ($) too where
    systemd expands them (``ExecStart=``; ``Environment=`` does no ``$`` expansion)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = escaped.replace("%", "%%")
    if variables:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def _seconds(value: float) -> str:
    """systemd time span in milliseconds, so fractional delays survive."""
    return f"{int(round(value * 1000))}ms"


def _path_word(path: Path | str) -> str:
    """One word of a space-separated path list (BindPaths=, TemporaryFileSystem=)."""
    return quote(str(path), variables=False)


def _sandbox_lines(spec: ProcessSpec) -> list[str]:
    """User=, credentials, and (unless opted out) the sandbox with the plugin's own directory
    writable and the rest of the state directory replaced by an empty read-only tmpfs."""
    lines = []
    if spec.user is not None:
        lines.append(f"User={spec.user}")
    for var, credential in sorted(spec.credentials.items()):
        source = spec.env[var].replace("%", "%%")
        lines.append(f"LoadCredential={credential}:{source}")
    if not spec.sandbox:
        return lines
    lines += SANDBOX
    own, hidden = spec.own_dir, spec.hidden_dir
    if hidden is not None and str(hidden) != "/":
        lines.append(f"TemporaryFileSystem={_path_word(f'{hidden}:ro')}")
    if own is not None:
        if hidden is not None and own.is_relative_to(hidden) and own != hidden:
            lines.append(f"BindPaths={_path_word(own)}")
        else:
            lines.append(f"ReadWritePaths={_path_word(own)}")
    return lines


def _environment(key: str, value: str, credential: str | None) -> str:
    """One Environment= line; a credential's variable names the file under ``%d`` (systemd's
    $CREDENTIALS_DIRECTORY), the only specifier AIGIS writes unescaped."""
    if credential is None:
        return f"Environment={quote(f'{key}={value}', variables=False)}"
    return f'Environment={quote(f"{key}=", variables=False)[:-1]}%d/{credential}"'


def exit_record_line(exit_dir: str = EXIT_DIR) -> str:
    """``ExecStopPost=`` that records, after every end of the unit's main process, systemd's
    ``$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS`` as the target of a symlink named after the unit
    (``ln -sfn`` replaces it in one rename; its mtime is the time of the end). ``+``: outside the
    plugin's sandbox and account; ``-``: a failure to record never fails the unit."""
    record = '"${SERVICE_RESULT} ${EXIT_CODE} ${EXIT_STATUS}"'
    return f'ExecStopPost=-+/bin/ln -sfn {record} {quote(exit_dir, variables=False)[:-1]}/%n"'


#: Written for the template while AIGIS stops every plugin (sorted after the plugins' own
#: drop-ins, so it wins): those exits need no record, and each ExecStopPost= costs PID 1 a fork.
STOPPING_DROPIN_NAME = "90-aigis-stopping.conf"


def render_stopping_dropin() -> str:
    """The template drop-in that turns the exit records off while every plugin stops."""
    return (
        "# Written by AIGIS while it stops every plugin; removed when it starts again.\n"
        "[Service]\n"
        "ExecStopPost=\n"
    )


def render_dropin(
    spec: ProcessSpec, systemd_version: int = 252, *, exit_dir: str | None = EXIT_DIR
) -> str:
    """The runtime drop-in for ``aigis-plugin@NAME.service``; argv[0] must be absolute.
    ``exit_dir``: where the unit records how its process ended (None: not recorded)."""
    lines = [
        f"# Written by AIGIS for plugin {spec.name}; rewritten on every start and reload.",
        "[Unit]",
        f"Description=AIGIS plugin {spec.name} ({spec.kind})",
    ]
    if spec.restart is not None:
        # N restarts means N+1 starts inside the window; systemd then leaves the unit failed.
        lines += [
            f"StartLimitIntervalSec={START_LIMIT_INTERVAL}",
            f"StartLimitBurst={spec.restart + 1}",
        ]
    lines += [
        "",
        "[Service]",
        f"Type={'notify' if spec.kind is Kind.INTERNAL else 'exec'}",
    ]
    if spec.kind is Kind.INTERNAL:
        lines.append("NotifyAccess=main")
    lines += [
        "ExecStart=",
        "ExecStart=" + " ".join(quote(arg) for arg in spec.argv),
        "WorkingDirectory=" + str(spec.cwd).replace("%", "%%"),
    ]
    lines += [
        _environment(key, value, spec.credentials.get(key))
        for key, value in sorted(spec.env.items())
    ]
    lines += _sandbox_lines(spec)
    if spec.restart is None or spec.restart == 0:
        lines.append("Restart=no")
    else:
        # systemd counts SIGTERM/SIGINT/SIGHUP deaths as clean; for AIGIS any signal a plugin
        # did not ask for is a failure (SPEC: non-zero exit, signal, watchdog).
        lines += [
            "Restart=on-failure",
            "RestartForceExitStatus=SIGTERM SIGINT SIGHUP SIGPIPE",
            f"RestartSec={_seconds(spec.restart_delay)}",
        ]
        if systemd_version >= 254 and spec.restart_delay_max > spec.restart_delay:
            lines += [
                f"RestartSteps={min(spec.restart, 10)}",
                f"RestartMaxDelaySec={_seconds(spec.restart_delay_max)}",
            ]
    if exit_dir is not None:
        lines.append(exit_record_line(exit_dir))
    lines += [
        f"TimeoutStopSec={_seconds(spec.stop_timeout)}",
        f"LogExtraFields=AIGIS_PLUGIN={spec.name}",
        "",
    ]
    return "\n".join(lines)
