"""End to end: build the Debian package, install it into a real systemd, run AIGIS, purge it.

The package is built once per session with ``packaging/build.sh deb`` (or taken from
``$AIGIS_TEST_DEB``) and installed with ``apt-get`` into a box whose /etc, /var **and /usr** are
overlays (``Box.boot(overlay_usr=True)``): dpkg, apt and the maintainer scripts change nothing on
the host. Dependencies come from Debian: already-installed ones are visible through the overlays'
lower layers, missing ones are downloaded inside the box (it shares the host's network).

The tests in this module share one installed box and run in file order: checks of the running
core first, then ``systemctl reload``, then stop and purge (keep that one last). To check more of
the running daemon, add a test next to the others and use the ``aigis`` fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .box import Box, wait_until
from .host import BOX_ENV

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = str(ROOT / "packaging" / "build.sh")
_VERSION_PY = (ROOT / "aigis" / "_version.py").read_text()
VERSION = re.search(r'__version__ = "([^"]+)"', _VERSION_PY).group(1)
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "pybuild")
#: Inside the box: the example plugins and the config that lists them.
PLUGINS = "/var/lib/aigis-test/plugins"
CONFIG = f"""\
# Written by tests/systemd/test_deb.py: the example plugins, copied from {ROOT}/examples.
[core]
dnd = "{PLUGINS}/dnd"

[internal]
oracle = "{PLUGINS}/oracle"

[external]
clock = "{PLUGINS}/clock"
"""
APT_ENV = ("env", "DEBIAN_FRONTEND=noninteractive", "TMPDIR=/var/tmp")  # /tmp is the host's


def _versions() -> list[str]:
    """The version of aigis/_version.py, its Debian and its RPM spelling, as build.sh makes them."""
    out = subprocess.run([BUILD_SH, "version"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _missing(reason: str) -> None:
    """Skip, or fail under CI, where the packaging tools must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI must run this test", pytrace=False)
    pytest.skip(reason)


