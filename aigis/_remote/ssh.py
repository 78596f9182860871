"""One OpenSSH master connection per remote host, and commands run over it.

``Master(spec, settings)`` owns the ControlMaster of one host: ``open`` starts it (``ssh -f -N
-o ControlMaster=yes``: returns once authenticated, or fails with ssh's message), ``run``
multiplexes a command over it and ``close`` ends it. ``run`` uses ``ControlMaster=auto``, so when
the master has died (a cut link ends it after ServerAliveInterval x ServerAliveCountMax) the next
command brings up a new one instead of failing. Host keys must already be known
(``StrictHostKeyChecking=yes``, no prompts: ``BatchMode=yes``); ssh's failures become one
``HostError`` line naming the host and the kind (unknown or changed host key, unreachable, auth
refused). Remote commands are argv lists quoted with ``shlex.join``: the remote login shell
parses what ssh sends, so nothing is ever passed to it unquoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aigis._remote.hosts import HostError, HostSpec

__all__ = ["HostCheck", "Master", "SshSettings", "check_all", "classify", "on_each", "open_all"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PYTHON = (3, 11)
#: sun_path holds 108 bytes; ssh binds ``<ControlPath>.<16 random chars>`` first, then renames.
_SUN_PATH_MAX = 107 - 17


@dataclass(frozen=True)
class SshSettings:
    """How every host is reached. ``runtime_dir`` holds the control sockets (in ``ssh/``)."""

    runtime_dir: Path
    known_hosts: Path | None = None  # None: ssh's own (~/.ssh/known_hosts, /etc/ssh/...)
    connect_timeout: int = 5
    server_alive_interval: int = 5
    server_alive_count: int = 3
    persist: int = 600  # seconds an idle master stays up (it also ends when the core ends it)
    config_file: str | None = None  # ssh -F: None reads the usual files, "none" reads none
    ssh: str = "ssh"

    @property
    def control_dir(self) -> Path:
        return self.runtime_dir / "ssh"


@dataclass(frozen=True)
class HostCheck:
    """What ``Master.check`` found on a host."""

    host: str
    python: str  # "3.11.2"
    systemd: str  # what ``systemctl is-system-running`` answered: running, degraded, ...
    free_bytes: int  # free space under /var/lib (where plugins are shipped)


# -- pure: argv and error classification ---------------------------------------------------


def control_path(spec: HostSpec, settings: SshSettings) -> Path:
    """The master's socket: a hash of what identifies the connection, like ssh's own ``%C``
    (ours, so we can tell whether a socket exists without asking ssh)."""
    ident = f"{spec.user or ''}@{spec.address}:{spec.port}"
    path = settings.control_dir / hashlib.sha256(ident.encode()).hexdigest()[:24]
    if len(str(path).encode()) > _SUN_PATH_MAX:
        raise ValueError(
            f"runtime directory {settings.runtime_dir} is too long for ssh control sockets "
            f"(at most {_SUN_PATH_MAX - 29} bytes)"
        )
    return path


def common_options(spec: HostSpec, settings: SshSettings) -> list[str]:
    """Options shared by the master and every command: who, how, and the safety settings."""
    argv = [settings.ssh]
    if settings.config_file is not None:
        argv += ["-F", settings.config_file]
    argv += ["-p", str(spec.port)]
    if spec.user:
        argv += ["-l", spec.user]
    if spec.identity_file:
        argv += ["-i", spec.identity_file, "-o", "IdentitiesOnly=yes"]
    options = {
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "ConnectTimeout": str(settings.connect_timeout),
        "ServerAliveInterval": str(settings.server_alive_interval),
        "ServerAliveCountMax": str(settings.server_alive_count),
        "ControlPath": str(control_path(spec, settings)),
        "LogLevel": "ERROR",
    }
    if settings.known_hosts is not None:
        options["UserKnownHostsFile"] = str(settings.known_hosts)
        options["GlobalKnownHostsFile"] = "/dev/null"
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def master_argv(spec: HostSpec, settings: SshSettings) -> list[str]:
    """Start the master: fork to the background once authenticated (``-f``), run nothing."""
    return [
        *common_options(spec, settings),
        "-o", "ControlMaster=yes", "-o", f"ControlPersist={settings.persist}",
        "-f", "-N", "--", spec.destination,
    ]  # fmt: skip


def command_argv(spec: HostSpec, settings: SshSettings, argv: Sequence[str]) -> list[str]:
    """Run ``argv`` remotely over the master (a new master if it is gone), quoted for the
    remote shell."""
    if not argv:
        raise ValueError("empty remote command")
    return [
        *common_options(spec, settings),
        "-o", "ControlMaster=auto", "-o", f"ControlPersist={settings.persist}",
        "-T", "--", spec.destination, shlex.join(argv),
    ]  # fmt: skip


def control_argv(spec: HostSpec, settings: SshSettings, command: str) -> list[str]:
    """``ssh -O check|exit`` for the master (talks to its socket only, never the network)."""
    return [*common_options(spec, settings), "-O", command, "--", spec.destination]


#: (pattern in ssh's stderr, kind, message); first match wins. ``{line}`` is the matching line.
_PATTERNS: tuple[tuple[str, str, str], ...] = (
    (
        r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed",
        "changed-host-key",
        "host key CHANGED: it differs from the one in known_hosts (a reinstalled host, or "
        "someone in between); check it, then fix known_hosts",
    ),
    (
        r"No \S+ host key is known for|Host key verification failed",
        "unknown-host-key",
        "host key unknown: add it to known_hosts first (AIGIS never accepts new keys)",
    ),
    (r"Permission denied", "auth-refused", "authentication refused: {line}"),
    (
        r"timed out|No route to host|Network is unreachable|Connection refused|"
        r"Could not resolve hostname|Name or service not known|Connection closed by|"
        r"Connection reset|kex_exchange_identification",
        "unreachable",
        "unreachable: {line}",
    ),
)


def classify(host: str, stderr: str, returncode: int) -> HostError | None:
    """The HostError for a failed ssh invocation, or None when ssh itself did not fail (a
    remote command's own exit status is the caller's business). ssh fails with status 255."""
    if returncode != 255:
        return None
    lines = [line.strip() for line in stderr.replace("\r", "").splitlines() if line.strip()]
    for pattern, kind, message in _PATTERNS:
        for line in lines:
            if re.search(pattern, line):
                return HostError(host, kind, message.format(line=line.removeprefix("ssh: ")))
    if not lines:
        return None  # the remote command exited 255 without a word: not ours to judge
    return HostError(host, "failed", f"ssh failed: {lines[-1]}")


# -- I/O ---------------------------------------------------------------------------------

_CHECK_SCRIPT = """\
import json, os, subprocess, sys
try:
    sd = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True,
                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    sd = ""
