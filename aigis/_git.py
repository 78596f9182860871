"""Git plugin sources (SPEC §2) with pygit2: clone, then fetch and fast-forward.

Imported by ``aigis._sources`` on the first git source only (pygit2 is heavy).
"""

from __future__ import annotations

import getpass
import inspect
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pygit2

from aigis._errors import SourceError
from aigis._sources import Fetched, log, staging, stored_credentials

try:  # pygit2 >= 1.14
    from pygit2.enums import FetchPrune, MergeAnalysis, RepositoryOpenFlag

    _PRUNE, _NO_SEARCH = FetchPrune.PRUNE, RepositoryOpenFlag.NO_SEARCH
    _UP_TO_DATE, _FAST_FORWARD = MergeAnalysis.UP_TO_DATE, MergeAnalysis.FASTFORWARD
except ImportError:  # Debian 12 ships pygit2 1.11: plain int constants
    _PRUNE, _NO_SEARCH = pygit2.GIT_FETCH_PRUNE, pygit2.GIT_REPOSITORY_OPEN_NO_SEARCH
    _UP_TO_DATE = pygit2.GIT_MERGE_ANALYSIS_UP_TO_DATE
    _FAST_FORWARD = pygit2.GIT_MERGE_ANALYSIS_FASTFORWARD
# clone_repository(proxy=) is pygit2 >= 1.18.0 (Remote.fetch(proxy=) is much older).
_CLONE_KW = (
    {"proxy": True} if "proxy" in inspect.signature(pygit2.clone_repository).parameters else {}
)
try:  # pygit2 >= 1.14: allowed_types is a CredentialType flag
    from pygit2.enums import CredentialType

    _CRED_USERNAME, _CRED_SSH_KEY = CredentialType.USERNAME, CredentialType.SSH_KEY
except ImportError:  # pygit2 1.11: plain ints
    _CRED_USERNAME, _CRED_SSH_KEY = pygit2.GIT_CREDENTIAL_USERNAME, pygit2.GIT_CREDENTIAL_SSH_KEY


_ORIGIN = "refs/remotes/origin/"
_SSH_SCHEMES = ("ssh://", "ssh+git://", "git+ssh://")
_HEX = re.compile(r"[0-9a-fA-F]{4,64}")
_SSH_KEY_ENV = "AIGIS_GIT_SSH_KEY"
_CREDENTIALS_ENV = "AIGIS_GIT_CREDENTIALS"  # a git-credential-store file, for the core only
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


class _NotUpdated(Exception):
    """An update step failed in a way that keeps the existing checkout (a warning, not an error)."""


class _SshError(pygit2.GitError):
    """SSH authentication or host key trouble, raised from a callback through libgit2."""


