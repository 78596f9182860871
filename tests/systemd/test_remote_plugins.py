"""Plugins on other hosts, end to end: a real core drives real systemd boxes over real ssh.

The core runs on the test's side (embedded backend) inside a network namespace of its own,
joined to each remote box by a veth pair with fd00::/8 addresses; every box runs sshd with keys
made by the test. Plugins with a ``HOST`` run in the box as ``aigis-plugin@NAME`` under its
systemd and, for internal plugins, call back to the core's TCP listener.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .box import Box, wait_until
from .net import BareHost, Link, Netns, SshServer, install_host_key, join, start_sshd

pytestmark = pytest.mark.systemd

PYTHON = sys.executable
REMOTE_PYTHON = "/usr/bin/python3"  # the box's own interpreter: AIGIS ships its runtime there

SKILLS_CORE = """\
def add(a, b):
    return a + b

def boom():
    raise KeyError("nope")

def make():
    return lambda x: x * 2

import types
skills = types.SimpleNamespace(add=add, boom=boom, make=make)
SKILLS = ["skills.add", "skills.boom", "skills.make"]
"""

CALLER = """\
import time
import aigis

def launch():
    print("value", aigis.skills.add(2, 3))
    try:
        aigis.skills.boom()
    except KeyError as exc:
        print("exception", type(exc).__name__, exc)
    print("lambda", aigis.skills.make()(21))
    with open("token.txt") as f:
        print("secret", f.read().strip())
    while True:
        time.sleep(1)
