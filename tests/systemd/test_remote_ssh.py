"""One OpenSSH master per remote host, and shipping, against real sshd in real systemd boxes.

The test process's side is a network namespace of its own (``Netns``); each remote host is a
box with its own netns, joined to it by a veth pair with fd00::/8 addresses, running sshd with
keys generated for the test. ssh runs with ``nsenter --net`` into the test's namespace (the
``wrap`` hook of ``Master``); nothing here touches the host's network.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aigis._remote.hosts import HostError, HostSpec
from aigis._remote.ship import ship
from aigis._remote.ssh import Master, SshSettings, master_argv, open_all
from aigis._supervise.dbus import Systemd

from .box import Box, wait_until
from .net import BareHost, Link, Netns, SshServer, in_netns, install_host_key, join, start_sshd

pytestmark = pytest.mark.systemd


@dataclass
class Lab:
    """The test's own netns, remote boxes with sshd, and every master opened (closed after)."""

    netns: Netns
    runtime_dir: Path
    boot_box: Callable[..., Box]
    links: list[Link] = field(default_factory=list)
    servers: list[SshServer] = field(default_factory=list)
    masters: list[Master] = field(default_factory=list)

    def remote(self) -> tuple[SshServer, Link]:
        box = self.boot_box(net=True)
        link = join(self.netns, box)
        self.links.append(link)
        server = start_sshd(box, link.b_addr)
        self.servers.append(server)
        return server, link

    def settings(self, server: SshServer, **overrides: object) -> SshSettings:
        values: dict = {
            "runtime_dir": self.runtime_dir,
            "known_hosts": server.known_hosts,
            "config_file": "none",  # the host's ~/.ssh/config and /etc/ssh/ssh_config play no part
            "connect_timeout": 5,
        }
        return SshSettings(**(values | overrides))

    def master(self, server: SshServer, name: str = "", **overrides: object) -> Master:
        spec = HostSpec(name or server.box.workdir.name, server.address, "root", server.port,
                        str(server.client_key))  # fmt: skip
        master = Master(spec, self.settings(server, **overrides), wrap=self.netns.argv())
        self.masters.append(master)
        return master


@pytest.fixture
def lab(boot_box: Callable[..., Box]) -> Iterator[Lab]:
    netns = Netns()
    # Control sockets need a short path (sun_path is 108 bytes): not under pytest's tmp_path.
    runtime_dir = Path(tempfile.mkdtemp(prefix="aigis-ssh-", dir="/tmp"))
    lab = Lab(netns, runtime_dir, boot_box)
    try:
        yield lab
    finally:
        try:
            for master in lab.masters:
                master.close()
            for link in lab.links:
                link.close()
        finally:
            netns.close()  # its end of every link goes with it; masters die with their peer
            shutil.rmtree(runtime_dir)


def connections(server: SshServer) -> list[str]:
    """Established TCP connections to the box's sshd, as the box sees them."""
    out = server.box.run("ss", "-Htn", "state", "established", f"( sport = :{server.port} )")
    return out.stdout.splitlines()


def test_one_master_carries_every_command(lab: Lab) -> None:
    server, _ = lab.remote()
    master = lab.master(server)
    master.open()
    pid = master.master_pid()
    assert pid is not None
    marker = "/var/lib/aigis-quoting-marker"  # inside the box's private /var
    words = ["a b", f"$(touch {marker})", f"; touch {marker}", "'; exit 9 #", "*", "tab\there"]
    result = master.run(["printf", "%s\\n", *words])
    assert (result.returncode, result.stdout.decode().splitlines()) == (0, words)
    assert master.run(["sh", "-c", "exit 7"]).returncode == 7
    result = master.run(["sh", "-c", "cat; echo err >&2"], input=b"from stdin\n")
    assert (result.stdout, result.stderr) == (b"from stdin\n", b"err\n")
    for _ in range(5):
        assert master.run(["true"]).returncode == 0
    master.open()  # a no-op while the master is up
    assert master.master_pid() == pid
    assert len(connections(server)) == 1, connections(server)
    assert not server.box.host_path(marker).exists()
    assert stat.S_IMODE(os.stat(master.settings.control_dir).st_mode) == 0o700


