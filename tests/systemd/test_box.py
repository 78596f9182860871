"""Tests of the systemd box harness itself, against a real systemd (see box.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import box as box_module
from .box import Box, BoxError, own_cgroup_dir, reap_stale_boxes, wait_until

pytestmark = pytest.mark.systemd

BootBox = Callable[..., Box]


def unit(name: str, text: str) -> tuple[str, str]:
    return f"/etc/systemd/system/{name}", textwrap.dedent(text)


def install(box: Box, name: str, text: str) -> None:
    box.write(*unit(name, text))
    box.systemctl("daemon-reload")


def test_boots_to_running_or_degraded(box: Box) -> None:
    assert box.state in ("running", "degraded")
    answer = box.run("systemctl", "is-system-running", check=False).stdout.strip()
    assert answer in ("running", "degraded")
    assert Path(f"/proc/{box.pid}/comm").read_text().strip() == "systemd"
    assert box.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert box.host_path("/run/systemd/container").read_text().strip() == "aigis-box"
    assert box.unit_property("box.target", "ActiveState") == "active"


def test_tmp_wipers_are_masked(module_box: Box) -> None:
    for name in ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer", "tmp.mount"):
        assert module_box.unit_property(name, "LoadState") == "masked", name


def test_unit_file_start_and_journal(box: Box) -> None:
    token = secrets.token_hex(8)
    install(
        box,
        "hello-box.service",
        f"""\
        [Service]
        Type=oneshot
        ExecStart=/bin/echo hello from the box {token}
        """,
    )
    box.systemctl("start", "hello-box.service")
    assert box.unit_property("hello-box.service", "Result") == "success"
    wait_until(lambda: token in box.journal("hello-box.service"), 10, "the unit's output")


def test_restart_gives_up_after_start_limit(box: Box) -> None:
    install(
        box,
        "crashy.service",
        """\
        [Unit]
        StartLimitIntervalSec=60
        StartLimitBurst=3

        [Service]
        ExecStart=/bin/sh -c 'echo crashing; exit 1'
        Restart=on-failure
        RestartSec=100ms
        """,
    )
    box.systemctl("start", "--no-block", "crashy.service")
    wait_until(
        lambda: (
            box.unit_property("crashy.service", "ActiveState") == "failed"
            and "repeated too quickly" in box.journal("crashy.service")
        ),
        15,
        "crashy.service to give up",
    )
    # systemd 252 counts the restart that the start limit then refuses: NRestarts == burst, with
    # burst runs in all, and Result stays exit-code (SYSTEMD-TESTING.md).
    assert box.unit_property("crashy.service", "NRestarts") == "3"
    assert box.unit_property("crashy.service", "Result") == "exit-code"
    assert box.journal("crashy.service").count("crashing") == 3


def test_notify_unit_becomes_active(box: Box) -> None:
    code = (
        "import os, socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); print('ready', flush=True); "
        "time.sleep(600)"
    )
    install(
        box,
        "notifier.service",
        f"""\
        [Service]
        Type=notify
        ExecStart={sys.executable} -c "{code}"
        TimeoutStartSec=10
        """,
    )
    box.systemctl("start", "notifier.service")  # returns once READY=1 arrived
    assert box.unit_property("notifier.service", "ActiveState") == "active"
    assert box.unit_property("notifier.service", "SubState") == "running"


def test_system_bus_is_socket_activated(module_box: Box) -> None:
    ping = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.DBus.Peer")
    module_box.run("busctl", "call", *ping, "Ping")
    assert module_box.unit_property("dbus.service", "ActiveState") == "active"
    with socket.socket(socket.AF_UNIX) as s:  # the bus is reachable from the host too
        s.connect(module_box.bus_address.removeprefix("unix:path="))


def test_host_tmp_canary_survives_boot_and_shutdown(boot_box: BootBox) -> None:
    canary = Path(f"/tmp/aigis-canary-{secrets.token_hex(6)}")
    canary.write_text("canary\n")
    try:
        box = boot_box()
        box.run("test", "-e", str(canary))  # the box shares /tmp, and did not wipe it
        box.shutdown()
        assert canary.exists()
    finally:
        canary.unlink(missing_ok=True)


def test_etc_and_var_writes_stay_in_the_box(box: Box) -> None:
    name = f"aigis-box-probe-{secrets.token_hex(4)}"
    passwd = Path("/etc/passwd").read_text()
    box.write(f"/etc/{name}", "inside\n")
    box.run("sh", "-c", f"echo inside > /var/lib/{name}")
    box.run("useradd", "--system", "--no-create-home", name[:30])
    assert box.run("cat", f"/etc/{name}").stdout == "inside\n"
    # cwd is resolved inside the box: its /etc/systemd/system has box.target, the host's has not
    assert "box.target" in box.run("ls", cwd="/etc/systemd/system").stdout.split()
    assert name[:30] in box.run("getent", "passwd", name[:30]).stdout
    assert not Path(f"/etc/{name}").exists()
    assert not Path(f"/var/lib/{name}").exists()
    assert Path("/etc/passwd").read_text() == passwd
    assert box.host_path("/etc/machine-id").read_text() != Path("/etc/machine-id").read_text()


def test_write_refuses_paths_that_reach_the_host(module_box: Box) -> None:
    for path in ("/opt/x", "/tmp/x", "/etc/../opt/x", "relative"):
        with pytest.raises(ValueError):
            module_box.write(path, "no")


def test_host_services_are_not_started(module_box: Box) -> None:
    box = module_box
    assert box.unit_property("postgresql.service", "LoadState") == "masked"
    assert box.unit_property("postgresql.service", "ActiveState") == "inactive"
    comms = [p.read_text().strip() for p in box.host_path("/proc").glob("[0-9]*/comm")]
    assert not [c for c in comms if "postgres" in c]
    running = box.systemctl(
        "list-units", "--type=service", "--state=running", "--no-legend", "--plain"
    ).stdout.split("\n")
    names = {line.split()[0] for line in running if line.strip()}
    assert names <= {"systemd-journald.service", "dbus.service"}, names
    # Every unit the host links from a *.wants dir is masked, and no generator ran.
    units = [u for u in box.masks if "@." not in u]  # templates cannot be shown
    shown = box.systemctl("show", "-p", "LoadState", *units).stdout.split()
    assert shown == ["LoadState=masked"] * len(units)
    generated = box.host_path("/run/systemd/generator")
    assert not generated.exists() or not any(generated.iterdir())


def _namespaces(pid: int) -> set[str]:
    return {os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("mnt", "pid")}


def _pids_in(namespaces: set[str], box: Box) -> list[int]:
    """Processes in the box's namespaces. A dead namespace's inode number gets reused, so skip
    processes that belong to another box (a concurrent test session may boot boxes)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if {os.readlink(entry / "ns/mnt"), os.readlink(entry / "ns/pid")} & namespaces:
                cgroup = (entry / "cgroup").read_text()
                if "/aigis-box-" not in cgroup or f"/{box.cgroup.name}/" in cgroup:
                    found.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return found