"""


@dataclass
class Core:
    """An AIGIS core on the test's side, in the test's network namespace, and its files."""

    netns: Netns
    dir: Path
    runtime_dir: Path
    address: str  # the core's address on its links
    port: int = 7878  # of its TCP listener
    tcp: str | None = None  # [aigis] tcp; None: [address]:port
    hosts: dict[str, str] = field(default_factory=dict)  # name -> inline table
    plugins: list[tuple[str, str, str]] = field(default_factory=list)  # (table, name, value)
    known_hosts: Path | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def config(self) -> Path:
        return self.dir / "aigis.toml"

    def plugin(self, table: str, name: str, manifest: str, files: dict[str, str],
               **entry: str) -> None:  # fmt: skip
        root = self.dir / "plugins" / name
        (root / "AIGIS").mkdir(parents=True)
        (root / "AIGIS" / "AIGIS.config").write_text(textwrap.dedent(manifest))
        for path, text in files.items():
            (root / path).write_text(text)
        value = {"source": f"plugins/{name}", **entry}
        inline = ", ".join(f'{k} = "{v}"' for k, v in value.items())
        self.plugins.append((table, name, f"{{ {inline} }}"))

    def host(
        self,
        name: str,
        server: SshServer | BareHost,
        address: str | None = None,
        core_address: str | None = None,
    ) -> None:
        extra = f', core_address = "{core_address}"' if core_address else ""
        self.hosts[name] = (
            f'{{ address = "{address or server.address}", user = "root", port = {server.port}, '
            f'identity_file = "{server.client_key}", python = "{REMOTE_PYTHON}"{extra} }}'
        )
        lines = server.known_hosts.read_text()
        assert self.known_hosts is not None
        with open(self.known_hosts, "a") as f:
            f.write(lines)

    def write_config(self) -> None:
        lines = [
            "[aigis]",
            'state_dir = "state"',
            'secrets_dir = "secrets"',
            f'runtime_dir = "{self.runtime_dir}"',
            f'tcp = "{self.tcp or f"[{self.address}]:{self.port}"}"',
            f'known_hosts = "{self.known_hosts}"',
            'ssh_config = "/dev/null"',
            "connect_timeout = 3",
            "restart_delay = 0.2",
            'plugin_user = "root"',  # local plugins of the embedded core (no packaged account)
            "[hosts]",
            *(f"{name} = {table}" for name, table in self.hosts.items()),
        ]
        for table in ("core", "internal", "external"):
            lines.append(f"[{table}]")
            lines += [f"{n} = {v}" for t, n, v in self.plugins if t == table]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_config()
        self.log_path = self.dir / f"core-{int(time.monotonic() * 1000)}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.netns.argv(PYTHON, "-m", "aigis", "-c", str(self.config),
                                "--supervisor", "embedded"),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip
        self.wait_log("ready:", 60)

    @property
    def log(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30) -> str:
        def seen() -> str | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"core exited ({self.proc.returncode}):\n{self.log}")
            return self.log if text in self.log else None

        return wait_until(seen, timeout, f"{text!r} in the core's log")

    def ctl(self, *args: str) -> tuple[int, str, str]:
        out = subprocess.run(
            self.netns.argv(PYTHON, "-m", "aigis._ctl", "-c", str(self.config), *args),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.returncode, out.stdout, out.stderr

    def status(self) -> dict[str, dict]:
        code, out, err = self.ctl("status", "--json")
        assert code in (0, 3), err
        return {row["name"]: row for row in json.loads(out)}

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> dict:
        def reached() -> dict | None:
            row = self.status()[name]
            return row if row["state"] in states else None

        try:
            return wait_until(reached, timeout, f"{name} to be {'/'.join(states)}", 0.3)
        except Exception:
            raise AssertionError(f"{self.status()[name]}\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL the core (its ssh master lives on, as after a crash)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def _kill_ssh_of(runtime_dir: Path) -> None:
    """End ssh masters left by a killed core (their command line names the control socket)."""
    marker = str(runtime_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if cmdline.startswith(b"ssh\0") and marker in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)


@dataclass
class Lab:
    netns: Netns
    boot_box: Callable[..., Box]
    core: Core
    links: list[Link] = field(default_factory=list)
    bare: list[BareHost] = field(default_factory=list)

    def remote(self) -> tuple[SshServer, Link]:
        box = self.boot_box(net=True)
        link = join(self.netns, box)
        self.links.append(link)
        return start_sshd(box, link.b_addr), link


@pytest.fixture
def lab(boot_box: Callable[..., Box], tmp_path: Path) -> Iterator[Lab]:
    netns = Netns()
    runtime_dir = Path(tempfile.mkdtemp(prefix="aigis-rt-", dir="/tmp"))
    workdir = tmp_path / "core"
    (workdir / "secrets").mkdir(parents=True)
    core = Core(netns, workdir, runtime_dir, address="", known_hosts=workdir / "known_hosts")
    core.known_hosts.write_text("")
    lab = Lab(netns, boot_box, core)
    try:
        yield lab
    finally:
        try:
            if core.proc is not None:
                core.stop()
        finally:
            _kill_ssh_of(runtime_dir)
            for link in lab.links:
                link.close()
            for host in lab.bare:
                host.close()
            netns.close()
            shutil.rmtree(runtime_dir, ignore_errors=True)


def journal_with(box: Box, name: str, text: str) -> str | None:
    """The journal of plugin ``name``'s unit in ``box`` once it holds ``text``."""
    journal = box.journal(f"aigis-plugin@{name}.service")
    return journal if text in journal else None


def unit_pid(box: Box, name: str) -> int:
    return int(box.unit_property(f"aigis-plugin@{name}.service", "MainPID"))


