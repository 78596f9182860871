"""Every plugin unit runs as its own unprivileged account, sandboxed (a real aigis.service in a
box): what one plugin tries against another is refused, from inside its own unit.

A "probe" plugin runs each command the test drops into its directory, as itself, inside its
sandbox, and leaves the output and exit status beside it: the attempts are made by the plugin
unit's own processes, with its uid, capabilities, namespaces and syscall filter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigis._supervise.units import plugin_user

from .box import Box, wait_until
from .test_service import Aigis

pytestmark = pytest.mark.systemd

EXT = "/var/lib/aigis/ext"
PROBE = """\
#!/bin/sh
# Runs probe/cmd (written by the test) and leaves out, err and rc (written last) beside it.
mkdir -p probe
echo "probe: ready as $(id -u)"
while :; do
    if [ -f probe/cmd ]; then
        sh probe/cmd > probe/out 2> probe/err
        echo $? > probe/rc.tmp
        rm -f probe/cmd
        mv probe/rc.tmp probe/rc
    fi
    sleep 0.05
done
"""
PROBE_MANIFEST = """\
PLUGIN_TYPE = "external"
ENTRYPOINT = "{root}"
LAUNCH = ["sh", "{root}/probe.sh"]
SECRETS = {"token.secret": "{root}/secrets/"}
"""


class Sandboxed(Aigis):
    """Aigis with per-plugin options in aigis.toml (``user``, ``sandbox``)."""

    def __init__(self, box: Box) -> None:
        super().__init__(box)
        self.options: dict[str, str] = {}

    def probe(self, name: str, options: str = "") -> None:
        """A probe plugin with its own secret ``token.secret`` (text: ``secret of NAME``)."""
        self.plugin(name, "external", PROBE_MANIFEST, {"probe.sh": PROBE})
        secrets = self.dir / "secrets" / name
        secrets.mkdir(parents=True)
        (secrets / "token.secret").write_text(f"secret of {name}\n")
        if options:
            self.options[name] = options

    def write_config(self, settings: str = "") -> None:
        lines = ["[aigis]", 'secrets_dir = "secrets"', "restart_delay = 0.2", settings]
        for table in ("core", "internal", "external"):
            lines.append(f"[{table}]")
            for name, (t, src) in self.plugins.items():
                if t != table:
                    continue
                extra = f", {self.options[name]}" if name in self.options else ""
                lines.append(f'"{name}" = {{ source = "{src}"{extra} }}')
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_config()
        self.box.systemctl("start", "aigis")

    def attempt(self, plugin: str, command: str, timeout: float = 10) -> tuple[int, str]:
        """Run ``command`` (sh) inside ``plugin``'s unit; (exit status, stdout + stderr)."""
        probe = self.box.host_path(f"{EXT}/{plugin}/probe")
        wait_until(probe.is_dir, timeout, f"{plugin}'s probe directory")
        (probe / "cmd.tmp").write_text(command + "\n")
        (probe / "cmd.tmp").rename(probe / "cmd")
        wait_until((probe / "rc").exists, timeout, f"{plugin} to run {command!r}")
        code = int((probe / "rc").read_text())
        output = (probe / "out").read_text() + (probe / "err").read_text()
        (probe / "rc").unlink()
        return code, output

    def proc_status(self, unit: str) -> dict[str, str]:
        """/proc/PID/status of the unit's main process, as a dict."""
        text = self.box.host_path(f"/proc/{self.main_pid(unit)}/status").read_text()
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.fixture
def aigis(box: Box) -> Sandboxed:
    return Sandboxed(box)