def _cgroup_pids(path: Path) -> set[tuple[int, str]]:
    """(pid, /proc/pid/stat start time) of every process in a cgroup tree."""
    pids = set()
    for procs in path.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                pids.add((int(pid), Path(f"/proc/{pid}/stat").read_text().split()[21]))
    return pids


def test_shutdown_leaves_no_process_mount_or_cgroup(boot_box: BootBox) -> None:
    box = boot_box()
    namespaces = _namespaces(box.pid)
    assert _pids_in(namespaces, box)
    processes = _cgroup_pids(box.cgroup)
    assert len(processes) >= 2  # systemd, journald
    box.shutdown()
    assert not Path(f"/proc/{box.pid}").exists()
    assert not box.cgroup.exists()
    assert _pids_in(namespaces, box) == []
    for pid, start in processes:
        with contextlib.suppress(OSError):
            assert Path(f"/proc/{pid}/stat").read_text().split()[21] != start, pid
    host_mounts = Path("/proc/self/mountinfo").read_text()
    assert "aigis-box" not in host_mounts and str(box.workdir) not in host_mounts
    box.shutdown()  # idempotent


def test_two_boxes_in_parallel_are_isolated(boot_box: BootBox) -> None:
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: boot_box(), range(2))
    assert a.pid != b.pid and a.cgroup != b.cgroup
    assert a.host_path("/etc/machine-id").read_text() != b.host_path("/etc/machine-id").read_text()
    install(a, "only-in-a.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    a.systemctl("start", "only-in-a.service")
    assert not b.host_path("/etc/systemd/system/only-in-a.service").exists()
    assert b.unit_property("only-in-a.service", "LoadState") == "not-found"
    a.shutdown()
    assert b.run("systemctl", "is-system-running", check=False).stdout.strip() == b.state


def test_net_box_has_only_loopback(boot_box: BootBox) -> None:
    box = boot_box(net=True)
    devices = box.run("cat", "/proc/net/dev").stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]


@pytest.mark.usefixtures("_box_session")
def test_reap_stale_boxes_cleans_up_after_a_killed_owner(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""\
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from tests.systemd.box import Box
        box = Box.boot(__import__("pathlib").Path({str(tmp_path / "orphan")!r}))
        print(box.pid, box.cgroup, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid, cgroup = owner.stdout.readline().split()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    assert Path(cgroup).exists() and Path(f"/proc/{pid}").exists()  # left behind
    reap_stale_boxes()
    assert not Path(cgroup).exists()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5, "the orphan's PID 1 to go")
    assert not list(own_cgroup_dir().glob(f"aigis-box-{owner.pid}-*"))


@pytest.mark.usefixtures("_box_session")
@pytest.mark.parametrize("init", ["echo init fails; exit 3", "echo init hangs; exec sleep 600"])
def test_failed_boot_is_reported_and_cleaned_up(
    init: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "init.sh"
    script.write_text(init + "\n")
    monkeypatch.setattr(box_module, "INIT_SCRIPT", script)
    mine = f"aigis-box-{os.getpid()}-*"  # other sessions may boot boxes meanwhile
    before = set(own_cgroup_dir().glob(mine))
    with pytest.raises(BoxError, match="did not boot") as failure:
        Box.boot(tmp_path / "w", timeout=1)
    assert init.split(";")[0].removeprefix("echo ") in str(failure.value)  # box-init.log tail
    assert set(own_cgroup_dir().glob(mine)) == before