def test_internal_plugin_runs_on_the_remote_host_and_calls_the_core(lab: Lab) -> None:
    server, link = lab.remote()
    core = lab.core
    core.address = link.a_addr
    core.host("r1", server)
    core.plugin("core", "skills", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n',
                {"AIGIS/AIGIS.core": SKILLS_CORE})  # fmt: skip
    core.plugin(
        "internal", "caller",
        """\
        PLUGIN_TYPE = "internal"
        ENTRYPOINT = "{root}"
        LAUNCH = "caller"
        HOST = "r1"
        SECRETS = {"token": "token.txt"}
        """,
        {"caller.py": CALLER},
    )  # fmt: skip
    (core.dir / "secrets" / "caller").mkdir()
    (core.dir / "secrets" / "caller" / "token").write_text("s3cret\n")
    core.plugin(
        "external", "crasher",
        """\
        PLUGIN_TYPE = "external"
        ENTRYPOINT = "{root}"
        LAUNCH = ["/bin/sh", "-c", "echo crashing; exit 3"]
        RESTART = 2
        """,
        {}, host="r1",
    )  # fmt: skip
    core.start()
    box = server.box

    row = core.wait_state("caller", "running")
    assert row["host"] == "r1"
    journal = wait_until(lambda: journal_with(box, "caller", "secret"), 30, "the caller's output")
    assert "value 5" in journal
    assert "exception KeyError 'nope'" in journal
    assert "lambda 42" in journal
    assert "secret s3cret" in journal
    pid = unit_pid(box, "caller")
    assert row["pid"] == pid
    # It runs as its own account, and only it can read its secret.
    user = box.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip()
    assert user == "aigis-caller"
    secret = box.run("stat", "-c", "%a %U", "/var/lib/aigis/ext/caller/token.txt").stdout
    assert secret.strip() == "400 aigis-caller"

    crashed = core.wait_state("crasher", "failed")
    assert (crashed["restarts"], crashed["host"]) == (2, "r1")
    assert crashed["reason"] == "gave up after 2 restarts (last: exit 3)"
    # Started once and restarted exactly twice by the box's systemd (which counts a third,
    # refused by its start limit, in NRestarts: systemd 252).
    runs = box.journal("aigis-plugin@crasher.service", "-o", "cat").splitlines()
    assert runs.count("crashing") == 3

    code, out, err = core.ctl("logs", "caller", "-n", "50")
    assert code == 0, err
    assert "value 5" in out and "lambda 42" in out
    code, out, _ = core.ctl("status")
    header = out.splitlines()[0].split()
    assert header[:4] == ["NAME", "TYPE", "HOST", "STATE"]

    assert core.stop() == 0  # SIGTERM: remote plugins are stopped too
    assert box.unit_property("aigis-plugin@caller.service", "ActiveState") in ("inactive", "")
    assert not box.host_path("/run/systemd/system/aigis-plugin@caller.service.d").exists()


def _skills_and_caller(core: Core, host: str = "r1", body: str = CALLER) -> None:
    core.plugin("core", "skills", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n',
                {"AIGIS/AIGIS.core": SKILLS_CORE})  # fmt: skip
    core.plugin(
        "internal", "caller",
        f"""\
        PLUGIN_TYPE = "internal"
        ENTRYPOINT = "{{root}}"
        LAUNCH = "caller"
        HOST = "{host}"
        """,
        {"caller.py": body},
    )  # fmt: skip


def test_a_killed_core_leaves_remote_units_running_and_the_next_adopts_them(lab: Lab) -> None:
    server, link = lab.remote()
    core = lab.core
    core.address = link.a_addr
    core.host("r1", server)
    _skills_and_caller(core, body=CALLER.replace('open("token.txt")', 'open("caller.py")'))
    core.start()
    pid = core.wait_state("caller", "running")["pid"]
    assert pid == unit_pid(server.box, "caller")
    core.kill()
    assert unit_pid(server.box, "caller") == pid  # nothing stopped it

    core.start()
    core.wait_log('adopted: "caller" aigis-plugin@caller.service on host r1 pid')
    row = core.wait_state("caller", "running")
    assert row["pid"] == pid == unit_pid(server.box, "caller")
    assert 'started: "caller"' not in core.log
    starts = server.box.journal("aigis-plugin@caller.service", "-o", "cat").count("value 5")
    assert starts == 1  # it never ran twice


SLEEPER = """\
PLUGIN_TYPE = "external"
ENTRYPOINT = "{root}"
LAUNCH = ["/bin/sleep", "3600"]
"""