class _SshCallbacks(pygit2.RemoteCallbacks):
    """Credentials and host key policy for one connection to an ssh:// or scp-like URL.

    Credentials: the key named by $AIGIS_GIT_SSH_KEY if set (and nothing else), otherwise the
    ssh-agent when $SSH_AUTH_SOCK is set, then the first existing ~/.ssh/id_ed25519, id_ecdsa,
    id_rsa. Each is offered once: libgit2 asks again after every rejection, forever, so an
    exhausted list raises instead. Host keys: libgit2 (with libssh2) checks ~/.ssh/known_hosts
    itself and passes the verdict as `valid`; pygit2 would accept any SSH host key when the
    callback passes through, so this callback refuses a host key known_hosts does not vouch for.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._pending: list[tuple[str, Path | None]] | None = None  # (label, key) queue
        self._tried: list[str] = []

    def credentials(self, url: str, username_from_url: str | None, allowed_types: int):
        """Return the next credential to try; raise once every one was refused."""
        user = username_from_url or getpass.getuser()
        if not allowed_types & _CRED_SSH_KEY:
            if allowed_types & _CRED_USERNAME:  # ssh://host/path: libgit2 asks for the user first
                return pygit2.Username(user)
            raise _SshError(f"ssh server for {self._url} does not accept public-key authentication")
        if self._pending is None:
            self._pending = _ssh_identities()
        if not self._pending:
            if self._tried:
                raise _SshError(
                    f"ssh authentication as {user} failed with {' and '.join(self._tried)}"
                )
            raise _SshError(
                f"ssh authentication as {user}: no key to offer (${_SSH_KEY_ENV} and "
                f"$SSH_AUTH_SOCK are unset and none of "
                f"{', '.join(f'~/.ssh/{k}' for k in _DEFAULT_KEYS)} exists)"
            )
        label, key = self._pending.pop(0)
        self._tried.append(label)
        if key is None:
            return pygit2.KeypairFromAgent(user)
        pub = key.with_name(key.name + ".pub")
        # Without the .pub beside it, libssh2 derives the public key from the private one.
        return pygit2.Keypair(user, str(pub) if pub.exists() else None, str(key), "")

    def certificate_check(self, certificate: None, valid: bool, host: bytes | str) -> bool:
        """Accept a host key only when libgit2 found it in ~/.ssh/known_hosts."""
        if valid:
            return True
        host = host.decode(errors="replace") if isinstance(host, bytes) else host
        known = Path("~/.ssh/known_hosts").expanduser()
        try:
            port = urlsplit(self._url).port if "://" in self._url else None
        except ValueError:
            port = None
        scan = f"ssh-keyscan -p {port} {host}" if port and port != 22 else f"ssh-keyscan {host}"
        raise _SshError(
            f"ssh host key of {host}{f' port {port}' if port else ''} is not trusted: no matching "
            f"entry in {known} (unknown host or changed key); check the key's fingerprint and add "
            f"it, e.g. {scan} >> {known}"
        )


def _ssh_identities() -> list[tuple[str, Path | None]]:
    """List the credentials to offer, in order, as (label for errors, private key or None=agent)."""
    explicit = os.environ.get(_SSH_KEY_ENV)
    if explicit:
        key = Path(explicit).expanduser()
        if not key.is_file():
            raise _SshError(f"${_SSH_KEY_ENV}={explicit}: no such private key file")
        return [(f"key {key} (${_SSH_KEY_ENV})", key)]
    found: list[tuple[str, Path | None]] = []
    if os.environ.get("SSH_AUTH_SOCK"):
        found.append((f"the ssh-agent at {os.environ['SSH_AUTH_SOCK']}", None))
    for name in _DEFAULT_KEYS:
        key = Path("~/.ssh").expanduser() / name
        if key.is_file():
            found.append((f"key {key}", key))
            break
    return found


def _is_ssh(url: str) -> bool:
    """Tell whether libgit2 will use its SSH transport: ssh:// or scp-like user@host:path."""
    if "://" in url:
        return url.lower().startswith(_SSH_SCHEMES)
    return ":" in url


def _callbacks(url: str) -> dict[str, pygit2.RemoteCallbacks]:
    """Return callbacks= for one network operation on url (fresh: it counts attempts)."""
    return {"callbacks": _SshCallbacks(url) if _is_ssh(url) else _HttpsCallbacks(url)}


