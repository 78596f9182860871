"""Remote host specs: the ``[hosts]`` table of aigis.toml and a plugin's ``HOST`` value (pure).

A ``HOST`` names a host of the table, or is an ssh destination used with defaults:
``name``, ``user@name``, ``name:2222``, ``user@[fd00::2]:22``, a bare IPv6 address
``fd00::2``, or ``ssh://user@name:2222``. Addresses are checked strictly (no leading ``-``, no
spaces, no shell characters): they end up on ssh's command line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from aigis._errors import AigisError, ConfigError

__all__ = [
    "LOCAL_NAMES",
    "HostError",
    "HostSpec",
    "hosts_from_table",
    "is_local",
    "parse_core_address",
    "parse_destination",
    "parse_ssh_forward",
    "resolve_host",
]

DEFAULT_PYTHON = "python3"
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]+")
_KEYS = frozenset({"address", "user", "port", "identity_file", "python", "core_address"})

#: Why a host failed, one word each: what ``HostError.kind`` holds.
KINDS = (
    "unknown-host-key",
    "changed-host-key",
    "unreachable",
    "auth-refused",
    "no-systemd",
    "no-python",
    "timeout",
    "failed",
)


class HostError(AigisError):
    """One remote host is unusable; the message is one line starting with its name."""

    def __init__(self, host: str, kind: str, message: str) -> None:
        self.host = host
        self.kind = kind
        self.reason = message
        super().__init__(f'host "{host}": {message}')


@dataclass(frozen=True)
class HostSpec:
    """Where and how to reach one host over ssh. ``name`` is what logs and status show."""

    name: str
    address: str
    user: str | None = None  # None: ssh's default (the core's user, or the ssh config's)
    port: int = 22
    identity_file: str | None = None
    python: str = DEFAULT_PYTHON
    #: ``host:port`` (``[v6]:port``) where plugins on this host reach the core's TCP listener;
    #: ``ssh`` (or ``ssh:PORT``): through a port the host's ssh connection forwards to it;
    #: None: ``[aigis] tcp`` as it is (it must then be an address other hosts can reach).
    core_address: str | None = None

    @property
    def destination(self) -> str:
        """``user@address`` as ssh takes it (IPv6 addresses bare: the port goes in ``-p``)."""
        return f"{self.user}@{self.address}" if self.user else self.address


def _check_address(address: str) -> str | None:
    """The problem with ``address``, or None."""
    try:
        ipaddress.ip_address(address)
        return None
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(address) or ".." in address:
        return f"not a host name or IP address: {address!r}"
    return None


def _check_port(port: object) -> str | None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return f"port must be an integer 1-65535, got {port!r}"
    return None


def parse_destination(value: str, name: str | None = None) -> HostSpec:
    """A HostSpec from an ssh destination; raise ``ValueError`` saying what form is expected."""
    expected = "expected host, user@host, host:port, user@[ipv6]:port or ssh://user@host:port"
    text = value.strip()
    if text.startswith("ssh://"):
        text = text[len("ssh://") :].rstrip("/")
    user = None
    if "@" in text:
        user, _, text = text.rpartition("@")
        if not _USER_RE.fullmatch(user):
            raise ValueError(f"bad user in {value!r}: {expected}")
    port = 22
    if text.startswith("["):
        address, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad bracketed address in {value!r}: {expected}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
    else:  # a host name, an IPv4 address, or a bare IPv6 address (no port then)
        address, port_text = text, None
    if port_text is not None:
        if not port_text.isdigit():
            raise ValueError(f"bad port in {value!r}: {expected}")
        port = int(port_text)
    problem = _check_address(address) or _check_port(port)
    if problem:
        raise ValueError(f"{problem} in {value!r}: {expected}")
    return HostSpec(name=name or value.strip(), address=address, user=user, port=port)


def hosts_from_table(table: Mapping[str, Any], where: str = "hosts") -> dict[str, HostSpec]:
    """The ``[hosts]`` table (name -> {address, user, port, identity_file, python}) as specs.

    Raise ``ConfigError`` with one line per problem, each naming its key
    (``hosts.web1.port: ...``). A table entry may also be a plain destination string."""
    problems: list[str] = []
    hosts: dict[str, HostSpec] = {}
    for name, entry in table.items():
        key = f"{where}.{name}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problems.append(f"{key}: a host name is letters, digits, '_', '.', '-' (max 64)")
            continue
        if isinstance(entry, str):
            entry = {"address": entry}
        if not isinstance(entry, Mapping):
            problems.append(f"{key}: expected a table or a destination string, got {entry!r}")
            continue
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            problems.append(f"{key}: unknown keys {unknown}; known: {sorted(_KEYS)}")
        before = len(problems)
        address = entry.get("address")
        if not isinstance(address, str):
            problems.append(f"{key}.address: required, a host name or IP address")
            continue
        try:
            spec = parse_destination(address, name)
        except ValueError as e:
            problems.append(f"{key}.address: {e}")
            continue
        user = entry.get("user", spec.user)
        if user is not None and (not isinstance(user, str) or not _USER_RE.fullmatch(user)):
            problems.append(f"{key}.user: not a user name: {user!r}")
        port = entry.get("port", spec.port)
        if (problem := _check_port(port)) is not None:
            problems.append(f"{key}.port: {problem}")
        identity = entry.get("identity_file")
        if identity is not None and (
            not isinstance(identity, str) or not PurePosixPath(identity).is_absolute()
        ):
            problems.append(f"{key}.identity_file: must be an absolute path, got {identity!r}")
        python = entry.get("python", DEFAULT_PYTHON)
        if not isinstance(python, str) or not _PYTHON_RE.fullmatch(python):
            problems.append(f"{key}.python: an interpreter name or absolute path, got {python!r}")
        core_address = entry.get("core_address")
        if core_address is not None and (
            not isinstance(core_address, str)
            or parse_core_address(core_address) is None
            and parse_ssh_forward(core_address) is None
        ):
            problems.append(
                f'{key}.core_address: expected "host:port", "[ipv6]:port", "ssh" or "ssh:PORT", '
                f"got {core_address!r}"
            )
        if len(problems) == before:
            hosts[name] = HostSpec(name, spec.address, user, port, identity, python, core_address)
    if problems:
        raise ConfigError(problems)
    return hosts


def parse_core_address(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as (host, port); None when it is neither."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not match:
        return None
    host, port = match.group(1) or match.group(3), int(match.group(2) or match.group(4))
    if _check_address(host) is not None or _check_port(port) is not None:
        return None
    return host, port


def parse_ssh_forward(text: str | None) -> int | None:
    """For ``core_address = "ssh"``: 0 (the port of the core's own listener); ``"ssh:PORT"``:
    PORT; anything else: None. The port is the one the host's ssh connection listens on, on the
    host's loopback, and forwards to the core's TCP listener."""
    if text == "ssh":
        return 0
    match = re.fullmatch(r"ssh:(\d{1,5})", text or "")
    if match is None or _check_port(int(match.group(1))) is not None:
        return None
    return int(match.group(1))


def is_local(value: str, own_names: Iterable[str] = ()) -> bool:
    """True when a ``HOST`` value means this machine (``localhost``, loopback, own names)."""
    text = value.strip()
    if not text:
        return True
    try:
        spec = parse_destination(text)
    except ValueError:
        return False
    names = LOCAL_NAMES | {n.lower() for n in own_names}
    return spec.address.lower() in names or _loopback(spec.address)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def resolve_host(
    value: str, hosts: Mapping[str, HostSpec], own_names: Iterable[str] = ()
) -> HostSpec | None:
    """The host a plugin's ``HOST`` (or its operator override) means; None for local.

    A name of the hosts table wins over a destination spelled the same way."""
    text = value.strip()
    if text in hosts:
        return hosts[text]
    if is_local(text, own_names):
        return None
    return parse_destination(text)