def test_a_plugin_cannot_read_another_plugins_secret_or_checkout(aigis: Sandboxed) -> None:
    aigis.probe("alpha")
    aigis.probe("beta")
    aigis.start()
    beta = f"{EXT}/beta"
    # Its own secret: readable by it, by nobody else (0400, its own account).
    code, out = aigis.attempt("alpha", "cat secrets/token.secret")
    assert (code, out) == (0, "secret of alpha\n")
    for command in (
        f"cat {beta}/secrets/token.secret",
        f"ls {beta}",
        f"cat {beta}/probe.sh",
        "cat /var/lib/aigis/authkey",
        "cat /var/lib/aigis/control.key",
        f"ls {aigis.dir}/secrets/beta",  # the operator's secrets directory
    ):
        code, out = aigis.attempt("alpha", command)
        assert code != 0, f"alpha ran {command!r}: {out}"
        assert "secret of beta" not in out
    # The state directory is an empty tmpfs but for alpha's own checkout.
    assert aigis.attempt("alpha", f"ls -A /var/lib/aigis {EXT}") == (
        0,
        "/var/lib/aigis:\next\n\n/var/lib/aigis/ext:\nalpha\n",
    )
    # The files themselves refuse alpha's account too, not only its mount namespace.
    alpha_uid = aigis.proc_status("aigis-plugin@alpha")["Uid"].split()[0]
    outside = aigis.box.run(
        "setpriv", f"--reuid={alpha_uid}", f"--regid={alpha_uid}", "--clear-groups",
        "cat", f"{beta}/secrets/token.secret", check=False,
    )  # fmt: skip
    assert outside.returncode != 0 and "Permission denied" in outside.stderr
    secret = aigis.box.host_path(f"{beta}/secrets/token.secret").stat()
    beta_uid = int(aigis.proc_status("aigis-plugin@beta")["Uid"].split()[0])
    assert (secret.st_uid, secret.st_mode & 0o777) == (beta_uid, 0o400)


def test_a_plugin_cannot_signal_another_plugins_processes(aigis: Sandboxed) -> None:
    aigis.probe("alpha")
    aigis.probe("beta")
    aigis.start()
    beta = aigis.main_pid("aigis-plugin@beta")
    for signal in ("TERM", "KILL", "STOP", "0"):
        code, out = aigis.attempt("alpha", f"kill -s {signal} {beta}")
        assert code != 0, f"alpha sent {signal} to beta: {out}"
    # Nor can they meet in shared memory: each has its own /dev/shm.
    code, out = aigis.attempt("beta", "echo beta > /dev/shm/note && chmod 644 /dev/shm/note")
    assert code == 0, out
    code, out = aigis.attempt("alpha", "cat /dev/shm/note")
    assert code != 0 and "beta" not in out
    # ProtectProc=invisible: alpha does not even see beta's process.
    code, out = aigis.attempt("alpha", f"cat /proc/{beta}/cmdline")
    assert code != 0
    assert aigis.main_pid("aigis-plugin@beta") == beta
    assert aigis.prop("aigis-plugin@beta.service", "ActiveState") == "active"
    assert aigis.prop("aigis-plugin@beta.service", "NRestarts") == "0"


def test_a_plugin_runs_unprivileged_without_capabilities(aigis: Sandboxed) -> None:
    aigis.probe("alpha")
    aigis.probe("beta")
    aigis.probe("dot.ted")  # no dots in user names: aigis_dot_ted_<hash>
    aigis.start()
    uids = set()
    for name in ("alpha", "beta", "dot.ted"):
        status = aigis.proc_status(f"aigis-plugin@{name}")
        uid = status["Uid"].split()
        assert len(set(uid)) == 1 and uid[0] != "0", status["Uid"]  # real, effective, saved, fs
        uids.add(uid[0])
        assert status["NoNewPrivs"] == "1"
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, f"{caps}: {status[caps]}"
        assert status["Seccomp"] == "2"  # a syscall filter is installed
        assert aigis.prop(f"aigis-plugin@{name}.service", "User") == plugin_user(name)
    assert len(uids) == 3  # one account each
    assert plugin_user("dot.ted").startswith("aigis_dot_ted_")
    code, out = aigis.attempt("alpha", "id -u; id -G")
    assert code == 0
    assert "0" not in out.split()