def test_unusable_hosts_fail_their_plugins_with_one_line_and_the_others_run(
    lab: Lab, tmp_path: Path
) -> None:
    core = lab.core
    good, link = lab.remote()
    changed, _ = lab.remote()
    bare = BareHost(tmp_path / "bare")
    lab.bare.append(bare)
    lab.links.append(join(lab.netns, bare))
    bare.serve(lab.links[-1].b_addr)
    core.address = link.a_addr
    core.host("good", good)
    core.host("changed", changed)
    core.host("bare", bare)
    core.host("ghost", good, address=link.a_addr.replace("::1", "::99"))
    install_host_key(changed.box, changed.box.workdir / "ssh")  # reinstalled after we knew it
    changed.box.systemctl("restart", "aigis-test-sshd.service")
    for name in ("good", "changed", "bare", "ghost"):
        core.plugin("external", f"on-{name}", SLEEPER, {}, host=name)
    core.write_config()
    code, out, err = core.ctl("check", "--connect")
    assert code == 1, out + err
    assert 'host "good": reachable: python 3.' in out
    assert sorted(line.split(":")[1] for line in err.splitlines() if line.startswith("error")) == [
        ' host "bare"', ' host "changed"', ' host "ghost"',
    ]  # fmt: skip
    core.start()

    assert core.wait_state("on-good", "running")["host"] == "good"
    expected = {
        "changed": 'host "changed": host key CHANGED: it differs from the one in known_hosts',
        "bare": 'host "bare": systemd is not running',
        "ghost": 'host "ghost": unreachable: connect to host',
    }
    for name, start in expected.items():
        row = core.wait_state(f"on-{name}", "failed")
        assert row["reason"].startswith(start), row
        assert "\n" not in row["reason"] and "retrying in" in row["reason"]
        assert (
            len([line for line in core.log.splitlines() if f'waiting: host "{name}"' in line]) == 1
        )
    assert core.status()["on-good"]["state"] == "running"
    assert good.box.unit_property(r"aigis-plugin@on\x2dgood.service", "ActiveState") == "active"


def test_requirements_run_on_the_host_once_and_reload_moves_plugins_between_hosts(
    lab: Lab,
) -> None:
    server, link = lab.remote()
    core, box = lab.core, server.box
    core.address = link.a_addr
    core.host("r1", server)
    core.plugin(
        "external", "needs",
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\nLAUNCH = ["/bin/sleep", "3600"]\n'
        'REQUIREMENTS_COMMAND = "cat"\nREQUIREMENTS_FILE = "{root}/req.txt"\n',
        {"req.txt": "pkg==1 from $(hostname)\n"}, host="r1",
    )  # fmt: skip
    core.plugin(
        "external", "lacks",
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\nLAUNCH = ["/bin/sleep", "3600"]\n'
        'SYSTEM_REQUIREMENTS = ["sh", "no-such-tool-anywhere"]\n',
        {}, host="r1",
    )  # fmt: skip
    core.plugin("external", "mover", SLEEPER, {}, host="r1")
    core.start()
    core.wait_state("needs", "running")
    # The command ran on the host, in the shipped copy, with the file's path there.
    core.wait_log('requirements: "needs" on host r1: pkg==1 from $(hostname)')
    lacks = core.wait_state("lacks", "failed")
    assert lacks["reason"] == (
        "missing system requirements on host r1: no-such-tool-anywhere "
        "(SYSTEM_REQUIREMENTS; not on PATH)"
    )
    remote_pid = core.wait_state("mover", "running")["pid"]
    assert remote_pid == unit_pid(box, "mover")

    # Home: stopped there (its drop-in gone), started here.
    core.plugins = [(t, n, v.replace(', host = "r1"', "") if n == "mover" else v)
                    for t, n, v in core.plugins]  # fmt: skip
    core.write_config()
    code, out, err = core.ctl("reload")
    assert code == 0, out + err
    row = core.wait_state("mover", "running")
    assert row["host"] == "localhost" and row["pid"] != remote_pid
    assert Path(f"/proc/{row['pid']}").exists()  # a process of this machine
    assert box.unit_property("aigis-plugin@mover.service", "ActiveState") == "inactive"
    assert not box.host_path("/run/systemd/system/aigis-plugin@mover.service.d").exists()

    # A restarted core does not run unchanged requirements again.
    core.kill()
    core.start()
    core.wait_state("needs", "running")
    assert 'requirements: "needs"' not in core.log


