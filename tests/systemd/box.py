"""A real systemd booted as PID 1 in private namespaces (a "box"), for tests.

The box shares the host's root filesystem, so a naive boot wipes the host's /tmp and starts the
host's services (see /work/shared/SYSTEMD-TESTING.md, "DANGER"). ``Box.boot`` therefore:

* moves the launcher into a sub-cgroup of our own cgroup2 path (``aigis-box-<owner pid>-<owner
  start time>-<n>``: the name records the owner, so ``reap_stale_boxes`` can clean up after a
  killed run), runs ``unshare`` for new PID, mount, cgroup, UTS, IPC (and optionally net)
  namespaces from there, and moves the launcher back out once PID 1 exists;
* runs ``box_init.sh`` as PID 1 there: private mounts, fresh /run, private /dev, private cgroup2,
  read-only sysfs and /proc/sys, overlays on /etc and /var (and /usr with ``overlay_usr=True``,
  so that packages can be installed in the box), masks (host units, generators, tmpfiles), then
  exec's systemd with the tiny ``box.target``.

Everything written outside /etc, /var, /run and /dev (and /usr when overlaid) inside the box
lands on the host: keep test files in the box's work directory. PID 1's early log (what it writes
to /dev/kmsg and /dev/console) is drained from a FIFO into ``<workdir>/boot.log``; the init
script's own output is in ``<workdir>/box-init.log``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

from .host import (
    BOX_ENV,
    CGROUP_PREFIX,
    MUST_MASK,
    PATH,
    SYSTEMD,
    BoxError,
    alive,
    generators_to_mask,
    own_cgroup_dir,
    proc_stat,
    reap_stale_boxes,
    remove_cgroup,
    units_to_mask,
    wait_until,
)

__all__ = ["Box", "BoxError", "SYSTEMD", "reap_stale_boxes", "wait_until", "own_cgroup_dir"]

INIT_SCRIPT = Path(__file__).with_name("box_init.sh")


class _Drain(threading.Thread):
    """Copies what PID 1 writes to /dev/kmsg and /dev/console (a FIFO) into a log file."""

    def __init__(self, fifo: Path, log: Path):
        super().__init__(name=f"box-drain-{fifo.parent.name}", daemon=True)
        os.mkfifo(fifo, 0o600)
        # O_RDWR: writers never block on open, and we never see EOF between writers.
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.log = log
        self.stop = threading.Event()

    def run(self) -> None:
        with open(self.log, "ab") as out:
            while True:
                stopping = self.stop.is_set()
                with contextlib.suppress(OSError):
                    if select.select([self.fd], [], [], 0 if stopping else 0.2)[0]:
                        out.write(os.read(self.fd, 65536))
                        out.flush()
                        continue
                if stopping:
                    break
        os.close(self.fd)

    def close(self) -> None:
        self.stop.set()
        self.join(5)


class Box:
    """A booted systemd; build with ``Box.boot``, always end with ``shutdown``."""

    _seq = itertools.count(1)
    live: set[Box] = set()

    def __init__(self, workdir: Path, net: bool, overlay_usr: bool = False):
        self.workdir = workdir
        self.net = net
        self.overlay_usr = overlay_usr
        self.pid = 0  # host PID of the box's PID 1 (systemd)
        self.pid_start = 0
        me = proc_stat(os.getpid())
        assert me is not None
        self.cgroup = own_cgroup_dir() / f"{CGROUP_PREFIX}{os.getpid()}-{me[1]}-{next(self._seq)}"
        self.masks = units_to_mask()
        self.generators = generators_to_mask()
        self.boot_seconds = self.shutdown_seconds = 0.0
        self.state = ""  # what is-system-running answered at boot: running or degraded
        self._launcher: subprocess.Popen[bytes] | None = None
        self._drain: _Drain | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def boot(
        cls, workdir: Path, *, net: bool = False, timeout: float = 30, overlay_usr: bool = False
    ) -> Box:
        """Boot a box whose files live in ``workdir``; return once systemd is up.

        ``overlay_usr=True`` also overlays /usr (so /bin, /sbin and /lib, which point into it):
        ``apt-get install``/``dpkg`` inside the box then change nothing on the host. Its upper
        layer, like those of /etc and /var, lives in the box's memory and goes with it."""
        if os.geteuid() != 0:
            raise BoxError("booting a box needs root")
        if not SYSTEMD.exists():
            raise BoxError(f"{SYSTEMD} is missing")
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        box = cls(workdir, net, overlay_usr)
        missing = set(MUST_MASK) - set(box.masks)
        if missing:  # cannot happen unless someone edits ALWAYS_MASK/KEEP: never boot then
            raise BoxError(f"refusing to boot: {sorted(missing)} would not be masked")
        started = time.monotonic()
        cls.live.add(box)
        try:
            box._start()
            box._wait_running(started + timeout)
        except BaseException as e:
            report = box.diagnostics()
            box.shutdown()
            if isinstance(e, Exception):
                raise BoxError(f"box in {workdir} did not boot: {e}\n{report}") from e
            raise
        box.boot_seconds = time.monotonic() - started
        return box

    def _start(self) -> None:
        w = self.workdir
        (w / "masks.txt").write_text("".join(f"{u}\n" for u in self.masks))
        (w / "generators.txt").write_text(
            "".join(f"{kind} {n}\n" for kind, names in self.generators.items() for n in names)
        )
        self.cgroup.mkdir()
        (w / "box.json").write_text(
            json.dumps(
                {
                    "owner": os.getpid(),
                    "cgroup": str(self.cgroup),
                    "net": self.net,
                    "overlay_usr": self.overlay_usr,
                }
            )
        )
        self._drain = _Drain(w / "console.fifo", w / "boot.log")
        self._drain.start()
        flags = ["--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--propagation=private"]
        flags += ["--mount-proc", "--uts", "--ipc", "--cgroup"] + (["--net"] if self.net else [])
        host_mnt_ns = os.stat("/proc/self/ns/mnt").st_ino
        # bash enters the box cgroup first, so the cgroup namespace is rooted there.
        cmd = ["/bin/bash", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup)]
        overlays = "etc var usr" if self.overlay_usr else "etc var"
        cmd += ["unshare", *flags, "--", "/bin/bash", str(INIT_SCRIPT), str(w), str(host_mnt_ns)]
        cmd += [overlays]
        with open(w / "box-init.log", "ab") as log:
            self._launcher = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": PATH},
                start_new_session=True,
            )

    def _wait_running(self, deadline: float) -> None:
        launcher = self._launcher
        assert launcher is not None

        def pid1() -> int:
            if launcher.poll() is not None:
                raise BoxError(f"unshare exited with {launcher.returncode}")
            with contextlib.suppress(FileNotFoundError):
                children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
                return int(children.split()[0]) if children.split() else 0
            return 0

        self.pid = wait_until(pid1, deadline - time.monotonic(), "PID 1 of the box")
        # The launcher had to enter the box cgroup to root the cgroup namespace there; move it back
        # out so systemd owns its cgroup tree alone (box_init.sh waits for this).
        (self.cgroup.parent / "cgroup.procs").write_text(str(launcher.pid))
        stat = proc_stat(self.pid)
        self.pid_start = stat[1] if stat else 0
        (self.workdir / "box.json").write_text(
            json.dumps({"owner": os.getpid(), "cgroup": str(self.cgroup), "pid": self.pid})
        )

        def state() -> str:
            if launcher.poll() is not None:
                raise BoxError(f"PID 1 exited; unshare exited with {launcher.returncode}")
            if self._comm() != "systemd":
                return ""  # still the init script
            left = max(1.0, deadline - time.monotonic())
            out = self.run("systemctl", "is-system-running", check=False, timeout=left)
            answer = out.stdout.strip()  # "offline": systemd does not listen yet
            if answer in ("maintenance", "stopping"):
                raise BoxError(f"systemctl is-system-running answered {answer!r}")
            return answer if answer in ("running", "degraded") else ""

        self.state = wait_until(state, deadline - time.monotonic(), "running or degraded")

    def _comm(self) -> str:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{self.pid}/comm").read_text().strip()
        return ""

    def shutdown(self, timeout: float = 15) -> None:
        """Power the box off; leaves no process, mount or cgroup behind. Idempotent."""
        started = time.monotonic()
        launcher = self._launcher
        try:
            if launcher is not None and launcher.poll() is None:
                if self.pid and alive(self.pid, self.pid_start):
                    # systemd powers off on SIGRTMIN+4; the init script (bash) needs SIGKILL.
                    sig = signal.SIGRTMIN + 4 if self._comm() == "systemd" else signal.SIGKILL
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                try:
                    launcher.wait(timeout)
                except subprocess.TimeoutExpired:
                    # unshare --kill-child: its death SIGKILLs PID 1, which ends the namespace.
                    launcher.kill()
                    launcher.wait(5)
            if self.pid:
                wait_until(lambda: not alive(self.pid, self.pid_start), 5, "PID 1 to exit")
        finally:
            try:
                remove_cgroup(self.cgroup)  # kills whatever is left in it first
            finally:
                if self._drain is not None:
                    self._drain.close()
                    self._drain = None
                Box.live.discard(self)
        if launcher is not None and not self.shutdown_seconds:
            self.shutdown_seconds = time.monotonic() - started

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- talking to the box ------------------------------------------------------------------

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 30,
        cwd: str | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the box (all its namespaces; ``cwd`` is a path inside the box)."""
        ns = ["-m", "-p", "-u", "-i", "-C"] + (["-n"] if self.net else [])
        argv = ["nsenter", "-t", str(self.pid), *ns, f"--wdns={cwd or '/'}", "--"]
        argv += ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        return subprocess.run(
            argv,
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=BOX_ENV,
        )

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def host_path(self, path_inside: str) -> Path:
        """The host's view (via /proc/PID/root) of a path inside the box."""
        if not path_inside.startswith("/"):
            raise ValueError(f"not an absolute path: {path_inside}")
        return Path(f"/proc/{self.pid}/root{path_inside}")

    def write(self, path_inside: str, text: str) -> None:
        """Write a file inside the box, creating parents. Only box-private trees are allowed,
        plus the work directory: anything else would land on the host's disk."""
        allowed: tuple[str, ...] = ("/etc/", "/var/", "/run/", f"{self.workdir}/")
        if self.overlay_usr:
            allowed += ("/usr/",)
        if not path_inside.startswith(allowed) or "/../" in path_inside:
            raise ValueError(f"{path_inside} is not under {allowed}: it would reach the host")
        target = self.host_path(path_inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def journal(self, unit: str | None = None, *args: str) -> str:
        """The box's journal (of ``unit`` if given) as ``-o cat`` text, read from the host."""
        sel = ["-u", unit] if unit else []
        argv = [
            "journalctl",
            "-q",
            "-D",
            str(self.host_path("/run/log/journal")),
            *sel,
            "-o",
            "cat",
        ]
        out = subprocess.run(
            [*argv, "--no-pager", *args], capture_output=True, text=True, timeout=30, env=BOX_ENV
        )
        return out.stdout

    @property
    def bus_address(self) -> str:
        """D-Bus address of the box's system bus, usable from the host (e.g. with jeepney)."""
        return f"unix:path={self.host_path('/run/dbus/system_bus_socket')}"

    def unit_property(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def diagnostics(self, lines: int = 40) -> str:
        """The tails of the init script's output, PID 1's boot log and the journal."""
        parts = []
        for name in ("box-init.log", "boot.log"):
            with contextlib.suppress(OSError):
                text = (self.workdir / name).read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(text))
        if self.pid and alive(self.pid, self.pid_start):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                tail = self.journal(None, "-n", str(lines), "-o", "short-monotonic")
                parts.append("--- journal ---\n" + tail)
        return "\n".join(parts)


@atexit.register
def _shutdown_live_boxes() -> None:
    for box in list(Box.live):
        with contextlib.suppress(Exception):
            box.shutdown()