def test_writes_outside_its_own_directory_and_tmp_fail(aigis: Sandboxed) -> None:
    aigis.probe("alpha")
    aigis.start()
    for allowed in ("own-file", "probe/nested", "/tmp/alpha-tmp", "/var/tmp/alpha-tmp"):
        code, out = aigis.attempt("alpha", f"echo x > {allowed} && cat {allowed}")
        assert (code, out) == (0, "x\n"), allowed
    # HOME is its own directory: caches under ~ (pip, matplotlib, ...) keep working.
    code, out = aigis.attempt("alpha", 'mkdir -p ~/.cache/x && echo "$HOME"')
    assert (code, out) == (0, f"{EXT}/alpha\n")
    # /tmp is its own: nothing reached the host's (or the box's) /tmp.
    assert not Path("/tmp/alpha-tmp").exists()
    for target in (
        "/etc/alpha",
        "/var/lib/alpha",
        "/var/lib/aigis/alpha",
        "/usr/alpha",
        "/root/alpha",
        "/run/alpha",
        "/run/aigis/alpha",
        "/alpha",
        f"{aigis.dir}/alpha",
        "AIGIS/alpha",  # its manifest stays the core's
    ):
        code, out = aigis.attempt("alpha", f"echo x > {target}")
        assert code != 0, f"alpha wrote {target}"
        assert not aigis.box.host_path(target if target.startswith("/") else "/x").exists()
    # It cannot replace the manifest the core reads either (sticky directory, owned by root).
    code, out = aigis.attempt("alpha", "mv AIGIS AIGIS.old || rm -rf AIGIS")
    assert code != 0
    assert aigis.box.host_path(f"{EXT}/alpha/AIGIS/AIGIS.config").is_file()
    # No privilege to regain: setuid programs do not raise it, nor do namespaces.
    for command in ("su -c true root </dev/null", "unshare -U true", "chown root own-file"):
        code, out = aigis.attempt("alpha", command)
        assert code != 0, f"alpha ran {command!r}: {out}"


def test_the_examples_still_work_sandboxed(aigis: Sandboxed) -> None:
    aigis.examples()
    aigis.start()
    assert aigis.prop("aigis.service", "StatusText") == "1 loaded, 2 running"
    oracle = aigis.proc_status("aigis-plugin@oracle")
    assert oracle["Uid"].split()[0] != "0" and int(oracle["CapEff"], 16) == 0
    # oracle reads its secret, then calls aigis.dnd.roll in the core (over the socket, with the
    # authkey it gets as a systemd credential); the core logs every roll it serves.
    wait_until(
        lambda: "oracle: turn 0: rolled" in aigis.box.journal("aigis-plugin@oracle"),
        20,
        "oracle's first roll",
    )
    log = aigis.box.journal("aigis-plugin@oracle")
    assert "message of the day: The oracle reads this file" in log
    fields = [
        json.loads(line)
        for line in aigis.box.journal(None, "AIGIS_PLUGIN=dnd", "-o", "json").splitlines()
    ]
    assert any("rolled a d20" in f.get("MESSAGE", "") for f in fields)
    wait_until(lambda: "clock: it is" in aigis.box.journal("aigis-plugin@clock"), 10, "clock")
    rows = aigis.status()
    assert rows["oracle"]["state"] == rows["clock"]["state"] == "running"


def test_a_plugin_keeps_its_files_writable_across_core_restarts(aigis: Sandboxed) -> None:
    counter = """\
        PLUGIN_TYPE = "internal"
        ENTRYPOINT = "{root}"
        LAUNCH = "main"
        RESTART = 3
        """
    from .test_service import COUNTER

    aigis.examples()
    aigis.plugin("counter", "internal", counter, {"main.py": COUNTER})
    aigis.start()
    calls = aigis.box.host_path(f"{EXT}/counter/calls.log")
    wait_until(lambda: calls.exists() and calls.read_text().count("\n") >= 2, 20, "calls")
    pid = aigis.main_pid("aigis-plugin@counter")
    aigis.box.run("kill", "-9", str(aigis.main_pid("aigis.service")))  # crash: adopted
    aigis.wait_prop("aigis.service", "NRestarts", "1", timeout=20)
    aigis.wait_prop("aigis.service", "ActiveState", "active")
    assert aigis.main_pid("aigis-plugin@counter") == pid
    seen = calls.read_text().count("\n")
    wait_until(lambda: calls.read_text().count("\n") > seen + 2, 20, "calls after the crash")
    aigis.box.systemctl("restart", "aigis-plugin@counter")  # a new process, same account
    seen = calls.read_text().count("\n")
    wait_until(lambda: calls.read_text().count("\n") > seen + 2, 20, "calls after a restart")
    assert calls.stat().st_uid == int(aigis.proc_status("aigis-plugin@counter")["Uid"].split()[0])


