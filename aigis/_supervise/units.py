"""systemd unit names and per-plugin drop-ins, rendered by pure functions (golden-tested)."""

from __future__ import annotations

import re

from aigis._states import Kind
from aigis._supervise.base import ProcessSpec

TEMPLATE = "aigis-plugin@.service"
DROPIN_NAME = "50-aigis.conf"
# Restart counting needs a window longer than any plausible crash loop: one day.
START_LIMIT_INTERVAL = "1d"
_UNIT_SAFE = re.compile(r"[A-Za-z0-9:_.]")


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


def render_dropin(spec: ProcessSpec, systemd_version: int = 252) -> str:
    """The runtime drop-in for ``aigis-plugin@NAME.service``; argv[0] must be absolute."""
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
        f"Environment={quote(f'{key}={value}', variables=False)}"
        for key, value in sorted(spec.env.items())
    ]
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
    lines += [
        f"TimeoutStopSec={_seconds(spec.stop_timeout)}",
        f"LogExtraFields=AIGIS_PLUGIN={spec.name}",
        "",
    ]
    return "\n".join(lines)