class _HttpsCallbacks(pygit2.RemoteCallbacks):
    """Credentials for an https:// URL from the file named by $AIGIS_GIT_CREDENTIALS, offered
    once (libgit2 asks again after every rejection, forever). Credentials never appear in URLs,
    logs or messages this way."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._offered = False

    def credentials(self, url: str, username_from_url: str | None, allowed_types: int):
        """The stored user and token for this URL; a GitError naming the host otherwise."""
        host = urlsplit(self._url).netloc.rpartition("@")[2]
        path = os.environ.get(_CREDENTIALS_ENV, "")
        if self._offered:
            raise pygit2.GitError(f"{host} refused the credentials from {path}")
        if not path:
            raise pygit2.GitError(
                f"{host} asks for credentials: set ${_CREDENTIALS_ENV} to a file of lines "
                "https://USER:TOKEN@HOST (never put the token in the source URL)"
            )
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise pygit2.GitError(f"cannot read ${_CREDENTIALS_ENV} file {path}: {exc}") from None
        found = stored_credentials(url, lines)
        if found is None:
            raise pygit2.GitError(f"{host} asks for credentials; none for it in {path}")
        self._offered = True
        return pygit2.UserPass(*found)


def clone(name: str, url: str, dest: Path, ref: str | None) -> Fetched:
    """Clone url into dest and check out ref or the default branch; leave no dest on failure."""
    try:
        with staging(dest) as tmp:
            repo = pygit2.clone_repository(url, tmp, **_CLONE_KW, **_callbacks(url))
            try:
                target = _target(repo, ref)
                if target is None:
                    raise SourceError(name, _missing(url, ref))
                _check_out(repo, *target)
                commit = str(repo.head.target)
            finally:
                repo.free()  # release file handles before the directory is renamed
    except (pygit2.GitError, OSError) as exc:
        raise SourceError(name, f"clone of {url} failed: {exc}") from exc
    _log_fetched(name, url, commit, *target)
    return Fetched("git", dest, commit, True)


def update(name: str, url: str, dest: Path, ref: str | None) -> Fetched:
    """Fetch origin and move the checkout to ref or the default branch; keep it on any trouble."""
    if not _own_git_dir(dest):
        log.warning(
            'not updated: plugin "%s": %s/.git is not a directory of the core\'s (a link, or '
            "another account's); delete %s to clone %s",
            name,
            dest,
            dest,
            url,
        )
        return Fetched("git", dest, None, False)
    try:
        # NO_SEARCH: otherwise a non-repository dest would open whatever repository encloses it.
        repo = pygit2.Repository(dest, _NO_SEARCH)
    except pygit2.GitError:
        log.warning(
            'not updated: plugin "%s": %s is not a git repository; delete it to clone %s',
            name,
            dest,
            url,
        )
        return Fetched("git", dest, None, False)
    try:
        before = _head(repo)
        try:
            _fetch_origin(name, repo, url)
            target = _target(repo, ref)
            if target is None:
                raise _NotUpdated(_missing(url, ref))
            _check_out(repo, *target)
        except (_NotUpdated, pygit2.GitError) as exc:
            reason = exc if isinstance(exc, _NotUpdated) else f"update failed: {exc}"
            log.warning('not updated: plugin "%s": %s', name, reason)
            return Fetched("git", dest, before, False)
        after = _head(repo)
    finally:
        repo.free()
    _log_fetched(name, url, after, *target)
    return Fetched("git", dest, after, after != before)


def _own_git_dir(dest: Path) -> bool:
    """Whether ``dest/.git`` is a directory (not a link) of the core's own account, as a clone
    made it; True when there is no .git at all (then libgit2 finds no repository). The plugin's
    account may write the checkout, never that directory: a .git it planted must not be opened
    (libgit2 follows a link to a repository of the core's, e.g. another plugin's)."""
    try:
        info = os.lstat(dest / ".git")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()


def _fetch_origin(name: str, repo: pygit2.Repository, url: str) -> None:
    """Fetch origin from url (the configured source wins over a stale remote URL)."""
    if repo.remotes["origin"].url != url:
        log.info('re-pointed: plugin "%s": origin to %s', name, url)
        repo.remotes.set_url("origin", url)
    remote = repo.remotes["origin"]
    try:
        # Prune so that "master if the remote has it" sees branches deleted upstream.
        remote.fetch(prune=_PRUNE, proxy=True, **_callbacks(url))
    except pygit2.GitError as exc:
        raise _NotUpdated(f"fetch failed: {exc}") from exc
    # libgit2 (like git) never updates origin/HEAD on fetch; follow the remote's current default
    # branch from the advertisement the fetch just received, as `git remote set-head -a` would.
    if hasattr(remote, "list_heads"):  # pygit2 >= 1.18.2
        heads = [(h.name, h.symref_target) for h in remote.list_heads(connect=False)]
    else:  # older: ls_remotes() connects again
        heads = [
            (h["name"], h["symref_target"])
            for h in remote.ls_remotes(proxy=True, **_callbacks(url))
        ]
    for name_, symref in heads:
        if name_ == "HEAD" and symref:
            branch = symref.removeprefix("refs/heads/")
            repo.references.create(f"{_ORIGIN}HEAD", f"{_ORIGIN}{branch}", force=True)


def _target(repo: pygit2.Repository, ref: str | None) -> tuple[str, str] | None:
    """Pick ("branch", name), ("tag", name) or ("commit", hex) to check out; None if absent."""
    if ref is None:
        default = repo.references.get(f"{_ORIGIN}HEAD")
        names = ["master"]
        if default is not None and isinstance(default.target, str):
            names.append(default.target.removeprefix(_ORIGIN))
        return next((("branch", n) for n in names if f"{_ORIGIN}{n}" in repo.references), None)
    if f"{_ORIGIN}{ref}" in repo.references:
        return "branch", ref
    if f"refs/tags/{ref}" in repo.references:
        return "tag", ref
    if _HEX.fullmatch(ref):
        try:
            return "commit", str(repo.revparse_single(ref).peel(pygit2.Commit).id)
        except (KeyError, ValueError, pygit2.GitError):  # unknown, ambiguous, or not a commit
            return None
    return None


#: Seconds a checkout may take. It runs in a child process: the plugin's account may have put a
#: FIFO where a tracked file belongs, and libgit2 would wait on it forever, as root, in the core.
CHECKOUT_TIMEOUT = 300.0
_CHECKOUT_CHILD = """
import sys
import pygit2
try:
    repo = pygit2.Repository(sys.argv[1], int(sys.argv[3]))
    repo.checkout_tree(repo[sys.argv[2]])
