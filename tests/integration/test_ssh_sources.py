"""Git plugin sources over ssh:// against a real OpenSSH server on 127.0.0.1 (SPEC §2).

Each fetch runs in a child interpreter with HOME pointing at a temporary directory: libgit2 reads
~/.ssh/known_hosts from the HOME it saw when it was loaded, so the test process cannot redirect it,
and the real user's ~/.ssh is never read or written. The child also bounds every fetch in time.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pygit2
import pytest

pytestmark = pytest.mark.integration

SSHD = "/usr/sbin/sshd"
SIG = pygit2.Signature("Test", "test@example.org", 1_700_000_000, 0)
ROOT = Path(__file__).resolve().parents[2]
# The child interpreter: AIGIS_TEST_PYTHON=/usr/bin/python3 runs the fetches with Debian's pygit2.
CHILD_PYTHON = os.environ.get("AIGIS_TEST_PYTHON", sys.executable)
FETCH_TIMEOUT = 60  # seconds; a fetch that loops on authentication would hit this

# Runs fetch() in the child and prints one JSON line: the Fetched fields, or the SourceError.
CHILD = """
import json, sys
from pathlib import Path
from aigis._errors import SourceError
from aigis._sources import fetch
name, url, dest = sys.argv[1:4]
try:
    got = fetch(name, url, Path(dest), base_dir=Path(dest).parent)
except SourceError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"commit": got.commit, "updated": got.updated, "kind": got.kind}))
"""


def _unavailable(why: str) -> None:
    """Skip, except under CI=true where a missing sshd must not hide the test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"ssh source tests cannot run under CI: {why}")
    pytest.skip(why)


def _keygen(path: Path) -> Path:
    """Create an unencrypted ed25519 key pair at path (and path.pub)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """An sshd on 127.0.0.1 accepting one client key, with its own host key."""

    def __init__(self, base: Path) -> None:
        for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("git-upload-pack")):
            if tool is None or not os.access(tool, os.X_OK):
                _unavailable(
                    f"{tool or 'ssh-keygen/git-upload-pack'} missing (apt-get install "
                    "openssh-server openssh-client git)"
                )
        base.mkdir()
        self.base = base
        self.host_key = _keygen(base / "host_ed25519")
        self.client_key = _keygen(base / "client_ed25519")
        authorized = base / "authorized_keys"
        authorized.write_text((base / "client_ed25519.pub").read_text())
        self.port = _free_port()
        config = base / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile none\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"PubkeyAuthentication yes\n"
            f"PasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\n"
            f"PermitRootLogin prohibit-password\n"
            f"StrictModes no\n"
            f"UsePAM no\n"
            f"LogLevel VERBOSE\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        self.log = base / "sshd.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_listening(deadline=time.monotonic() + 15)

    def _wait_listening(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _unavailable(f"sshd exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        _unavailable(f"sshd did not listen on 127.0.0.1:{self.port}: {self.log.read_text()}")

    def known_hosts_line(self) -> str:
        """The known_hosts entry for this server (non-default port: [host]:port)."""
        kind, key = (self.base / "host_ed25519.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def url(self, path: Path) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    server = Sshd(tmp_path_factory.mktemp("ssh") / "sshd")
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path: Path, sshd: Sshd) -> Path:
    """A HOME whose ~/.ssh/known_hosts trusts the test server (and holds nothing else)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line())
    return home


@pytest.fixture
def upstream(tmp_path: Path) -> pygit2.Repository:
    repo = pygit2.init_repository(tmp_path / "up.git", bare=True, initial_head="master")
    commit(repo, "one")
    return repo


def commit(repo: pygit2.Repository, text: str) -> str:
    """Commit VERSION=text on master after its tip."""
    ref = "refs/heads/master"
    parents = [repo.references[ref].target] if ref in repo.references else []
    tree = repo.TreeBuilder()
    tree.insert("VERSION", repo.create_blob(text.encode()), pygit2.GIT_FILEMODE_BLOB)
    oid = repo.create_commit(None, SIG, SIG, text, tree.write(), parents)
    repo.references.create(ref, oid, force=True)
    return str(oid)