booted = os.path.isdir("/run/systemd/system")
st = os.statvfs("/var/lib")
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "booted": booted,
                  "systemd": sd, "free": st.f_bavail * st.f_frsize}))
"""


class Master:
    """The master connection to one host. ``wrap`` prefixes every ssh command line (tests use
    it to run ssh in a network namespace)."""

    def __init__(self, spec: HostSpec, settings: SshSettings, *, wrap: Sequence[str] = ()) -> None:
        self.spec = spec
        self.settings = settings
        self.wrap = list(wrap)
        self.control_path = control_path(spec, settings)
        self._opening = threading.Lock()
        self._pid: int | None = None  # the master's, as the last ``open`` found it
        #: (remote port, target) -> the master pid that forwards it
        self._remote_forwards: dict[tuple[int, str, int], int] = {}

    def _ssh(
        self, argv: list[str], timeout: float, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                [*self.wrap, *argv],
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            what = (argv[-1].splitlines() or [""])[0][:60]  # one line, whatever the command
            raise HostError(
                self.spec.name, "timeout", f"no answer within {timeout:g}s ({what})"
            ) from None
        except FileNotFoundError as e:
            raise HostError(self.spec.name, "failed", f"cannot run {argv[0]}: {e}") from None

    def _make_control_dir(self) -> None:
        # Whoever can connect to a master socket (or a forwarded bus) acts as us on the host.
        self.settings.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.settings.control_dir.chmod(0o700)

    def open(self) -> None:
        """Ensure the master is up: a no-op when it is, else connect (bounded by the connect
        timeout) and raise HostError on failure."""
        with self._opening:
            self._open()

    def _open(self) -> None:
        self._pid = self.master_pid()
        if self._pid is not None:
            return
        self._make_control_dir()
        # A socket left by a killed master: ssh -o ControlMaster=yes would find the name taken
        # and carry on as a plain connection ("disabling multiplexing"), never a master.
        self.control_path.unlink(missing_ok=True)
        # -f returns when authenticated; the bound covers a server stalling after the banner.
        result = self._ssh(
            master_argv(self.spec, self.settings), timeout=2 * self.settings.connect_timeout + 10
        )
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            error = classify(self.spec.name, stderr, 255) or HostError(
                self.spec.name, "failed", f"ssh exited with status {result.returncode}"
            )
            log.warning("refused: %s", error)
            raise error
        log.info("connected: host %s (%s port %d)", self.spec.name, self.spec.address,
                 self.spec.port)  # fmt: skip

    def master_pid(self) -> int | None:
        """The master's pid when it runs (asks its socket: no network traffic), else None."""
        if not self.control_path.exists():
            return None
        result = self._ssh(control_argv(self.spec, self.settings, "check"), timeout=10)
        found = re.search(rb"pid=(\d+)", result.stderr)
        return int(found.group(1)) if result.returncode == 0 and found else None

    def run(
        self, argv: Sequence[str], input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on the host; return its exit status and output. Raise HostError when
        ssh (not the command) failed, or after ``timeout`` seconds."""
        self._make_control_dir()
        result = self._ssh(command_argv(self.spec, self.settings, argv), timeout, input)
        error = classify(self.spec.name, result.stderr.decode(errors="replace"), result.returncode)
        if error is not None:
            raise error
        return result

    def check(self) -> HostCheck:
        """One round on the host: python version, systemd running, free space under /var/lib.
        Raise HostError (kind no-python, no-systemd) when the host cannot run plugins."""
        self.open()
        result = self.run([self.spec.python, "-c", _CHECK_SCRIPT], timeout=30)
        name = self.spec.name
        if result.returncode == 127:
            raise HostError(name, "no-python", f"{self.spec.python} not found")
        try:
            found = json.loads(result.stdout)
        except ValueError:
            lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else f"exit status {result.returncode}"
            raise HostError(name, "no-python", f"{self.spec.python} failed: {detail}") from None
        version = tuple(int(x) for x in found["python"].split("."))
        if version[:2] < MIN_PYTHON:
            need = ".".join(map(str, MIN_PYTHON))
            raise HostError(name, "no-python", f"python {found['python']} is older than {need}")
        if not found["booted"] or found["systemd"] not in ("running", "degraded"):
            state = found["systemd"] or "no answer"
            raise HostError(name, "no-systemd", f"systemd is not running ({state})")
        return HostCheck(name, found["python"], found["systemd"], int(found["free"]))

    def forward(self, remote_socket: str, label: str) -> Path:
        """Forward a local Unix socket to ``remote_socket`` on the host over the master (e.g. the
        host's D-Bus system bus, for the D-Bus client of the systemd backend); returns the local
        path. Forwards end with the master: call again after a reconnect."""
        if not re.fullmatch(r"[a-z0-9-]{1,16}", label):
            raise ValueError(f"forward label must be [a-z0-9-]{{1,16}}, got {label!r}")
        local = self.control_path.with_name(f"{self.control_path.name}.{label}")
        self.open()
        if _listening(local):
            return local  # this master forwards it already (a core restarted since)
        # Left by a master that ended: the new one would not bind over it.
        local.unlink(missing_ok=True)
        argv = control_argv(self.spec, self.settings, "forward")
        argv[-2:-2] = ["-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote_socket}"]
        result = self._ssh(argv, timeout=10)
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            raise HostError(
                self.spec.name, "failed", f"cannot forward {remote_socket}: {lines[-1]}"
            )
        return local

    def forward_remote(self, port: int, target: str, target_port: int) -> bool:
        """Have the host's loopback port ``port`` forwarded over the master to ``target`` and
        ``target_port`` as this machine dials them (``ssh -O forward -R``). A loopback TCP port,
        not a Unix socket: sshd makes those its login user's alone, and plugins run as their own
        accounts there. Forwards end with the master: this re-adds it when the master is new
        (ssh itself keeps one forward per port when asked twice). True when it added it."""
        self.open()
        with self._opening:
            pid = self._pid if self._pid is not None else self.master_pid()
            key = (port, target, target_port)
            if pid is not None and self._remote_forwards.get(key) == pid:
                return False
            host = f"[{target}]" if ":" in target else target
            argv = control_argv(self.spec, self.settings, "forward")
            argv[-2:-2] = ["-R", f"127.0.0.1:{port}:{host}:{target_port}"]
            result = self._ssh(argv, timeout=10)
            if result.returncode != 0:
                lines = result.stderr.decode(errors="replace").strip().splitlines()
                raise HostError(
                    self.spec.name, "failed",
                    f"cannot forward port {port} of the host to the core's {host}:{target_port}: "
                    f"{lines[-1] if lines else 'no output'}",
                )  # fmt: skip
            self._pid = pid if pid is not None else self.master_pid()
            if self._pid is not None:
                self._remote_forwards[key] = self._pid
        log.info("forwarded: port %d of host %s to the core's %s:%d", port, self.spec.name, host,
                 target_port)  # fmt: skip
        return True

    def close(self) -> None:
        """End the master (its multiplexed sessions end with it). Idempotent."""
        if self.control_path.exists():
            self._ssh(control_argv(self.spec, self.settings, "exit"), timeout=10)
            log.info("disconnected: host %s", self.spec.name)


def _listening(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def on_each(masters: Iterable[Master], action: Callable[[Master], T]) -> dict[str, T | HostError]:
    """``action(master)`` for every host in parallel (one thread per host, at most 16): each
    host's result, or the HostError that host failed with. One host never holds up another."""
    masters = list(masters)

    def one(master: Master) -> T | HostError:
        try:
            return action(master)
        except HostError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(masters)))) as pool:
        return dict(zip((m.spec.name for m in masters), pool.map(one, masters), strict=True))


def open_all(masters: Iterable[Master]) -> dict[str, HostError | None]:
    """Open every master in parallel; the error of each host that failed (None: connected)."""
    return {
        name: outcome if isinstance(outcome, HostError) else None
        for name, outcome in on_each(masters, Master.open).items()
    }


def check_all(masters: Iterable[Master]) -> dict[str, HostCheck | HostError]:
    """``aigisctl check --connect``: every host's check, in parallel."""
    return on_each(masters, Master.check)