def test_the_operator_grants_root_or_no_sandbox_per_plugin(aigis: Sandboxed) -> None:
    aigis.probe("boss", 'user = "root", sandbox = false')
    aigis.probe("rooted", 'user = "root"')
    aigis.probe("loose", "sandbox = false")
    aigis.start()
    boss = aigis.proc_status("aigis-plugin@boss")
    assert boss["Uid"].split()[0] == "0" and int(boss["CapEff"], 16) != 0
    assert boss["NoNewPrivs"] == "0"
    rooted = aigis.proc_status("aigis-plugin@rooted")  # root, but still in the sandbox
    assert rooted["Uid"].split()[0] == "0" and int(rooted["CapEff"], 16) == 0
    code, _ = aigis.attempt("rooted", "echo x > /etc/rooted")
    assert code != 0
    loose = aigis.proc_status("aigis-plugin@loose")  # its own account, no sandbox
    assert loose["Uid"].split()[0] != "0" and loose["NoNewPrivs"] == "0"
    code, out = aigis.attempt("loose", "cat /var/lib/aigis/ext/boss/secrets/token.secret")
    assert code != 0 and "Permission denied" in out  # file permissions still hold


def test_systemd_analyze_security(aigis: Sandboxed) -> None:
    aigis.examples()
    aigis.start()
    # Scored as shipped: without the test-only drop-in that shows plugins this venv's interpreter.
    test_python = "/etc/systemd/system/aigis-plugin@.service.d/60-test-python.conf"
    aigis.box.run("rm", "-f", test_python)
    aigis.box.systemctl("daemon-reload")
    report = {}
    for unit in ("aigis-plugin@oracle.service", "aigis-plugin@clock.service", "aigis.service"):
        out = aigis.box.run("systemd-analyze", "security", "--no-pager", unit, check=False)
        last = out.stdout.strip().splitlines()[-1]
        report[unit] = last
        print(f"\n{unit}: {last}\n{out.stdout}")
    for unit in ("aigis-plugin@oracle.service", "aigis-plugin@clock.service"):
        exposure = float(report[unit].split("exposure level for")[1].split(":")[1].split()[0])
        assert exposure <= 2.5, report[unit]


def test_a_plugin_rewriting_its_checkout_runs_nothing_in_the_core(aigis: Sandboxed) -> None:
    """From inside its unit, a plugin rewrites the module its AIGIS.core imports, plants modules
    where its ENTRYPOINT would sit on the core's sys.path and rewrites its requirements script,
    then a reload happens: the root core imports and runs only its snapshot of the source."""
    manifest = """\
        PLUGIN_TYPE = "internal"
        ENTRYPOINT = "{root}"
        LAUNCH = "main"
        REQUIREMENTS_COMMAND = "sh"
        REQUIREMENTS_FILE = "{root}/install.sh"
        """
    aigis.plugin(
        "alpha",
        "internal",
        manifest,
        {
            "probe.sh": PROBE,
            "helper.py": "def value():\n    return 'from the source'\n",
            "install.sh": "true\n",
            # Its process becomes the probe once the runner told systemd it is ready.
            "main.py": "import os\ndef launch():\n    os.execvp('sh', ['sh', 'probe.sh'])\n",
        },
    )
    core = aigis.dir / "plugins" / "alpha" / "AIGIS" / "AIGIS.core"
    core.write_text("from helper import value\nSKILLS = ['value']\n")
    aigis.start()
    marker = "/var/lib/aigis/ran-in-the-core"  # the core may write there, the plugin may not
    evil = f"import os\nopen('{marker}', 'a').write('imported %d\\n' % os.getuid())\n"
    code, out = aigis.attempt(
        "alpha",
        f"printf '%s' \"{evil}def value(): return 'planted'\n\" > helper.py && "
        f"printf '%s' \"{evil}\" > csv.py && printf '%s' \"{evil}\" > json.py && "
        f"echo 'id -u >> {marker}' > install.sh && echo rewritten",
    )
    assert (code, out) == (0, "rewritten\n")
    code, _, err = aigis.ctl("call", "AIGISReload", "alpha")
    assert code == 0, err
    code, out, err = aigis.ctl("call", "value")
    assert (code, out.strip()) == (0, "'from the source'"), err
    assert not aigis.box.host_path(marker).exists()