COUNTER_CORE = """\
import types

def hit(i):
    with open({log!r}, "a") as f:
        f.write(f"{{i}}\\n")
    return i

counter = types.SimpleNamespace(hit=hit)
SKILLS = ["counter.hit"]
"""

LOOPER = """\
import time
import aigis
from aigis import CoreUnavailable

def launch():
    i = 0
    while True:
        i += 1  # a fresh number for every attempt: a call run twice shows as a duplicate
        try:
            aigis.counter.hit(i)
            print("ok", i)
        except CoreUnavailable:
            print("unavailable", i)
            time.sleep(0.2)
        time.sleep(0.05)
"""


#: Run in the core's network namespace: the TCP payloads to and from port 7878 seen on a link
#: for a while (IPv6 over Ethernet, AF_PACKET), as hex lines.
CAPTURE = """\
import socket, struct, sys, time
dev, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind((dev, 0))
s.settimeout(0.2)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    ip = frame[14:]
    if len(ip) < 60 or ip[6] != 6:
        continue
    tcp = ip[40:]
    ports = struct.unpack("!HH", tcp[:4])
    payload = tcp[(tcp[12] >> 4) * 4:]
    if 7878 in ports and payload:
        print(payload.hex())
"""


def test_a_cut_link_pauses_calls_and_nothing_runs_twice(lab: Lab) -> None:
    server, link = lab.remote()
    core, box = lab.core, server.box
    core.address = link.a_addr
    core.host("r1", server)
    hits = core.dir / "hits.log"
    core.plugin("core", "counter", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n',
                {"AIGIS/AIGIS.core": COUNTER_CORE.format(log=str(hits))})  # fmt: skip
    core.plugin("internal", "looper",
                'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "looper"\nHOST = "r1"\n',
                {"looper.py": LOOPER})  # fmt: skip
    core.start()
    pid = core.wait_state("looper", "running")["pid"]

    def count() -> int:
        return len(hits.read_text().split()) if hits.exists() else 0

    wait_until(lambda: count() >= 20, 30, "calls from the remote plugin")
    # What crosses the link is TLS: no pickle, no skill name in clear text.
    seen = subprocess.run(
        core.netns.argv(PYTHON, "-c", CAPTURE, link.a_dev, "2"),
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()  # fmt: skip
    payloads = b"".join(bytes.fromhex(line) for line in seen)
    assert len(seen) >= 10, seen  # the calls went on meanwhile
    # (short tokens turn up in random ciphertext: look for the skill's name and whole frame
    # starts, a 4-byte length, the payload's tag and the pickle header)
    assert b"counter" not in payloads
    assert not re.search(rb"\x00[\x00-\xff]{3}[PD]\x80[\x04\x05]", payloads)
    link.cut()
    cut_at = time.monotonic()
    try:
        paused = count()
        row = core.wait_state("looper", "unknown", timeout=30)
        assert row["reason"].startswith('host "r1" unreachable since '), row
        while time.monotonic() - cut_at < 10:  # the whole cut: nothing gets through
            assert count() == paused
            time.sleep(0.5)
    finally:
        link.restore()
    wait_until(lambda: count() >= paused + 20, 120, "calls to resume after the link is back")
    assert core.wait_state("looper", "running")["pid"] == pid == unit_pid(box, "looper")
    # The journal first: the plugin goes on calling, and every "ok" it printed before this read
    # is in the core's log by the time that is read.
    journal = box.journal("aigis-plugin@looper.service", "-o", "cat").splitlines()
    numbers = [int(n) for n in hits.read_text().split()]
    assert len(numbers) == len(set(numbers))  # no call ran twice
    ok = [int(line.split()[1]) for line in journal if line.startswith("ok ")]
    assert set(ok) <= set(numbers)  # every call the plugin saw succeed ran in the core


def test_a_core_under_systemd_drives_a_remote_host_and_a_crash_keeps_its_units(
    boot_box: Callable[..., Box],
) -> None:
    from .test_service import Aigis

    here = boot_box(net=True)
    remote = boot_box(net=True)
    link = join(here, remote)
    try:
        server = start_sshd(remote, link.b_addr)
        aigis = Aigis(here)
        aigis.plugin("skills", "core", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n',
                     {"AIGIS/AIGIS.core": SKILLS_CORE})  # fmt: skip
        aigis.plugin(
            "caller", "internal",
            'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "caller"\nHOST = "r1"\n',
            {"caller.py": CALLER.replace('open("token.txt")', 'open("caller.py")')},
        )  # fmt: skip
        aigis.plugin("local", "external", SLEEPER, {})
        aigis.write_config(
            f'tcp = "[{link.a_addr}]:7878"\n'
            f'known_hosts = "{server.known_hosts}"\n'
            'ssh_config = "/dev/null"\nconnect_timeout = 3\n'
            "[hosts]\n"
            f'r1 = {{ address = "{link.b_addr}", user = "root", '
            f'identity_file = "{server.client_key}", python = "{REMOTE_PYTHON}" }}\n'
        )
        here.systemctl("start", "aigis")
        wait_until(lambda: aigis.status()["caller"]["state"] == "running", 60, "caller running")
        rows = aigis.status()
        assert (rows["caller"]["host"], rows["local"]["host"]) == ("r1", "localhost")
        assert rows["local"]["state"] == "running"
        assert aigis.prop("aigis-plugin@local.service", "ActiveState") == "active"
        assert here.unit_property("aigis-plugin@caller.service", "ActiveState") == "inactive"
        pid = unit_pid(remote, "caller")
        assert rows["caller"]["pid"] == pid
        wait_until(lambda: journal_with(remote, "caller", "lambda 42"), 30, "the caller's calls")
        code, out, err = aigis.ctl("logs", "caller", "-n", "50")
        assert code == 0 and "value 5" in out, err

        # The core crashes; systemd restarts it; the remote unit runs on, adopted.
        here.systemctl("kill", "-s", "KILL", "aigis")
        wait_until(lambda: 'adopted: "caller"' in aigis.core_log(), 60, "the remote unit adopted")
        assert unit_pid(remote, "caller") == pid
        assert remote.journal("aigis-plugin@caller.service", "-o", "cat").count("value 5") == 1

        here.systemctl("stop", "aigis")  # stops the remote plugin too
        assert remote.unit_property("aigis-plugin@caller.service", "ActiveState") == "inactive"
    finally:
        link.close()


def test_a_plugin_moved_home_while_no_core_ran_is_retired_on_its_old_host(lab: Lab) -> None:
    server, link = lab.remote()
    core, box = lab.core, server.box
    core.address = link.a_addr
    core.host("r1", server)
    core.plugin("external", "mover", SLEEPER, {}, host="r1")
    core.start()
    core.wait_state("mover", "running")
    core.kill()  # its unit runs on at r1
    assert box.unit_property("aigis-plugin@mover.service", "ActiveState") == "active"
    core.plugins = [(t, n, v.replace(', host = "r1"', "")) for t, n, v in core.plugins]
    core.start()  # no plugin of this config runs on r1 now
    core.wait_log("retiring: aigis-plugin@mover.service on host r1 (the config runs no such")
    row = core.wait_state("mover", "running")
    assert row["host"] == "localhost" and Path(f"/proc/{row['pid']}").exists()
    wait_until(
        lambda: box.unit_property("aigis-plugin@mover.service", "ActiveState") == "inactive",
        30, "the unit at r1 to stop",
    )  # fmt: skip


#: Run in a box: whether a TCP connection to argv[1] port argv[2] is accepted.
DIAL = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("accepted")
except OSError as exc:
    print("refused", exc)
"""


def _ssh_master_pid(runtime_dir: Path) -> int:
    """The pid of the one ssh master the core keeps (``ssh ... -o ControlMaster=yes``)."""
    marker = str(runtime_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if cmdline.startswith(b"ssh\0") and marker in cmdline and b"-N\0" in cmdline:
                    found.append(int(entry.name))
    assert len(found) == 1, found
    return found[0]


def test_a_host_that_cannot_reach_the_core_calls_back_through_the_ssh_connection(
    lab: Lab,
) -> None:
    server, link = lab.remote()
    core, box = lab.core, server.box
    core.address = link.a_addr
    core.tcp = f"127.0.0.1:{core.port}"  # the core's own loopback: no other machine reaches it
    hits = core.dir / "hits.log"
    core.plugin("core", "counter", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n',
                {"AIGIS/AIGIS.core": COUNTER_CORE.format(log=str(hits))})  # fmt: skip
    core.plugin("internal", "looper",
                'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "looper"\nHOST = "r1"\n',
                {"looper.py": LOOPER})  # fmt: skip

    def count() -> int:
        return len(hits.read_text().split()) if hits.exists() else 0

    # Without the forward, the very address the plugin is given leads nowhere, nor does the
    # core's address on the link.
    core.host("r1", server, core_address=f"127.0.0.1:{core.port}")
    core.start()
    out = box.run(REMOTE_PYTHON, "-c", DIAL, link.a_addr, str(core.port)).stdout
    assert out.startswith("refused"), out

    def unreachable() -> bool | None:  # the runner's connect, or the plugin's first call
        journal = box.journal("aigis-plugin@looper.service")
        return 'aigis runner: plugin "looper":' in journal or "unavailable 1" in journal or None

    wait_until(unreachable, 90, "the plugin to fail to reach the core")
    assert count() == 0
    assert core.stop() == 0

    core.hosts.clear()
    core.host("r1", server, core_address="ssh")
    core.write_config()
    code, out, err = core.ctl("check")
    assert code == 0, out + err
    assert (
        "internal plugins call back through the ssh connection (127.0.0.1:7878 on the host, "
        "forwarded to 127.0.0.1:7878)"
    ) in out
    core.start()
    core.wait_log("forwarded: port 7878 of host r1 to the core's 127.0.0.1:7878")
    pid = core.wait_state("looper", "running")["pid"]
    wait_until(lambda: count() >= 20, 60, "calls from the remote plugin")
    env = box.unit_property("aigis-plugin@looper.service", "Environment")
    assert "AIGIS_ADDRESS=tcp:127.0.0.1:7878" in env

    # The master dies (as with a cut link): the core brings up a new one and forwards again;
    # the plugin, still the same process, reconnects through it.
    os.kill(_ssh_master_pid(core.runtime_dir), signal.SIGKILL)
    wait_until(
        lambda: core.log.count("forwarded: port 7878 of host r1") == 2 or None, 60,
        "the forward to come back with a new master",
    )  # fmt: skip
    resumed = count()
    wait_until(lambda: count() >= resumed + 20, 60, "calls through the new forward")
    assert unit_pid(box, "looper") == pid
    numbers = [int(n) for n in hits.read_text().split()]
    assert len(numbers) == len(set(numbers))  # no call ran twice

    # A core killed and started again finds the master and its forward still up: asking ssh
    # for the same forward again is no error, and the plugin is adopted, calls going on.
    core.kill()
    core.start()
    core.wait_log('adopted: "looper" aigis-plugin@looper.service on host r1 pid')
    resumed = count()
    wait_until(lambda: count() >= resumed + 20, 60, "calls after the core's restart")
    assert core.wait_state("looper", "running")["pid"] == pid == unit_pid(box, "looper")
    assert "waiting: host" not in core.log
