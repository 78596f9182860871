"""The embedded backend started as root runs plugins as unprivileged accounts (a real core).

The core runs in a private mount namespace whose /etc/passwd and /etc/group are copies with the
test's accounts added, so no account is ever created on the host; there the interpreter's
directory is made reachable for those accounts too (a pyenv under /root is closed to them). The
state directory lies outside pytest's 0700 temporary directories, under /var/tmp, and is removed
afterwards. Every attempt one plugin makes against another runs as that plugin: a probe plugin
runs the commands the test drops into its directory and leaves their output beside them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .daemon import DaemonProcess, kill_plugins_under

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"
PROBE = """\
#!/bin/sh
# Runs probe/cmd (written by the test) and leaves out, err and rc (written last) beside it.
mkdir -p probe
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
INTERNAL_PROBE_MANIFEST = PROBE_MANIFEST.replace("external", "internal").replace(
    'LAUNCH = ["sh", "{root}/probe.sh"]', 'LAUNCH = "main"'
)


class PrivateDaemon(DaemonProcess):
    """The core as ``argv`` runs it (a private mount namespace), logged like DaemonProcess."""

    def __init__(self, config: Path, argv: list[str]) -> None:
        self.log_path = config.parent / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("running plugins as other users needs root, and CI must run it")
        pytest.skip("running plugins as other users needs root")
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give the core a private /etc/passwd")


