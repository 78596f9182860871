"""ssh command lines and the classification of ssh's failures (aigis._remote.ssh, pure parts)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from aigis._remote.hosts import HostError, HostSpec
from aigis._remote.ssh import (
    Master,
    SshSettings,
    classify,
    command_argv,
    control_path,
    master_argv,
    on_each,
)

SPEC = HostSpec("web1", "fd00::2", "deploy", 2222, "/etc/aigis/id_web1")
SETTINGS = SshSettings(Path("/run/aigis"), known_hosts=Path("/etc/aigis/known_hosts"))


def options(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


def test_master_is_batch_strict_bounded_and_backgrounds_once_authenticated():
    argv = master_argv(SPEC, SETTINGS)
    assert argv[:7] == ["ssh", "-p", "2222", "-l", "deploy", "-i", "/etc/aigis/id_web1"]
    assert argv[-4:] == ["-f", "-N", "--", "deploy@fd00::2"]
    assert options(argv) == {
        "IdentitiesOnly": "yes",
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "ConnectTimeout": "5",
        "ServerAliveInterval": "5",
        "ServerAliveCountMax": "3",
        "ControlPath": str(control_path(SPEC, SETTINGS)),
        "LogLevel": "ERROR",
        "UserKnownHostsFile": "/etc/aigis/known_hosts",
        "GlobalKnownHostsFile": "/dev/null",
        "ControlMaster": "yes",
        "ControlPersist": "600",
    }


def test_commands_go_over_the_master_and_are_quoted_for_the_remote_shell():
    evil = ["printf", "%s\\n", "a b", "$(reboot)", "'; rm -rf / #", "*"]
    argv = command_argv(SPEC, SETTINGS, evil)
    assert options(argv)["ControlMaster"] == "auto"  # a dead master is replaced, not bypassed
    assert argv[-4:-1] == ["-T", "--", "deploy@fd00::2"]
    assert shlex.split(argv[-1]) == evil  # what the remote shell will see, word for word


def test_connect_timeout_is_a_setting():
    settings = SshSettings(Path("/run/aigis"), connect_timeout=2)
    assert options(command_argv(SPEC, settings, ["true"]))["ConnectTimeout"] == "2"


def test_no_known_hosts_setting_leaves_ssh_defaults():
    argv = master_argv(HostSpec("h", "h"), SshSettings(Path("/run/aigis")))
    assert "UserKnownHostsFile" not in options(argv)
    assert "-l" not in argv and "-i" not in argv


def test_control_path_is_per_connection_and_short():
    a = control_path(SPEC, SETTINGS)
    assert a.parent == Path("/run/aigis/ssh")
    assert control_path(HostSpec("other-name", "fd00::2", "deploy", 2222), SETTINGS) == a
    assert control_path(HostSpec("web1", "fd00::2", "root", 2222), SETTINGS) != a
    with pytest.raises(ValueError, match="too long for ssh control sockets"):
        control_path(SPEC, SshSettings(Path("/x" * 40)))


UNKNOWN = (
    "No ED25519 host key is known for fd00:a16:1::2 and you have requested strict checking.\r\n"
    "Host key verification failed.\r\n"
)
CHANGED = (
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n"
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\r\n"
    "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\r\n"
    "Host key for fd00:a16:1::2 has changed and you have requested strict checking.\r\n"
    "Host key verification failed.\r\n"
)


@pytest.mark.parametrize(
    ("stderr", "kind", "message"),
    [
        (UNKNOWN, "unknown-host-key",
         'host "web1": host key unknown: add it to known_hosts first (AIGIS never accepts new '
         "keys)"),
        (CHANGED, "changed-host-key",
         'host "web1": host key CHANGED: it differs from the one in known_hosts (a reinstalled '
         "host, or someone in between); check it, then fix known_hosts"),
        ("root@fd00::2: Permission denied (publickey).\r\n", "auth-refused",
         'host "web1": authentication refused: root@fd00::2: Permission denied (publickey).'),
        ("ssh: connect to host fd00::99 port 22: Connection timed out\r\n", "unreachable",
         'host "web1": unreachable: connect to host fd00::99 port 22: Connection timed out'),
        ("ssh: connect to host fd00::99 port 22: No route to host\r\n", "unreachable",
         'host "web1": unreachable: connect to host fd00::99 port 22: No route to host'),
        ("ssh: Could not resolve hostname web9: Name or service not known\r\n", "unreachable",
         'host "web1": unreachable: Could not resolve hostname web9: Name or service not known'),
        ("Connection closed by fd00::2 port 22\r\n", "unreachable",
         'host "web1": unreachable: Connection closed by fd00::2 port 22'),
        ("something new\n", "failed", 'host "web1": ssh failed: something new'),
    ],
)  # fmt: skip
def test_ssh_failures_become_one_line_naming_the_host(stderr, kind, message):
    error = classify("web1", stderr, 255)
    assert error is not None
    assert (error.kind, str(error), error.host) == (kind, message, "web1")
    assert "\n" not in str(error)


def test_a_remote_commands_own_failure_is_not_an_ssh_failure():
    assert classify("web1", "grep: x: No such file\n", 2) is None
    assert classify("web1", "Permission denied\n", 1) is None
    assert classify("web1", "", 255) is None  # the command itself exited 255, silently


class FakeMaster:
    def __init__(self, name: str, error: str | None = None) -> None:
        self.spec = HostSpec(name, name)
        self.error = error

    def open(self) -> None:
        if self.error:
            raise HostError(self.spec.name, "unreachable", self.error)


def test_on_each_keeps_each_hosts_outcome_apart():
    masters = [FakeMaster("a"), FakeMaster("b", "unreachable: no route"), FakeMaster("c")]
    outcome = on_each(masters, lambda m: m.open() or f"opened {m.spec.name}")
    assert outcome["a"] == "opened a" and outcome["c"] == "opened c"
    assert str(outcome["b"]) == 'host "b": unreachable: no route'
    assert on_each([], lambda m: 1) == {}


def test_on_each_lets_other_errors_through():
    with pytest.raises(ZeroDivisionError):
        on_each([FakeMaster("a")], lambda m: 1 / 0)


class ForwardingMaster(Master):
    """A Master whose ssh is a script: the ``-O forward`` lines it ran, the pid of its master."""

    def __init__(self, fail: str = "") -> None:
        super().__init__(SPEC, SETTINGS)
        self.pid = 100
        self.forwards: list[list[str]] = []
        self.fail = fail

    def open(self) -> None:
        self._pid = self.pid

    def master_pid(self) -> int | None:
        return self.pid

    def _ssh(self, argv, timeout, input=None):
        self.forwards.append(argv)
        code = 255 if self.fail else 0
        return subprocess.CompletedProcess(argv, code, b"", self.fail.encode())


def test_the_core_forward_is_a_loopback_tcp_port_added_once_per_master():
    master = ForwardingMaster()
    assert master.forward_remote(7878, "fd00::1", 7000) is True
    argv = master.forwards[0]
    assert argv[argv.index("-O") + 1] == "forward"
    assert argv[argv.index("-R") + 1] == "127.0.0.1:7878:[fd00::1]:7000"
    assert argv[-2:] == ["--", "deploy@fd00::2"]
    assert master.forward_remote(7878, "fd00::1", 7000) is False  # the same master has it
    assert len(master.forwards) == 1
    master.pid = 101  # a new master (the old one died with the link): forward again
    assert master.forward_remote(7878, "fd00::1", 7000) is True
    assert len(master.forwards) == 2


def test_a_refused_forward_names_the_host_and_the_ports():
    master = ForwardingMaster(
        fail="mux_client_forward: forwarding request failed: Port forwarding failed"
    )
    with pytest.raises(HostError) as e:
        master.forward_remote(7878, "127.0.0.1", 7878)
    assert str(e.value) == (
        'host "web1": cannot forward port 7878 of the host to the core\'s 127.0.0.1:7878: '
        "mux_client_forward: forwarding request failed: Port forwarding failed"
    )
    assert master._remote_forwards == {}  # asked again next time