def test_hosts_are_opened_in_parallel_and_fail_alone(lab: Lab) -> None:
    (s1, link), (s2, _) = lab.remote(), lab.remote()
    good = [lab.master(s1, "one"), lab.master(s2, "two")]
    nobody = HostSpec("nobody", link.a_addr.replace("::1", "::99"), "root")
    bad = Master(nobody, lab.settings(s1, connect_timeout=1), wrap=lab.netns.argv())
    outcome = open_all([*good, bad])
    assert outcome["one"] is None and outcome["two"] is None
    assert isinstance(outcome["nobody"], HostError) and outcome["nobody"].kind == "unreachable"
    for master, server in zip(good, (s1, s2), strict=True):
        assert master.run(["cat", "/etc/hostname"]).stdout == b"aigis-box\n"
        assert len(connections(server)) == 1


def test_unknown_host_key_fails_with_one_clear_line(lab: Lab) -> None:
    server, _ = lab.remote()
    empty = server.known_hosts.with_name("empty_known_hosts")
    empty.write_text("")
    master = lab.master(server, "web1", known_hosts=empty)
    with pytest.raises(HostError) as e:
        master.open()
    assert e.value.kind == "unknown-host-key"
    assert str(e.value) == (
        'host "web1": host key unknown: add it to known_hosts first (AIGIS never accepts new keys)'
    )
    assert empty.read_text() == ""  # nothing was learnt
    with pytest.raises(HostError, match="host key unknown"):
        master.run(["true"])  # commands refuse as well: no master, no fallback
    assert master.master_pid() is None


def test_changed_host_key_fails_with_one_clear_line(lab: Lab) -> None:
    server, _ = lab.remote()
    master = lab.master(server, "web1")
    master.open()
    master.close()
    install_host_key(server.box, server.box.workdir / "ssh")  # the host was "reinstalled"
    server.box.systemctl("restart", "aigis-test-sshd.service")
    with pytest.raises(HostError) as e:
        master.open()
    assert e.value.kind == "changed-host-key"
    assert str(e.value).startswith('host "web1": host key CHANGED: it differs from the one in')
    assert master.master_pid() is None


def test_unreachable_address_fails_within_the_connect_timeout(lab: Lab) -> None:
    server, link = lab.remote()
    nobody = link.a_addr.replace("::1", "::99")  # on the link's /64, owned by nobody
    master = Master(HostSpec("ghost", nobody, "root"), lab.settings(server, connect_timeout=2),
                    wrap=lab.netns.argv())  # fmt: skip
    assert "ConnectTimeout=2" in master_argv(master.spec, master.settings)
    with pytest.raises(HostError) as e:
        master.open()
    # ssh gave up on its own ("unreachable"), before our own bound of 2 x 2 + 10 s ("timeout")
    assert e.value.kind == "unreachable"
    assert str(e.value).startswith(f'host "ghost": unreachable: connect to host {nobody} port 22')


def test_check_reports_python_systemd_and_space(lab: Lab) -> None:
    server, _ = lab.remote()
    found = lab.master(server, "web1").check()
    assert found.host == "web1"
    assert found.systemd in ("running", "degraded")
    assert tuple(int(x) for x in found.python.split(".")[:2]) >= (3, 11)
    assert found.free_bytes > 0


def test_check_names_a_missing_python(lab: Lab) -> None:
    server, _ = lab.remote()
    spec = HostSpec("web1", server.address, "root", server.port, str(server.client_key),
                    python="python3.99")  # fmt: skip
    master = Master(spec, lab.settings(server), wrap=lab.netns.argv())
    lab.masters.append(master)
    with pytest.raises(HostError) as e:
        master.check()
    assert (e.value.kind, str(e.value)) == ("no-python", 'host "web1": python3.99 not found')


def mode(box: Box, path: str) -> int:
    return stat.S_IMODE(os.lstat(box.host_path(path)).st_mode)