class World:
    """A base directory under /var/tmp with a config, and accounts that exist only for the
    core started by ``start`` (in its private mount namespace)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="aigis-users-", dir="/var/tmp"))
        (self.base / "secrets").mkdir(0o750)  # as the packages make /etc/aigis/secrets
        self.config = self.base / "aigis.toml"
        self.state = self.base / "state"
        self.users: dict[str, int] = {}
        self.plugins: list[tuple[str, str, str]] = []  # (table, name, entry)
        self.settings = ""
        self.daemon: DaemonProcess | None = None
        taken = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines()}
        taken |= {int(line.split(":")[2]) for line in Path("/etc/group").read_text().splitlines()}
        self._next = 3_000_000 + secrets.randbelow(1_000_000) * 10
        while any(self._next + i in taken for i in range(10)):
            self._next += 10

    def user(self, name: str) -> int:
        """An account (and group) ``name`` in the core's /etc/passwd; its uid."""
        self.users[name] = self._next
        self._next += 1
        return self.users[name]

    def probe(self, name: str, user: str | None = None, internal: bool = False) -> None:
        """A plugin whose process is the probe; an internal one also gets its key."""
        root = self.base / "src" / name
        (root / "AIGIS").mkdir(parents=True)
        (root / "AIGIS" / "AIGIS.config").write_text(PROBE_MANIFEST)
        (root / "probe.sh").write_text(PROBE)
        if internal:
            (root / "AIGIS" / "AIGIS.config").write_text(INTERNAL_PROBE_MANIFEST)
            (root / "AIGIS" / "AIGIS.core").write_text(f"SKILLS = ['{name}_v']\n{name}_v = id\n")
            (root / "main.py").write_text(
                "import os\ndef launch():\n    os.execvp('sh', ['sh', 'probe.sh'])\n"
            )
        (self.base / "secrets" / name).mkdir(parents=True)
        (self.base / "secrets" / name / "token.secret").write_text(f"secret of {name}\n")
        self.probe_entry(name, user, "internal" if internal else "external")

    def probe_entry(self, name: str, user: str | None = None, table: str = "external") -> None:
        """List the probe ``name`` (made by ``probe``) in the config, run as ``user``."""
        extra = f', user = "{user}"' if user else ""
        self.plugins.append((table, name, f'{{ source = "src/{name}"{extra} }}'))

    def examples(self) -> None:
        shutil.copytree(EXAMPLES / "secrets", self.base / "secrets", dirs_exist_ok=True)
        for table, name in (("core", "dnd"), ("internal", "oracle"), ("external", "clock")):
            self.plugins.append((table, name, f'"{EXAMPLES / "plugins" / name}"'))

    def _etc(self) -> tuple[Path, Path]:
        passwd, group = self.base / "etc-passwd", self.base / "etc-group"
        lines = [f"{n}:x:{u}:{u}:test account:/nonexistent:/usr/sbin/nologin" for n, u in
                 self.users.items()]  # fmt: skip
        passwd.write_text(Path("/etc/passwd").read_text() + "\n".join(lines) + "\n")
        groups = [f"{n}:x:{u}:" for n, u in self.users.items()]
        group.write_text(Path("/etc/group").read_text() + "\n".join(groups) + "\n")
        return passwd, group

    def start(self) -> DaemonProcess:
        lines = ["[aigis]", 'state_dir = "state"', 'runtime_dir = "run"', 'supervisor = "embedded"']
        lines += ['secrets_dir = "secrets"', "stop_timeout = 5", self.settings]
        for table in ("core", "internal", "external"):
            lines.append(f"[{table}]")
            lines += [f'"{n}" = {e}' for t, n, e in self.plugins if t == table]
        self.config.write_text("\n".join(lines) + "\n")
        passwd, group = self._etc()
        script = [
            "set -e",
            f"mount --bind {passwd} /etc/passwd",
            f"mount --bind {group} /etc/group",
        ]
        # The interpreter's installation, reachable through closed directories (/root).
        prefix = Path(sys.base_prefix)
        closed = [p for p in (prefix, *prefix.parents) if not p.stat().st_mode & 0o001]
        if closed:
            hold = self.base / "interpreter"
            hold.mkdir(exist_ok=True)  # a second start of the same world
            script += [
                f"mount --bind {prefix} {hold}",
                f"mount -t tmpfs -o mode=0755,size=1m aigis-test {closed[-1]}",
                f"mkdir -p {prefix}",
                f"mount --move {hold} {prefix}",
            ]
        script.append(f'exec {sys.executable} -m aigis -c "$0"')
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
        self.daemon = PrivateDaemon(self.config, [*argv, "\n".join(script), str(self.config)])
        return self.daemon

    def attempt(self, plugin: str, command: str, timeout: float = 20) -> tuple[int, str]:
        """Run ``command`` (sh) as ``plugin``'s own process; (exit status, stdout + stderr)."""
        probe = self.state / "ext" / plugin / "probe"
        wait_until(probe.is_dir, timeout, f"{plugin}'s probe directory")
        (probe / "cmd.tmp").write_text(command + "\n")
        (probe / "cmd.tmp").rename(probe / "cmd")
        wait_until((probe / "rc").exists, timeout, f"{plugin} to run {command!r}")
        code = int((probe / "rc").read_text())
        output = (probe / "out").read_text() + (probe / "err").read_text()
        (probe / "rc").unlink()
        return code, output

    def ids(self, pid: int) -> tuple[list[int], list[int], list[int]]:
        """(uids, gids, supplementary groups) of ``pid``."""
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":\t" in line
        )
        groups = [int(g) for g in status.get("Groups", "").split()]
        return (
            [int(u) for u in status["Uid"].split()],
            [int(g) for g in status["Gid"].split()],
            groups,
        )

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        kill_plugins_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def world(root_only):
    made = World()
    yield made
    made.close()


def uids_of_processes_under(directory: Path) -> dict[int, int]:
    """pid -> real uid of every process whose AIGIS_PLUGIN_DIR lies under ``directory``."""
    marker = f"AIGIS_PLUGIN_DIR={directory}/".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "status").stat().st_uid
        except OSError:
            continue
    return found