@dataclass
class Installed:
    """The box with AIGIS installed from the package, and what happened on the way."""

    box: Box
    deb: Path
    timings: dict[str, float] = field(default_factory=dict)
    #: State of aigis.service right after `apt-get install` (the postinst starts it).
    state_after_install: str = ""

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        out = self.box.run(*cmd, check=False, timeout=timeout)
        if check and out.returncode:
            raise AssertionError(
                f"{shlex.join(cmd)} exited {out.returncode}\n{out.stdout}{out.stderr}\n"
                + self.box.journal("aigis.service", "-n", "40")
            )
        return out.stdout

    def status(self) -> dict[str, dict]:
        """``aigisctl status --json``, by plugin name."""
        return {row["name"]: row for row in json.loads(self.run("aigisctl", "status", "--json"))}

    def plugin_log(self, name: str) -> str:
        """What plugin ``name`` printed: ``journalctl -u aigis-plugin@NAME``."""
        return self.box.journal(f"aigis-plugin@{name}.service")

    def timed(self, what: str, *cmd: str, timeout: float = 300) -> str:
        started = time.monotonic()
        try:
            return self.run(*cmd, timeout=timeout)
        finally:
            self.timings[what] = round(time.monotonic() - started, 2)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def aigis_deb(_box_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb under test: ``$AIGIS_TEST_DEB``, else built from this checkout with
    ``packaging/build.sh deb``: on the host when it has the tools ('packaging/build.sh deps'),
    else in a box that installs them from Debian (``AIGIS_TEST_BUILD_IN_BOX=1`` forces that)."""
    if os.environ.get("AIGIS_TEST_DEB"):
        return Path(os.environ["AIGIS_TEST_DEB"]).absolute()
    work = tmp_path_factory.mktemp("deb-build")
    env = {"OUTDIR": str(work / "dist"), "BUILDDIR": str(work / "build"), "TMPDIR": "/var/tmp"}
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool, path=BOX_ENV["PATH"]) is None]
    started = time.monotonic()
    if missing or os.environ.get("AIGIS_TEST_BUILD_IN_BOX") == "1":
        box = Box.boot(work / "box", overlay_usr=True, timeout=60)
        try:
            setenv = ("env", *(f"{k}={v}" for k, v in env.items()))
            for step, timeout in (("deps", 900), ("deb", 600), ("lint", 300)):
                out = box.run(*setenv, BUILD_SH, step, check=False, timeout=timeout)
                (work / f"{step}.log").write_text(out.stdout + out.stderr)
                if step == "lint":
                    (work / "lintian.txt").write_text(out.stdout + out.stderr)
                else:
                    assert out.returncode == 0, f"in-box build.sh {step}:\n{out.stdout}{out.stderr}"
        finally:
            box.shutdown()
    else:
        build = subprocess.run(
            [BUILD_SH, "deb"],
            env={**BOX_ENV, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        (work / "build.log").write_text(build.stdout + build.stderr)
        assert build.returncode == 0, f"build.sh deb failed:\n{build.stdout}{build.stderr}"
    (deb,) = (work / "dist").glob("aigis_*_all.deb")
    (work / "seconds").write_text(f"{time.monotonic() - started:.2f}\n")
    return deb


@pytest.fixture(scope="module")
def aigis(
    _box_session: None, aigis_deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """A box with the package installed and the example plugins running."""
    host_before = _host_snapshot()
    box = Box.boot(tmp_path_factory.mktemp("deb-box"), overlay_usr=True, timeout=60)
    installed = Installed(box, aigis_deb)
    build_seconds = aigis_deb.parent.parent / "seconds"
    if build_seconds.exists():
        installed.timings["build .deb"] = float(build_seconds.read_text())
    installed.timings["boot box"] = round(box.boot_seconds, 2)
    try:
        _install(installed)
        _configure_examples(installed)
        yield installed
    finally:
        try:
            with contextlib.suppress(Exception):
                journal = box.journal(None, "-o", "short-monotonic")
                (box.workdir / "journal.txt").write_text(journal)
            (box.workdir / "timings.json").write_text(json.dumps(installed.timings, indent=2))
            print(f"\ntest_deb timings (s): {installed.timings}")
        finally:
            box.shutdown()
        assert _host_snapshot() == host_before, "installing in the box changed the host"


def _host_snapshot() -> dict[str, object]:
    """What a leaking install would change on the host."""
    dpkg = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "aigis"], capture_output=True, text=True
    )
    group = subprocess.run(["getent", "group", "aigis"], capture_output=True, text=True)
    return {
        "dpkg": dpkg.stdout,
        "group": group.stdout,
        **{p: os.path.lexists(p) for p in ("/usr/bin/aigis", "/etc/aigis", "/var/lib/aigis")},
        "unit": os.path.lexists("/lib/systemd/system/aigis.service"),
    }


def _install(aigis: Installed) -> None:
    box = aigis.box
    # Debian's container images ship a policy-rc.d that forbids starting services from
    # maintainer scripts; a real system has none. Removed in the box's /usr overlay only.
    box.run("rm", "-f", "/usr/sbin/policy-rc.d")
    # man-db's trigger rebuilds the whole man index on every install and purge: seconds, for
    # nothing here (in the box's /var only).
    box.run("rm", "-f", "/var/lib/man-db/auto-update")
    # Dependencies first, from Debian, so that the package's own postinst starts a core that can
    # run (and so that _work_around_pygit2 can check them before that).
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(aigis.deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    names = sorted({d.split()[0].split(":")[0] for d in depends.replace("|", ",").split(",")})
    names = [n for n in names if n and not n.startswith("$")]
    _apt_install(aigis, "install dependencies", names)
    aigis.timed("install .deb", *APT_ENV, "apt-get", "install", "-y", "-q", str(aigis.deb))
    aigis.state_after_install = box.unit_property("aigis.service", "ActiveState")


def _apt_install(aigis: Installed, what: str, packages: list[str]) -> None:
    cmd = (*APT_ENV, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages)
    out = aigis.box.run(*cmd, check=False, timeout=600)
    if out.returncode:  # the host's package lists may be missing or stale: refresh in the box
        aigis.timed("apt-get update", *APT_ENV, "apt-get", "update", "-q", timeout=300)
    aigis.timed(what, *cmd, timeout=600)


def _configure_examples(aigis: Installed) -> None:
    """The example plugins in /var/lib/aigis-test, the oracle's secret in /etc/aigis/secrets, a
    config listing them as /etc/aigis/aigis.toml (the conffile), and a restart."""
    box = aigis.box
    shutil.copytree(ROOT / "examples" / "plugins", box.host_path(PLUGINS))
    secret = "/etc/aigis/secrets/oracle/motd.secret"
    box.write(secret, (ROOT / "examples" / "secrets" / "oracle" / "motd.secret").read_text())
    box.run("chmod", "0640", secret)
    box.run("chgrp", "-R", "aigis", "/etc/aigis/secrets/oracle")
    box.write("/etc/aigis/aigis.toml", CONFIG)
    aigis.timed("restart with examples", "systemctl", "restart", "aigis")

    def running() -> bool:
        try:
            plugins = aigis.status()
        except AssertionError:  # not answering yet
            return False
        return all(plugins.get(n, {}).get("state") == "running" for n in ("oracle", "clock"))

    started = time.monotonic()
    wait_until(running, 30, "oracle and clock to run", interval=0.2)
    aigis.timings["plugins running"] = round(time.monotonic() - started, 2)


# -- the package file ---------------------------------------------------------------------------
def test_lintian_reports_no_errors(aigis_deb: Path) -> None:
    saved = aigis_deb.parent.parent / "lintian.txt"  # from a build in a box
    if shutil.which("lintian", path=BOX_ENV["PATH"]):
        out = subprocess.run(
            ["lintian", "--fail-on", "error", str(aigis_deb)],
            capture_output=True,
            text=True,
            timeout=300,
            env=BOX_ENV,
        )
        report, failed = out.stdout + out.stderr, out.returncode != 0
    elif saved.exists():
        report = saved.read_text()
        failed = bool(re.search(r"^E: ", report, re.M))
    else:
        _missing("lintian is not installed ('packaging/build.sh deps')")
    errors = [line for line in report.splitlines() if line.startswith("E: ")]
    assert not failed and not errors, report


def test_man_pages_cover_every_option_and_command() -> None:
    """packaging/man/*.1 are generated from the parsers (packaging/build.sh man) and committed, so
    that building the package needs no working aigis; this catches pages left behind."""
    import argparse

    from aigis import _ctl, _daemon

    for prog, parser in (("aigis", _daemon.build_parser()), ("aigisctl", _ctl.build_parser())):
        page = (ROOT / "packaging" / "man" / f"{prog}.1").read_text().replace("\\-", "-")
        parsers = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    stale = f"{prog} {name}: run packaging/build.sh man"
                    assert f'.SS "{prog} {name}' in page, stale
                    parsers.append(sub)
        for p in parsers:
            for action in p._actions:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):
                        assert option in page, f"{p.prog} {option}: run packaging/build.sh man"


def test_rpm_builds_with_the_same_layout(tmp_path: Path) -> None:
    """packaging/rpm/aigis.spec builds with plain rpmbuild here (Debian's rpm package)."""
    if shutil.which("rpmbuild", path=BOX_ENV["PATH"]) is None:
        _missing("rpmbuild is not installed ('packaging/build.sh deps')")
    env = {**BOX_ENV, "OUTDIR": str(tmp_path / "dist"), "BUILDDIR": str(tmp_path / "build")}
    build = subprocess.run(
        [BUILD_SH, "rpm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (rpm,) = (tmp_path / "dist").glob("aigis-*.noarch.rpm")

    def query(*args: str) -> list[str]:
        out = subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True)
        return out.stdout.splitlines()

    versions = _versions()
    assert versions[0] == VERSION
    assert query("--qf", "%{VERSION}") == [versions[2]]
    files = query("-l")
    for path in (
        "/usr/bin/aigis",
        "/usr/bin/aigisctl",
        "/etc/aigis/aigis.toml",
        "/etc/aigis/secrets",
        "/usr/lib/systemd/system/aigis.service",
        "/usr/lib/systemd/system/aigis-plugin@.service",
        "/usr/lib/sysusers.d/aigis.conf",
        "/usr/lib/tmpfiles.d/aigis.conf",
        "/usr/share/bash-completion/completions/aigisctl",
        "/usr/share/zsh/site-functions/_aigisctl",
    ):
        assert path in files, path
    requires = {line.split()[0] for line in query("--requires")}
    deps = ("pygit2", "dill", "multiprocess", "sdnotify", "systemd", "jeepney", "cryptography")
    assert {f"python3-{d}" for d in deps} <= requires
    assert "/etc/aigis/aigis.toml" in query("-c")  # %config(noreplace)
    scripts = "\n".join(query("--scripts"))
    assert "preset aigis.service" in scripts and "disable --now aigis.service" in scripts


# -- the installed package --------------------------------------------------------------------
def test_files_permissions_and_group(aigis: Installed) -> None:
    listed = aigis.run("dpkg-query", "-L", "aigis").split()
    for path in (
        "/usr/bin/aigis",
        "/usr/bin/aigisctl",
        "/lib/systemd/system/aigis.service",
        "/lib/systemd/system/aigis-plugin@.service",
        "/usr/lib/sysusers.d/aigis.conf",
        "/usr/lib/tmpfiles.d/aigis.conf",
        "/usr/share/man/man1/aigis.1.gz",
        "/usr/share/man/man1/aigisctl.1.gz",
        "/usr/share/bash-completion/completions/aigisctl",
        "/usr/share/zsh/vendor-completions/_aigisctl",
        "/etc/aigis/secrets",
    ):
        assert path in listed, path
    assert aigis.run("dpkg-query", "-W", "-f=${Version}", "aigis") == _versions()[1]
    conffiles = aigis.run("dpkg-query", "-W", "-f=${Conffiles}", "aigis")
    assert "/etc/aigis/aigis.toml" in conffiles
    assert aigis.run("getent", "group", "aigis").startswith("aigis:x:")
    # The embedded supervisor's default plugin account: unprivileged, not in group aigis.
    account = aigis.run("getent", "passwd", "aigis-plugin").split(":")
    assert account[0] == "aigis-plugin" and int(account[2]) not in (0, 65534)
    assert "aigis-plugin" not in aigis.run("getent", "group", "aigis")
    modes = aigis.run("stat", "-c", "%a %U:%G %n", "/etc/aigis/secrets", "/var/lib/aigis")
    assert "750 root:aigis /etc/aigis/secrets" in modes
    assert "750 root:aigis /var/lib/aigis" in modes
    assert "aigis.service" in aigis.run("systemctl", "list-unit-files", "aigis*")


def test_postinst_started_the_core(aigis: Installed) -> None:
    assert aigis.state_after_install == "active"
    assert aigis.box.unit_property("aigis.service", "UnitFileState") == "enabled"


def test_core_is_active_with_the_example_plugins(aigis: Installed) -> None:
    assert aigis.run("systemctl", "is-active", "aigis").strip() == "active"
    journal = aigis.box.journal("aigis.service")
    assert 'loaded: plugin "dnd" (core)' in journal
    assert "ready:" in journal
    status = aigis.box.unit_property("aigis.service", "StatusText")
    assert status and "failed" not in status, status


def test_aigisctl_version(aigis: Installed) -> None:
    assert aigis.run("aigisctl", "--version").strip() == f"aigisctl {VERSION}"
    assert aigis.run("aigis", "--version").strip() == f"aigis {VERSION}"


def test_aigisctl_status(aigis: Installed) -> None:
    plugins = aigis.status()
    assert {n: p["type"] for n, p in plugins.items()} == {
        "dnd": "core",
        "oracle": "internal",
        "clock": "external",
    }
    assert plugins["dnd"]["state"] == "loaded"
    for name in ("oracle", "clock"):
        assert plugins[name]["state"] == "running"
        assert plugins[name]["pid"]


def test_plugin_output_reaches_the_journal(aigis: Installed) -> None:
    # The packaged service picks the systemd supervisor: each internal/external plugin is its own
    # aigis-plugin@NAME.service and its output is that unit's journal.
    assert "systemd supervisor" in aigis.box.journal("aigis.service")
    for name in ("oracle", "clock"):
        unit = f"aigis-plugin@{name}.service"
        assert aigis.box.unit_property(unit, "ActiveState") == "active", unit
    wait_until(lambda: "oracle: turn 0: rolled" in aigis.plugin_log("oracle"), 20, "oracle")
    assert "message of the day" in aigis.plugin_log("oracle")  # the secret was copied
    wait_until(lambda: "clock: it is" in aigis.plugin_log("clock"), 20, "clock output")


def test_packaged_plugins_run_as_their_own_accounts_sandboxed(aigis: Installed) -> None:
    # The package as shipped (/usr/bin/python3, no test drop-ins): each plugin unit runs as its
    # own account without capabilities, and scores "OK" in systemd-analyze security.
    for name in ("oracle", "clock"):
        unit = f"aigis-plugin@{name}.service"
        assert aigis.box.unit_property(unit, "User") == f"aigis-{name}"
        pid = aigis.box.unit_property(unit, "MainPID")
        status = aigis.box.host_path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] != "0" and fields["NoNewPrivs"] == "1"
        assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
        security = aigis.run("systemd-analyze", "security", "--no-pager", unit, check=False)
        verdict = security.strip().splitlines()[-1]
        print(f"\n{verdict}")
        assert float(verdict.split(":")[1].split()[0]) <= 2.5, verdict
    verdict = aigis.run("systemd-analyze", "security", "--no-pager", "aigis.service", check=False)
    print(verdict.strip().splitlines()[-1])


def test_aigisctl_call(aigis: Installed) -> None:
    assert 1 <= int(aigis.run("aigisctl", "call", "dnd.roll", "20")) <= 20


def as_user(aigis: Installed, user: str, *cmd: str):
    """``cmd`` run inside the box as ``user`` with its groups."""
    return aigis.box.run(
        *("setpriv", "--reuid", user, "--regid", user, "--init-groups", *cmd), check=False
    )


def test_aigis_group_member_can_operate_but_not_run_code_in_the_core(aigis: Installed) -> None:
    aigis.run("useradd", "--system", "--no-create-home", "--groups", "aigis", "aigis-test-user")
    out = as_user(aigis, "aigis-test-user", "aigisctl", "status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert {row["name"] for row in json.loads(out.stdout)} == {"dnd", "oracle", "clock"}
    restarted = as_user(aigis, "aigis-test-user", "aigisctl", "restart", "clock")
    assert restarted.returncode == 0 and restarted.stdout.startswith("clock: running"), restarted
    rolled = as_user(aigis, "aigis-test-user", "aigisctl", "call", "dnd.roll", "20")
    assert rolled.returncode == 0 and 1 <= int(rolled.stdout) <= 20, rolled
    # the full proxy (pickles) is root's: the authkey cannot be read, so no shell
    shell = as_user(aigis, "aigis-test-user", "cat", "/var/lib/aigis/authkey")
    assert shell.returncode != 0 and "Permission denied" in shell.stderr


def test_a_local_user_outside_the_group_reads_nothing_of_aigis(aigis: Installed) -> None:
    aigis.run("useradd", "--system", "--no-create-home", "aigis-stranger")
    for path in ("/var/lib/aigis", "/var/lib/aigis/ext/oracle", "/run/aigis", "/etc/aigis/secrets"):
        listed = as_user(aigis, "aigis-stranger", "ls", path)
        assert listed.returncode != 0 and "Permission denied" in listed.stderr, (path, listed)
    status = as_user(aigis, "aigis-stranger", "aigisctl", "status")
    assert status.returncode == 1 and "permission denied" in status.stderr, status


def test_reload_applies_a_config_change(aigis: Installed) -> None:
    before = aigis.status()
    main_pid = aigis.box.unit_property("aigis.service", "MainPID")
    aigis.box.write("/etc/aigis/aigis.toml", CONFIG.replace(f'clock = "{PLUGINS}/clock"', ""))
    aigis.timed("reload", "systemctl", "reload", "aigis")
    wait_until(lambda: "clock" not in aigis.status(), 20, "clock to be removed by the reload")
    after = aigis.status()
    assert aigis.run("systemctl", "is-active", "aigis").strip() == "active"
    assert aigis.box.unit_property("aigis.service", "MainPID") == main_pid
    assert after["oracle"]["pid"] == before["oracle"]["pid"], "reload restarted oracle"
    assert aigis.box.run("kill", "-0", str(before["clock"]["pid"]), check=False).returncode


def test_stop_and_purge(aigis: Installed) -> None:
    """Keep this test last: it removes the package from the shared box."""
    aigis.timed("stop", "systemctl", "stop", "aigis")
    assert aigis.box.unit_property("aigis.service", "ActiveState") == "inactive"
    leftovers = aigis.box.run("pgrep", "-af", "aigis|clock.sh", check=False).stdout
    assert not leftovers, f"still running after stop:\n{leftovers}"
    active = aigis.run("systemctl", "list-units", "--state=active", "--no-legend", "aigis*")
    assert not active.strip(), active

    aigis.timed("purge", *APT_ENV, "apt-get", "purge", "-y", "-q", "aigis")
    assert aigis.box.run("dpkg-query", "-W", "aigis", check=False).returncode
    for gone in ("/usr/bin/aigis", "/lib/systemd/system/aigis.service", "/var/lib/aigis"):
        assert not aigis.box.host_path(gone).exists(), gone
    # Purge removes the conffile, state and runtime dirs; the administrator's secrets stay
    # (and with them /etc/aigis/secrets and /etc/aigis), as dpkg keeps non-empty directories.
    left = aigis.run("find", "/etc/aigis", "-type", "f").split()
    assert left == ["/etc/aigis/secrets/oracle/motd.secret"]
    units = aigis.run("systemctl", "list-units", "--all", "--no-legend", "aigis*")
    assert not units.strip(), units
    dropins = aigis.run("find", "/run/systemd/system", "-name", "aigis-plugin@*")
    assert not dropins.strip(), f"the core's runtime drop-ins outlive the package:\n{dropins}"
    assert not aigis.box.host_path("/run/aigis").exists()
    assert not aigis.box.run("pgrep", "-af", "aigis", check=False).stdout


# -- the harness this module relies on ------------------------------------------------------------
def test_usr_overlay_keeps_package_installs_in_the_box(boot_box: Callable[..., Box]) -> None:
    box = boot_box(overlay_usr=True)
    assert box.run("findmnt", "-n", "-o", "FSTYPE", "/usr").stdout.strip() == "overlay"
    probe = f"/usr/share/aigis-box-probe-{os.getpid()}-{time.monotonic_ns()}"
    box.write(probe, "written in the box\n")
    box.run("rm", "/usr/sbin/policy-rc.d", check=False)  # a whiteout in the overlay only
    assert box.run("cat", probe).stdout == "written in the box\n"
    assert not Path(probe).exists(), "a write to the box's /usr reached the host"
    with pytest.raises(ValueError):
        box.write("/opt/aigis-probe", "x")  # not overlaid: would reach the host
    plain = boot_box()
    with pytest.raises(ValueError):
        plain.write("/usr/share/aigis-probe", "x")