def test_ship_sends_only_changes(lab: Lab, tmp_path: Path) -> None:
    server, _ = lab.remote()
    box = server.box
    master = lab.master(server)
    src = tmp_path / "weather"
    (src / "AIGIS").mkdir(parents=True)
    (src / "AIGIS" / "AIGIS.config").write_text("SKILLS = ['forecast']\n")
    (src / "AIGIS" / "AIGIS.core").write_text("def forecast(): return 'sun'\n")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o700)
    secret = tmp_path / "vault-token"
    secret.write_text("s3cret\n")
    secrets = {"AIGIS/token": secret}

    first = ship(master, "weather", src, secrets=secrets)
    dest = "/var/lib/aigis/ext/weather"
    assert first.dest == dest
    assert first.sent == ("AIGIS", "AIGIS/AIGIS.config", "AIGIS/AIGIS.core", "AIGIS/token",
                          "run.sh")  # fmt: skip
    assert box.host_path(f"{dest}/AIGIS/AIGIS.core").read_text() == "def forecast(): return 'sun'\n"
    assert box.run("sh", f"{dest}/run.sh").stdout == "hi\n"
    assert (mode(box, dest), mode(box, f"{dest}/run.sh")) == (0o755, 0o755)
    assert mode(box, f"{dest}/AIGIS/AIGIS.config") == 0o644
    assert mode(box, f"{dest}/AIGIS/token") == 0o400
    assert box.host_path(f"{dest}/AIGIS/token").read_text() == "s3cret\n"
    core_before = os.stat(box.host_path(f"{dest}/AIGIS/AIGIS.core"))

    (src / "AIGIS" / "AIGIS.config").write_text("SKILLS = ['forecast', 'rain']\n")
    (src / "run.sh").unlink()
    second = ship(master, "weather", src, secrets=secrets)
    assert (second.sent, second.deleted, second.unchanged) == (("AIGIS/AIGIS.config",),
                                                               ("run.sh",), 3)  # fmt: skip
    text = box.host_path(f"{dest}/AIGIS/AIGIS.config").read_text()
    assert text == "SKILLS = ['forecast', 'rain']\n"
    assert not box.host_path(f"{dest}/run.sh").exists()
    core_after = os.stat(box.host_path(f"{dest}/AIGIS/AIGIS.core"))
    assert (core_after.st_ino, core_after.st_mtime_ns) == (core_before.st_ino,
                                                           core_before.st_mtime_ns)  # fmt: skip

    third = ship(master, "weather", src, secrets=secrets)
    assert (third.sent, third.deleted, third.bytes_sent) == ((), (), 0)
    assert len(connections(server)) == 1