def test_plugins_with_distinct_users_cannot_read_or_signal_each_other(world: World) -> None:
    alpha_uid, beta_uid = world.user("aigis-ta"), world.user("aigis-tb")
    world.probe("alpha", "aigis-ta")
    world.probe("beta", "aigis-tb")
    world.start().wait_for("ready: ", timeout=60)
    beta_dir = world.state / "ext" / "beta"
    code, out = world.attempt("alpha", "cat secrets/token.secret; echo $PPID")
    assert code == 0 and out.startswith("secret of alpha\n"), out
    alpha_pid = int(out.split()[-1])
    code, out = world.attempt("beta", "echo $PPID")
    beta_pid = int(out.split()[-1])
    # Each runs as its own account: every uid and gid, no supplementary group (root's none).
    assert world.ids(alpha_pid) == ([alpha_uid] * 4, [alpha_uid] * 4, [])
    assert world.ids(beta_pid) == ([beta_uid] * 4, [beta_uid] * 4, [])
    for command in (
        f"cat {beta_dir}/secrets/token.secret",
        f"ls {beta_dir}",
        f"cat {beta_dir}/probe.sh",
        f"ls {world.state}",
        f"ls {world.state}/ext",
        f"cat {world.state}/keys/beta.key",
        f"cat {world.state}/log/beta.log",
        f"cat {world.state}/snapshots/beta/probe.sh",
        f"ls {world.base}/secrets/beta",
        f"cat {world.state}/control.key",
    ):
        code, out = world.attempt("alpha", command)
        assert code != 0, f"alpha ran {command!r}: {out}"
        assert "secret of beta" not in out
    for sig in ("TERM", "KILL", "STOP", "0"):
        code, out = world.attempt("alpha", f"kill -s {sig} {beta_pid}")
        assert code != 0, f"alpha sent {sig} to beta: {out}"
    assert world.attempt("beta", "echo $PPID") == (0, f"{beta_pid}\n")  # beta lives on
    # Its copied secret is its own, read-only; its checkout's directory is root's, sticky.
    secret = (beta_dir / "secrets" / "token.secret").stat()
    assert (secret.st_uid, secret.st_mode & 0o777) == (beta_uid, 0o400)
    top = beta_dir.stat()
    assert (top.st_uid, top.st_gid, top.st_mode & 0o7777) == (0, beta_uid, 0o1770)
    # It cannot change what the core reads as root either (the manifest stays the core's).
    code, out = world.attempt("alpha", "echo x >> AIGIS/AIGIS.config")
    assert code != 0, out
    # A local user outside group aigis reads nothing under the state or runtime directories.
    for path in (world.state, world.state / "ext", world.base / "run", beta_dir):
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert other.returncode != 0 and "Permission denied" in other.stderr, path
    # Stopping still takes the whole tree down, even what left the process group as the plugin.
    code, out = world.attempt("alpha", "setsid sleep 1000 > /dev/null 2>&1 & echo left")
    assert (code, out) == (0, "left\n")
    wait_until(lambda: len(uids_of_processes_under(world.state)) >= 3, 10, "the escapee")
    assert set(uids_of_processes_under(world.state).values()) == {alpha_uid, beta_uid}
    assert world.daemon is not None and world.daemon.signal(signal.SIGTERM) == 0
    assert uids_of_processes_under(world.state) == {}


def test_the_default_account_runs_the_examples_and_stop_kills_every_process(
    world: World,
) -> None:
    uid = world.user("aigis-plugin")  # [aigis] plugin_user's default, as the packages create it
    world.examples()
    daemon = world.start()
    daemon.wait_for("ready: ", timeout=60)
    # The internal example calls a core skill over the socket with its own key; the external
    # one logs; both as the default account.
    log = daemon.wait_for("oracle: turn 0: rolled", timeout=60)
    assert "oracle: message of the day: The oracle reads this file" in log
    daemon.wait_for("clock: it is", timeout=30)
    running = uids_of_processes_under(world.state)
    assert len(running) >= 2 and set(running.values()) == {uid}, running
    key = (world.state / "keys" / "oracle.key").stat()
    assert (key.st_uid, key.st_mode & 0o777) == (uid, 0o400)
    assert daemon.signal(signal.SIGTERM) == 0
    assert uids_of_processes_under(world.state) == {}


def test_a_missing_account_fails_that_plugin_alone(world: World) -> None:
    world.user("aigis-ta")
    world.probe("alpha", "aigis-ta")
    world.probe("ghost", "aigis-nobody-has-this")
    log = world.start().wait_for("ready: ", timeout=60)
    assert (
        'failed: plugin "ghost": could not start: user "aigis-nobody-has-this" does not exist on '
        "this host"
    ) in log
    assert world.attempt("alpha", "id -u") == (0, f"{world.users['aigis-ta']}\n")