def run_fetch(
    url: str, dest: Path, home: Path, key: Path | None, agent: Path | None = None
) -> dict:
    """fetch("plug", url, dest) in a child: HOME, AIGIS_GIT_SSH_KEY and SSH_AUTH_SOCK as given."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "AIGIS_GIT_SSH_KEY")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    if agent is not None:
        env["SSH_AUTH_SOCK"] = str(agent)
    if key is not None:
        env["AIGIS_GIT_SSH_KEY"] = str(key)
    try:
        out = subprocess.run(
            [CHILD_PYTHON, "-c", CHILD, "plug", url, str(dest)],
            env=env,
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"fetch of {url} did not finish within {FETCH_TIMEOUT}s")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_clone_then_fast_forward_over_ssh(sshd, home, upstream, tmp_path) -> None:
    dest = tmp_path / "state" / "ext" / "plug"
    url = sshd.url(Path(upstream.path))
    got = run_fetch(url, dest, home, sshd.client_key)
    assert got == {"commit": str(upstream.head.target), "updated": True, "kind": "git"}, got
    assert (dest / "VERSION").read_text() == "one"

    two = commit(upstream, "two")
    got = run_fetch(url, dest, home, sshd.client_key)
    assert got == {"commit": two, "updated": True, "kind": "git"}, got
    assert (dest / "VERSION").read_text() == "two"

    got = run_fetch(url, dest, home, sshd.client_key)
    assert got == {"commit": two, "updated": False, "kind": "git"}, got

    commit(upstream, "three")  # a refused key on update: a warning, the checkout stays
    got = run_fetch(url, dest, home, _keygen(tmp_path / "wrong_ed25519"))
    assert got == {"commit": two, "updated": False, "kind": "git"}, got
    assert (dest / "VERSION").read_text() == "two"
    assert (home / ".ssh" / "known_hosts").read_text() == sshd.known_hosts_line()


def test_default_key_in_home_is_used(sshd, home, upstream, tmp_path) -> None:
    shutil.copy(sshd.client_key, home / ".ssh" / "id_ed25519")
    shutil.copy(f"{sshd.client_key}.pub", home / ".ssh" / "id_ed25519.pub")
    dest = tmp_path / "ext" / "plug"
    got = run_fetch(sshd.url(Path(upstream.path)), dest, home, None)
    assert got["commit"] == str(upstream.head.target), got


def test_user_from_the_environment_when_the_url_has_none(sshd, home, upstream, tmp_path) -> None:
    url = sshd.url(Path(upstream.path)).replace(f"{getpass.getuser()}@", "")
    got = run_fetch(url, tmp_path / "ext" / "plug", home, sshd.client_key)
    assert got["commit"] == str(upstream.head.target), got


def test_ssh_agent(sshd, home, upstream, tmp_path) -> None:
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        _unavailable("ssh-agent/ssh-add missing (apt-get install openssh-client)")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True, timeout=10)
        got = run_fetch(sshd.url(Path(upstream.path)), tmp_path / "ext" / "plug", home, None, sock)
        assert got["commit"] == str(upstream.head.target), got
        # An agent without the right key: named in the error, tried once.
        subprocess.run(["ssh-add", "-q", "-D"], env=env, check=True, timeout=10)
        got = run_fetch(sshd.url(Path(upstream.path)), tmp_path / "ext" / "p2", home, None, sock)
        assert f"failed with the ssh-agent at {sock}" in got.get("error", ""), got
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_wrong_key_fails_cleanly(sshd, home, upstream, tmp_path) -> None:
    wrong = _keygen(tmp_path / "wrong_ed25519")
    dest = tmp_path / "state" / "ext" / "plug"
    url = sshd.url(Path(upstream.path))
    got = run_fetch(url, dest, home, wrong)
    assert "error" in got, got
    assert got["error"] == (
        f'plugin "plug": clone of {url} failed: ssh authentication as {getpass.getuser()} '
        f"failed with key {wrong} ($AIGIS_GIT_SSH_KEY)"
    ), got
    assert not dest.exists()
    assert os.listdir(dest.parent) == []  # no staging directory left behind


def test_no_key_at_all_is_explained(sshd, home, upstream, tmp_path) -> None:
    dest = tmp_path / "ext" / "plug"
    got = run_fetch(sshd.url(Path(upstream.path)), dest, home, None)
    assert "no key to offer" in got.get("error", ""), got
    assert not dest.exists()


def test_unknown_host_key_is_refused(sshd, home, upstream, tmp_path) -> None:
    (home / ".ssh" / "known_hosts").unlink()
    dest = tmp_path / "ext" / "plug"
    got = run_fetch(sshd.url(Path(upstream.path)), dest, home, sshd.client_key)
    error = got.get("error", "")
    assert f"host key of 127.0.0.1 port {sshd.port} is not trusted" in error, got
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1" in error, got
    assert not dest.exists()


@pytest.mark.parametrize(
    ("url", "ssh"),
    [
        ("ssh://git@example.org/plug.git", True),
        ("ssh://example.org:2222/plug.git", True),
        ("git+ssh://git@example.org/plug.git", True),
        ("git@example.org:team/plug.git", True),
        ("example.org:plug.git", True),
        ("https://example.org/plug.git", False),
        ("file:///srv/plug.git", False),
        ("/srv/plug.git", False),
    ],
)
def test_which_urls_get_ssh_callbacks(url: str, ssh: bool) -> None:
    from aigis._git import _is_ssh

    assert _is_ssh(url) is ssh
