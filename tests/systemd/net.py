"""Network namespaces joined by veth pairs with unique-local IPv6 addresses, and sshd in a box.

Everything happens inside network namespaces the test creates: a box booted with ``net=True``
(its own netns) and ``Netns`` (a bare netns held by a sleeping process, for the test's own
side: pytest runs ``ssh`` there with ``nsenter --net=...``). The host's real network is never
touched: veth pairs are created inside such a namespace and their far end moved straight into
another one, addresses are taken from fd00::/8, and each namespace keeps its IPv6 addresses
when a link goes down (``keep_addr_on_down=1``), so a link can be cut and restored.

``Link.close`` deletes the pair (deleting one end deletes both); ``Netns.close`` kills the
holder, which removes its namespace and every device left in it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .box import Box, wait_until
from .host import BOX_ENV

__all__ = ["BareHost", "Link", "Netns", "SshServer", "in_netns", "join", "start_sshd"]


class HasNetns(Protocol):
    """Anything whose ``pid`` lives in the network namespace meant (a Box, a Netns)."""

    pid: int


def in_netns(pid: int, *cmd: str) -> list[str]:
    """argv running ``cmd`` in the network namespace of ``pid`` only (files stay the host's)."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *cmd]


def _ip(ns: HasNetns, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_netns(ns.pid, "ip", *args), check=check, capture_output=True, text=True, timeout=10,
        env=BOX_ENV,
    )  # fmt: skip


def prepare(ns: HasNetns) -> None:
    """Loopback up; IPv6 addresses survive a link going down (so links can be cut and restored).

    /proc/sys/net shows the namespace of the process reading it: nsenter --net into the box's
    netns and write through the host's (writable) /proc, the box's own /proc/sys being read-only.
    """
    for key in ("all", "default"):
        subprocess.run(
            in_netns(ns.pid, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.keep_addr_on_down=1"),
            check=True, capture_output=True, timeout=10, env=BOX_ENV,
        )  # fmt: skip
    _ip(ns, "link", "set", "lo", "up")


class Netns:
    """A bare network namespace held by a sleeping process (dies with the test process)."""

    def __init__(self) -> None:
        # setpriv --pdeathsig: the holder dies with us even if we are SIGKILLed.
        self._proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--", "sleep", "86400"],
            stdin=subprocess.DEVNULL, env=BOX_ENV,
        )  # fmt: skip
        self.pid = self._proc.pid
        own = os.stat("/proc/self/ns/net").st_ino
        try:
            wait_until(lambda: self._netns_inode() not in (0, own), 5, "a new network namespace")
            prepare(self)
        except BaseException:
            self.close()
            raise

    def _netns_inode(self) -> int:
        with contextlib.suppress(OSError):
            return os.stat(f"/proc/{self.pid}/ns/net").st_ino
        return 0

    def argv(self, *cmd: str) -> list[str]:
        return in_netns(self.pid, *cmd)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)


_link_numbers = itertools.count(1)


@dataclass
class Link:
    """One veth pair between two namespaces, on its own /64 of fd00::/8."""

    a: HasNetns
    b: HasNetns
    a_dev: str
    b_dev: str
    a_addr: str
    b_addr: str
    closed: bool = field(default=False)

    def cut(self) -> None:
        """Take the link down on both ends (addresses stay: keep_addr_on_down=1)."""
        _ip(self.a, "link", "set", self.a_dev, "down")
        _ip(self.b, "link", "set", self.b_dev, "down")

    def restore(self) -> None:
        _ip(self.a, "link", "set", self.a_dev, "up")
        _ip(self.b, "link", "set", self.b_dev, "up")
        wait_until(self.carrier, 10, f"carrier on {self.a_dev}")

    def carrier(self) -> bool:
        with contextlib.suppress(OSError):
            out = _ip(self.a, "-o", "link", "show", self.a_dev).stdout
            return "LOWER_UP" in out and ",UP" in out
        return False

    def close(self) -> None:
        """Delete the pair (idempotent; a namespace already gone took its end with it)."""
        if not self.closed:
            self.closed = True
            _ip(self.a, "link", "del", self.a_dev, check=False)


def join(a: HasNetns, b: HasNetns, subnet: int | None = None) -> Link:
    """Join two namespaces by a veth pair: ``fd00:a16:<subnet>::1/64`` on a, ``::2`` on b.

    The pair is created inside a's namespace with its peer put straight into b's: no device
    ever appears in the host's namespace. Addresses skip duplicate detection (``nodad``), so
    they are usable at once."""
    n = subnet if subnet is not None else next(_link_numbers)
    for ns in (a, b):
        prepare(ns)
    link = Link(a, b, f"va{n}", f"vb{n}", f"fd00:a16:{n:x}::1", f"fd00:a16:{n:x}::2")
    _ip(a, "link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev, "netns",
        str(b.pid))  # fmt: skip
    try:
        _ip(a, "addr", "add", f"{link.a_addr}/64", "dev", link.a_dev, "nodad")
        _ip(b, "addr", "add", f"{link.b_addr}/64", "dev", link.b_dev, "nodad")
        link.restore()
    except BaseException:
        link.close()
        raise
    return link


@dataclass(frozen=True)
class SshServer:
    """sshd running in a box: the address to reach it and the files a client needs."""

    box: Box
    address: str
    port: int
    client_key: Path  # private key authorised for root
    known_hosts: Path  # a known_hosts line for the server's host key at address:port
    host_key_pub: str


SSHD_UNIT = "aigis-test-sshd.service"
SSHD_DIR = "/etc/ssh/aigis-test"  # inside the box: its private /etc overlay


def keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair at ``path`` (+ .pub); returns the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return path.with_name(path.name + ".pub").read_text().strip()


def known_hosts_line(address: str, port: int, host_key_pub: str) -> str:
    host = address if port == 22 else f"[{address}]:{port}"
    keytype, key = host_key_pub.split()[:2]
    return f"{host} {keytype} {key}\n"


def start_sshd(box: Box, address: str, port: int = 22) -> SshServer:
    """Generate host and client keys into the box's work directory, run sshd in the box as a
    unit (root login by key only), and write a known_hosts file for ``address``."""
    keys = box.workdir / "ssh"
    keys.mkdir(exist_ok=True)
    client_pub = keygen(keys / "client", "aigis-test-client")
    host_pub = install_host_key(box, keys)
    box.write(f"{SSHD_DIR}/authorized_keys", client_pub + "\n")
    private_root_home(box)
    box.write(
        f"{SSHD_DIR}/sshd_config",
        textwrap.dedent(
            f"""\
            Port {port}
            ListenAddress ::
            HostKey {SSHD_DIR}/host_key
            AuthorizedKeysFile {SSHD_DIR}/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            PrintMotd no
            PidFile none
            MaxStartups 100
            MaxSessions 100
            Subsystem sftp internal-sftp
            """
        ),
    )
    box.write(
        f"/etc/systemd/system/{SSHD_UNIT}",
        textwrap.dedent(
            f"""\
            [Service]
            Type=notify
            ExecStart=/usr/sbin/sshd -D -e -f {SSHD_DIR}/sshd_config
            RuntimeDirectory=sshd
            RuntimeDirectoryMode=0755
            """
        ),
    )
    box.systemctl("daemon-reload")
    box.systemctl("start", SSHD_UNIT)
    known = keys / "known_hosts"
    known.write_text(known_hosts_line(address, port, host_pub))
    return SshServer(box, address, port, keys / "client", known, host_pub)


ROOT_HOME = "/var/lib/aigis-test-root"


def private_root_home(box: Box) -> None:
    """Give root a home inside the box (its /etc/passwd is an overlay): ssh sessions run the
    login shell there, and the host's /root (its .bashrc, its pyenv shims) stays out of them."""
    passwd = box.host_path("/etc/passwd")
    lines = passwd.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = ROOT_HOME
            lines[i] = ":".join(fields)
    passwd.write_text("".join(lines))
    box.run("install", "-d", "-m", "0700", ROOT_HOME)


def install_host_key(box: Box, keys: Path) -> str:
    """A new host key for the box's sshd (replacing any); returns its public line."""
    pub = keygen(keys / "host_key", "aigis-test-host")
    box.write(f"{SSHD_DIR}/host_key", (keys / "host_key").read_text())
    box.host_path(f"{SSHD_DIR}/host_key").chmod(0o600)
    return pub


class BareHost:
    """sshd in network and mount namespaces of its own, without systemd: a host that cannot run
    plugins. It sees the host's files except a fresh /run (so no /run/systemd/system) and an
    /etc/passwd giving root a home in ``workdir`` and /bin/sh (the host's /root stays out)."""

    def __init__(self, workdir: Path, port: int = 22) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port
        home = workdir / "home"
        home.mkdir(mode=0o700, exist_ok=True)
        passwd = workdir / "passwd"
        lines = Path("/etc/passwd").read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "root":
                fields[5], fields[6] = str(home), "/bin/sh\n"
                lines[i] = ":".join(fields)
        passwd.write_text("".join(lines))
        client_pub = keygen(workdir / "client", "aigis-test-client")
        self.host_key_pub = keygen(workdir / "host_key", "aigis-test-host")
        (workdir / "authorized_keys").write_text(client_pub + "\n")
        (workdir / "sshd_config").write_text(
            textwrap.dedent(
                f"""\
                Port {port}
                ListenAddress ::
                HostKey {workdir}/host_key
                AuthorizedKeysFile {workdir}/authorized_keys
                StrictModes no
                PermitRootLogin prohibit-password
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                UsePAM no
                PidFile none
                """
            )
        )
        # LIBMOUNT_UTAB: mount(8) would otherwise note its mounts in the host's /run/mount.
        script = (
            'set -e; export LIBMOUNT_UTAB="$0/utab"; '
            "mount -t tmpfs -o mode=0755,size=16m tmpfs /run; mkdir -m 0755 /run/sshd; "
            'mount --bind "$0/passwd" /etc/passwd; exec /usr/sbin/sshd -D -e -f "$0/sshd_config"'
        )
        with open(workdir / "sshd.log", "ab") as log:
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--mount",
                 "--propagation", "private", "--", "sh", "-c", script, str(workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=BOX_ENV,
            )  # fmt: skip
        self.pid = self._proc.pid
        self.client_key = workdir / "client"
        self.known_hosts = workdir / "known_hosts"
        self.address = ""

    def serve(self, address: str) -> None:
        """Wait until sshd listens; write known_hosts for ``address``."""

        def listening() -> bool:
            if self._proc.poll() is not None:
                log = (self.workdir / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd exited with {self._proc.returncode}: {log}")
            out = subprocess.run(
                in_netns(self.pid, "ss", "-Hltn", f"( sport = :{self.port} )"),
                capture_output=True, text=True, timeout=10, env=BOX_ENV,
            )  # fmt: skip
            return bool(out.stdout.strip())

        wait_until(listening, 10, "sshd to listen")
        self.address = address
        self.known_hosts.write_text(known_hosts_line(address, self.port, self.host_key_pub))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)