def test_the_packaged_settings_name_the_account_the_packages_create() -> None:
    sysusers = (REPO / "packaging" / "sysusers.d" / "aigis.conf").read_text()
    assert "\nu aigis-plugin " in sysusers
    assert 'plugin_user = "aigis-plugin"' in (REPO / "etc" / "aigis" / "aigis.toml").read_text()
    assert "useradd" in (REPO / "packaging" / "rpm" / "aigis.spec").read_text()


def test_a_plugin_rewriting_its_checkout_runs_nothing_as_root_on_reload(world: World) -> None:
    """The attack: the plugin rewrites the module its AIGIS.core imports, plants a module
    where its ENTRYPOINT would sit on the core's sys.path, and rewrites the script its
    requirements command runs; then the core reloads it (any reload: the plugin's own
    aigis.AIGISReload, aigisctl, SIGHUP). The core imports and runs its snapshot only."""
    uid = world.user("aigis-ta")
    root = world.base / "src" / "alpha"
    (root / "AIGIS").mkdir(parents=True)
    (root / "AIGIS" / "AIGIS.config").write_text(
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "main"\n'
        'REQUIREMENTS_COMMAND = "sh"\nREQUIREMENTS_FILE = "{root}/install.sh"\n'
    )
    (root / "AIGIS" / "AIGIS.core").write_text("from helper import value\nSKILLS = ['value']\n")
    (root / "helper.py").write_text("def value():\n    return 'from the source'\n")
    (root / "install.sh").write_text("true\n")
    (root / "probe.sh").write_text(PROBE)
    # An internal plugin whose process becomes the probe (as the plugin's account).
    (root / "main.py").write_text(
        "import os\ndef launch():\n    os.execvp('sh', ['sh', 'probe.sh'])\n"
    )
    world.plugins.append(("internal", "alpha", '{ source = "src/alpha", user = "aigis-ta" }'))
    world.start().wait_for("ready: ", timeout=60)
    assert world.attempt("alpha", "id -u") == (0, f"{uid}\n")
    marker = world.base / "ran-as-root"  # root may write there, the plugin may not
    evil = f"import os\nopen('{marker}', 'a').write('imported %d\\n' % os.getuid())\n"
    code, out = world.attempt(
        "alpha",
        f"printf '%s' \"{evil}def value(): return 'planted'\n\" > helper.py && "
        f"printf '%s' \"{evil}\" > csv.py && printf '%s' \"{evil}\" > json.py && "
        f"echo 'id -u >> {marker}' > install.sh && echo rewritten",
    )
    assert (code, out) == (0, "rewritten\n")
    assert not marker.exists()  # the plugin itself could not write it
    ctl = [sys.executable, "-m", "aigis._ctl", "-c", str(world.config)]
    done = subprocess.run([*ctl, "call", "AIGISReload", "alpha"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*ctl, "call", "value"], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "'from the source'"), done.stderr
    assert not marker.exists(), marker.read_text()


def test_a_plugin_moved_to_its_own_account_gets_a_new_key(world: World) -> None:
    """alpha and beta share an account, so beta can read alpha's key (as documented). The
    operator then gives alpha its own account: the key beta copied must open nothing."""
    world.user("aigis-ta")
    alpha_uid = world.user("aigis-tb")
    world.probe("alpha", "aigis-ta", internal=True)
    world.probe("beta", "aigis-ta", internal=True)
    daemon = world.start()
    daemon.wait_for("ready: ", timeout=60)
    key = world.state / "keys" / "alpha.key"
    print(
        subprocess.run(
            ["ls", "-la", "--", str(key.parent), str(world.state)], capture_output=True, text=True
        ).stdout,
        world.attempt("beta", "id; ls -la ../../keys"),
    )
    code, out = world.attempt("beta", f"od -An -tx1 {key} | tr -d ' \\n'")
    assert code == 0 and len(out) == 64, out
    copied = bytes.fromhex(out)
    assert copied == key.read_bytes()
    assert daemon.signal(signal.SIGTERM) == 0
    daemon.stop()  # its log
    world.plugins = [p for p in world.plugins if p[1] != "alpha"]
    world.probe_entry("alpha", "aigis-tb", "internal")
    world.start().wait_for("ready: ", timeout=60)
    assert world.attempt("alpha", "id -u") == (0, f"{alpha_uid}\n")
    held = key.stat()
    assert (held.st_uid, held.st_mode & 0o777) == (alpha_uid, 0o400)
    assert key.read_bytes() != copied
    code, out = world.attempt("beta", f"cat {key}")
    assert code != 0, out
    assert world.daemon is not None
    assert 'rotated: key of plugin "alpha" (' in world.daemon.log
    assert "; the plugin now runs as aigis-tb)" in world.daemon.log