def test_master_comes_back_after_a_cut_link(lab: Lab) -> None:
    server, link = lab.remote()
    # ServerAlive 1 s x 2: the master notices a dead link after about 3 s and exits.
    master = lab.master(server, "web1", server_alive_interval=1, server_alive_count=2,
                        connect_timeout=2)  # fmt: skip
    master.open()
    before = master.master_pid()
    assert before is not None
    link.cut()
    try:
        for ns, dev, addr in ((lab.netns, link.a_dev, link.a_addr), (server.box, link.b_dev,
                                                                    link.b_addr)):  # fmt: skip
            shown = subprocess.run(in_netns(ns.pid, "ip", "-6", "-o", "addr", "show", "dev", dev),
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
            assert f"{addr}/64" in shown, f"keep_addr_on_down: {dev} lost {addr}"
        wait_until(lambda: master.master_pid() is None, 30, "the master to notice the cut link")
        with pytest.raises(HostError) as e:
            master.run(["true"], timeout=30)
        assert e.value.kind == "unreachable"
    finally:
        link.restore()
    result = master.run(["echo", "back"])
    assert result.stdout == b"back\n"
    after = master.master_pid()
    assert after is not None and after != before  # a new master, not a direct connection
    wait_until(lambda: len(connections(server)) == 1, 30, "the dead connection to go away")


def test_check_names_a_host_without_systemd(lab: Lab, tmp_path: Path) -> None:
    bare = BareHost(tmp_path / "bare")
    try:
        link = join(lab.netns, bare)
        lab.links.append(link)
        bare.serve(link.b_addr)
        spec = HostSpec("bare", bare.address, "root", bare.port, str(bare.client_key),
                        python="/usr/bin/python3")  # fmt: skip
        settings = SshSettings(lab.runtime_dir, known_hosts=bare.known_hosts, config_file="none")
        master = Master(spec, settings, wrap=lab.netns.argv())
        lab.masters.append(master)
        with pytest.raises(HostError) as e:
            master.check()
        assert e.value.kind == "no-systemd"
        assert str(e.value) == 'host "bare": systemd is not running (offline)'
        master.close()
    finally:
        bare.close()


def test_open_replaces_a_stale_control_socket(lab: Lab) -> None:
    server, _ = lab.remote()
    master = lab.master(server, "web1")
    master.open()
    killed = master.master_pid()
    assert killed is not None
    os.kill(killed, signal.SIGKILL)  # the socket file stays behind, nobody listening
    wait_until(lambda: not Path(f"/proc/{killed}").exists() or master.master_pid() is None, 10,
               "the killed master to go")  # fmt: skip
    assert master.control_path.exists()
    master.open()
    assert master.master_pid() not in (None, killed)  # a master again, not a plain connection
    assert master.run(["echo", "ok"]).stdout == b"ok\n"


def test_the_hosts_system_bus_is_reachable_over_the_master(lab: Lab) -> None:
    """The systemd backend's own D-Bus client reads remote units through a forwarded socket."""
    server, _ = lab.remote()
    master = lab.master(server, "web1")
    bus = master.forward("/run/dbus/system_bus_socket", "bus")
    systemd = Systemd(bus=f"unix:path={bus}")
    try:
        assert systemd.version() == int(server.box.run("systemctl", "--version").stdout.split()[1])
        (state,) = systemd.states(["aigis-test-sshd.service"])
        assert (state.active_state, state.sub_state) == ("active", "running")
        assert state.main_pid == int(server.box.unit_property("aigis-test-sshd.service", "MainPID"))
    finally:
        systemd.close()
    assert len(connections(server)) == 1  # the bus rides on the one connection
    assert master.forward("/run/dbus/system_bus_socket", "bus") == bus  # again: idempotent


def test_a_new_master_forwards_over_the_socket_an_ended_one_left(lab: Lab) -> None:
    server, _ = lab.remote()
    master = lab.master(server, "web1")
    bus = master.forward("/run/dbus/system_bus_socket", "bus")
    master.close()
    assert bus.is_socket()  # left behind: a new master would not bind over it by itself
    master.open()
    assert master.forward("/run/dbus/system_bus_socket", "bus") == bus
    systemd = Systemd(bus=f"unix:path={bus}")
    try:
        assert systemd.version() > 0
    finally:
        systemd.close()


def test_boxes_join_each_other(lab: Lab) -> None:
    """Box to box, as when the core itself runs in a box: ssh from inside one reaches another."""
    core = lab.boot_box(net=True)
    remote = lab.boot_box(net=True)
    link = join(core, remote)
    lab.links.append(link)
    server = start_sshd(remote, link.b_addr)
    ssh = ["ssh", "-F", "none", "-i", str(server.client_key), "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
           "-l", "root", server.address, "--", "cat /etc/machine-id"]  # fmt: skip
    answer = core.run(*ssh).stdout.strip()
    assert answer == remote.host_path("/etc/machine-id").read_text().strip()
    assert answer != core.host_path("/etc/machine-id").read_text().strip()


def test_a_command_past_its_timeout_fails_alone(lab: Lab) -> None:
    server, _ = lab.remote()
    master = lab.master(server, "web1")
    master.open()
    pid = master.master_pid()
    with pytest.raises(HostError) as e:
        master.run(["python3", "-c", "import time\ntime.sleep(60)"], timeout=1)
    assert (e.value.kind, str(e.value)) == (
        "timeout", "host \"web1\": no answer within 1s (python3 -c 'import time)"
    )  # fmt: skip
    assert master.master_pid() == pid  # the master outlives the abandoned command
    assert master.run(["echo", "still here"]).stdout == b"still here\n"