except pygit2.GitError as exc:
    sys.exit(str(exc))
"""


def _checkout_tree(repo: pygit2.Repository, oid: pygit2.Oid | str) -> None:
    """``repo.checkout_tree`` (SAFE: local edits are never overwritten) of the commit ``oid``
    in a child process, within CHECKOUT_TIMEOUT; GitError saying why it failed."""
    argv = [
        sys.executable,
        "-I",
        "-c",
        _CHECKOUT_CHILD,
        repo.workdir,
        str(oid),
        str(int(_NO_SEARCH)),
    ]
    what = f"checkout of {str(oid)[:12]}"
    try:
        done = subprocess.run(
            argv,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECKOUT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise pygit2.GitError(
            f"{what} did not finish within {CHECKOUT_TIMEOUT:g} s (a FIFO or device where a "
            "tracked file belongs?)"
        ) from None
    except OSError as exc:
        raise pygit2.GitError(f"{what}: cannot run {sys.executable}: {exc.strerror}") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise pygit2.GitError(f"{what} failed: {reason[0]}")


def _check_out(repo: pygit2.Repository, kind: str, name: str) -> None:
    """Check out a branch (fast-forwarding it to origin's) or, detached, a tag or commit."""
    if kind != "branch":
        spec = f"refs/tags/{name}" if kind == "tag" else name
        commit = repo.revparse_single(spec).peel(pygit2.Commit)
        if not (repo.head_is_detached and repo.head.target == commit.id):
            _checkout_tree(repo, commit.id)
            repo.set_head(commit.id)
        return
    theirs = repo.references[f"{_ORIGIN}{name}"].target
    local = repo.branches.local.get(name)
    if local is None:
        local = repo.branches.local.create(name, repo[theirs].peel(pygit2.Commit))
        local.upstream = repo.branches.remote[f"origin/{name}"]
    analysis, _ = repo.merge_analysis(theirs, local.name)
    if analysis & _UP_TO_DATE:
        theirs = local.target  # equal, or local commits ahead of origin: keep them
    elif not analysis & _FAST_FORWARD:
        raise _NotUpdated(
            f"cannot fast-forward branch {name} from {str(local.target)[:12]} to "
            f"{str(theirs)[:12]} (local and upstream history diverged)"
        )
    if repo.head_is_unborn or repo.head.name != local.name or repo.head.target != theirs:
        # Checkout first (SAFE: local edits are never overwritten), then move the branch.
        _checkout_tree(repo, theirs)
        local.set_target(theirs)
        repo.set_head(local.name)


def _head(repo: pygit2.Repository) -> str | None:
    """Return the HEAD commit hex, or None for an empty repository."""
    return None if repo.head_is_unborn else str(repo.head.target)


def _missing(url: str, ref: str | None) -> str:
    """Explain why there is nothing to check out."""
    if ref is None:
        return f"{url} has neither a master branch nor a default branch; set ref"
    return f'ref "{ref}" is not a branch, tag or commit of {url}'


def _log_fetched(name: str, url: str, commit: str | None, kind: str, what: str) -> None:
    """Log one line saying which revision of which source the plugin now runs."""
    shown = what[:12] if kind == "commit" else what
    log.info(
        'fetched: plugin "%s" from %s at %s (%s %s)', name, url, (commit or "")[:12], kind, shown
    )