def test_the_cores_git_credentials_do_not_reach_a_plugins_account(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variables naming the core's own credentials (README: for the core only) stay with the
    core; the rest of its environment still reaches the plugin."""
    world.user("aigis-ta")
    world.probe("alpha", "aigis-ta")
    monkeypatch.setenv("AIGIS_GIT_CREDENTIALS", str(world.base / "git-credentials"))
    monkeypatch.setenv("AIGIS_GIT_SSH_KEY", str(world.base / "id_ed25519"))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(world.base / "agent.sock"))
    monkeypatch.setenv("AIGIS_TEST_PLAIN", "kept")
    world.start().wait_for("ready: ", timeout=60)
    code, out = world.attempt("alpha", "env")
    assert code == 0, out
    names = {line.partition("=")[0] for line in out.splitlines()}
    assert "AIGIS_TEST_PLAIN=kept" in out.splitlines()
    assert not names & {"AIGIS_GIT_CREDENTIALS", "AIGIS_GIT_SSH_KEY", "SSH_AUTH_SOCK"}, out


ATTACK = """\
#!/bin/sh
# First run: swap the working directory for a link to a directory closed to this account,
# then exit to be started again. Second run: read from wherever the start put it.
if [ -L "$AIGIS_PLUGIN_DIR/work" ]; then
    cat f > "$AIGIS_PLUGIN_DIR/result" 2>&1
    exec sleep 1000
fi
rm -rf "$AIGIS_PLUGIN_DIR/work" && ln -s "{target}" "$AIGIS_PLUGIN_DIR/work"
exit 1
"""


def test_a_working_directory_swapped_for_a_link_is_entered_as_the_plugin(world: World) -> None:
    """The plugin's ENTRYPOINT lies inside its checkout, which it may rewrite: the start must
    enter it with the plugin's permissions, never root's (a link to a directory beneath one
    closed to the plugin would give it a way in)."""
    world.user("aigis-ta")
    closed = world.base / "closed"
    (closed / "open").mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "open" / "f").write_text("beneath a root-only directory\n")
    root = world.base / "src" / "alpha"
    (root / "AIGIS").mkdir(parents=True)
    (root / "work").mkdir()
    (root / "AIGIS" / "AIGIS.config").write_text(
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}/work"\nLAUNCH = ["sh", "{root}/a.sh"]\n'
        "RESTART = 3\n"
    )
    (root / "a.sh").write_text(ATTACK.format(target=closed / "open"))
    world.plugins.append(("external", "alpha", '{ source = "src/alpha", user = "aigis-ta" }'))
    daemon = world.start()
    daemon.wait_for("ready: ", timeout=60)
    plugin_dir = world.state / "ext" / "alpha"
    wait_until(lambda: (plugin_dir / "work").is_symlink(), 30, "the plugin to plant its link")
    wait_until(
        lambda: (plugin_dir / "result").exists() or daemon.log.count('exited: "alpha"') >= 2,
        60,
        "the plugin's second start",
    )
    assert not (plugin_dir / "result").exists(), (plugin_dir / "result").read_text()
    log = (world.state / "log" / "alpha.log").read_text()
    assert "work" in log and ("can't cd" in log or "Permission denied" in log), log
