"""Plugin sources (SPEC §2) against real repositories built in tmp_path, served as file:// URLs."""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pygit2
import pytest

from aigis import _git, _sources
from aigis._errors import SourceError
from aigis._sources import Fetched, fetch, is_local_source

SIG = pygit2.Signature("Test", "test@example.org", 1_700_000_000, 0)
LOGGER = "aigis._sources"


class Upstream:
    """A bare repository whose branches hold one file, VERSION, written straight into its odb."""

    def __init__(self, path: Path, head: str = "master") -> None:
        self.path = path
        self.repo = pygit2.init_repository(path, bare=True, initial_head=head)

    @property
    def url(self) -> str:
        """The file:// URL a plugin config would name."""
        return self.path.as_uri()

    def commit(self, branch: str, text: str, parents: list[str] | None = None) -> str:
        """Commit VERSION=text on branch (after its tip unless parents say otherwise)."""
        ref = f"refs/heads/{branch}"
        if parents is None:
            parents = [str(self.repo.references[ref].target)] if ref in self.repo.references else []
        tree = self.repo.TreeBuilder()
        tree.insert("VERSION", self.repo.create_blob(text.encode()), pygit2.GIT_FILEMODE_BLOB)
        oid = self.repo.create_commit(None, SIG, SIG, text, tree.write(), parents)
        self.repo.references.create(ref, oid, force=True)  # force: lets tests rewrite history
        return str(oid)


def version(dest: Path) -> str:
    """Return the checked-out VERSION file."""
    return (dest / "VERSION").read_text()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return the warning lines this module logged."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


@pytest.fixture
def up(tmp_path: Path) -> Upstream:
    """An upstream with master at "one"."""
    upstream = Upstream(tmp_path / "up.git")
    upstream.commit("master", "one")
    return upstream


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """The plugin directory, <state>/ext/plug (its parent does not exist yet)."""
    return tmp_path / "state" / "ext" / "plug"


# --- local sources ---------------------------------------------------------------------------


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A local plugin with a nested file and a symlink to another file inside it."""
    src = tmp_path / "plugins" / "plug"
    (src / "AIGIS").mkdir(parents=True)
    (src / "AIGIS" / "AIGIS.config").write_text('PLUGIN_TYPE = "core"\n')
    (src / "AIGIS" / "target.txt").write_text("linked")
    (src / "link.txt").symlink_to("AIGIS/target.txt")
    return src


def test_local_copy_follows_symlinks_inside_the_source(src: Path, dest: Path, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    assert is_local_source(str(src), Path("/nonexistent"))
    got = fetch("plug", str(src), dest, base_dir=Path("/nonexistent"))
    assert got == Fetched("local", dest, None, True)
    assert (dest / "AIGIS" / "AIGIS.config").read_text() == 'PLUGIN_TYPE = "core"\n'
    assert not (dest / "link.txt").is_symlink()
    assert (dest / "link.txt").read_text() == "linked"
    assert f'copied: plugin "plug" from {src}' in caplog.messages
    assert os.listdir(dest.parent) == ["plug"]  # no staging directory left behind


def test_local_copy_is_not_overwritten(src: Path, dest: Path, caplog) -> None:
    fetch("plug", str(src), dest, base_dir=src.parent)
    (src / "AIGIS" / "AIGIS.config").write_text('PLUGIN_TYPE = "external"\n')
    got = fetch("plug", str(src), dest, base_dir=src.parent)
    assert got == Fetched("local", dest, None, False)
    assert (dest / "AIGIS" / "AIGIS.config").read_text() == 'PLUGIN_TYPE = "core"\n'
    assert warnings(caplog) == [
        f'not updated: plugin "plug": {dest} already exists; delete it to re-copy from {src}'
    ]


def test_relative_local_path_resolves_against_base_dir(
    src: Path, dest: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path / "plugins")  # the cwd must not matter
    assert is_local_source("plugins/plug", tmp_path)
    assert not is_local_source("plug", tmp_path)
    got = fetch("plug", "plugins/plug", dest, base_dir=tmp_path)
    assert got.updated and got.kind == "local"
    assert (dest / "link.txt").read_text() == "linked"


def test_file_url_is_git_not_local(up: Upstream, tmp_path: Path) -> None:
    assert up.path.exists()
    assert not is_local_source(up.url, tmp_path)
    assert not is_local_source("https://example.org/plug.git", tmp_path)


def test_failed_local_copy_leaves_no_dest(src: Path, dest: Path, tmp_path: Path) -> None:
    (src / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(SourceError) as err:
        fetch("plug", str(src), dest, base_dir=tmp_path)
    assert err.value.plugin == "plug"
    assert str(err.value).startswith(f'plugin "plug": copy of {src} failed: ')
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_local_source_that_is_a_file_is_an_error(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "plug.txt").write_text("")
    with pytest.raises(SourceError, match="is not a directory"):
        fetch("plug", "plug.txt", dest, base_dir=tmp_path)
    assert not dest.exists()


def copy_error(src: Path, dest: Path) -> str:
    with pytest.raises(SourceError) as err:
        fetch("plug", str(src), dest, base_dir=src)
    assert not dest.exists() and os.listdir(dest.parent) == []  # nothing half-copied is left
    assert str(err.value).startswith(f'plugin "plug": copy of {src} failed: ')
    return str(err.value).removeprefix(f'plugin "plug": copy of {src} failed: ')


def test_local_copy_refuses_links_leading_outside_the_source(
    src: Path, dest: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("root's")
    (src / "AIGIS" / "leak").symlink_to(tmp_path / "secret")
    assert copy_error(src, dest) == (
        f"{src}/AIGIS/leak leads to {tmp_path}/secret, outside the source"
    )


def test_local_copy_refuses_a_link_to_dev_zero(src: Path, dest: Path) -> None:
    (src / "zero").symlink_to("/dev/zero")
    assert copy_error(src, dest) == f"{src}/zero leads to /dev/zero, outside the source"


def test_local_copy_with_links_to_itself_ends_with_an_error(src: Path, dest: Path) -> None:
    # Two links to "." used to make copytree copy forever (2**depth directories).
    (src / "a").symlink_to(".")
    (src / "b").symlink_to(".")
    assert copy_error(src, dest) == f"{src}/a is a directory loop (it leads back to {src})"


def test_local_copy_refuses_fifos_and_sockets(src: Path, dest: Path, monkeypatch) -> None:
    os.mkfifo(src / "AIGIS" / "pipe")
    assert (
        copy_error(src, dest)
        == f"{src}/AIGIS/pipe is a FIFO; only files and directories are copied"
    )
    (src / "AIGIS" / "pipe").unlink()
    monkeypatch.chdir(src)  # a short relative path: socket paths are limited to 107 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.sock")
        assert copy_error(src, dest) == (
            f"{src}/s.sock is a socket; only files and directories are copied"
        )


def test_local_copy_has_a_total_size_cap(src: Path, dest: Path, monkeypatch) -> None:
    monkeypatch.setattr(_sources, "LOCAL_COPY_MAX_BYTES", 1000)
    (src / "big").write_bytes(b"x" * 990)
    assert copy_error(src, dest) == (
        "larger than 1000 bytes, the limit for a local source (LOCAL_COPY_MAX_BYTES)"
    )


def test_local_copy_has_a_file_count_cap(src: Path, dest: Path, monkeypatch) -> None:
    monkeypatch.setattr(_sources, "LOCAL_COPY_MAX_FILES", 10)
    for index in range(10):
        (src / f"f{index}").write_text("")
    assert copy_error(src, dest) == (
        "more than 10 files and directories, the limit for a local source (LOCAL_COPY_MAX_FILES)"
    )


def test_local_copy_keeps_modes_times_and_repeated_links(src: Path, dest: Path) -> None:
    (src / "bin").mkdir()
    (src / "bin" / "run").write_text("#!/bin/sh\n")
    os.chmod(src / "bin" / "run", 0o750)
    os.utime(src / "bin" / "run", (1_000_000, 1_000_000))
    (src / "one").symlink_to("bin")
    (src / "two").symlink_to("bin")  # the same directory twice is no loop
    fetch("plug", str(src), dest, base_dir=src)
    for name in ("bin", "one", "two"):
        copied = dest / name / "run"
        assert not (dest / name).is_symlink()
        assert stat.S_IMODE(copied.stat().st_mode) == 0o750
        assert copied.stat().st_mtime == 1_000_000


def test_ref_on_local_source_is_ignored_with_warning(src: Path, dest: Path, caplog) -> None:
    assert fetch("plug", str(src), dest, ref="v1", base_dir=src).updated
    assert warnings(caplog) == ['ignored: plugin "plug": ref "v1" applies to git sources only']


@pytest.fixture
def without_pygit2(monkeypatch: pytest.MonkeyPatch) -> None:
    """pygit2 cannot be imported (as on a host without python3-pygit2), aigis._git not loaded."""
    import aigis

    monkeypatch.setitem(sys.modules, "pygit2", None)
    monkeypatch.delitem(sys.modules, "aigis._git", raising=False)
    monkeypatch.delattr(aigis, "_git", raising=False)


def test_git_source_without_pygit2_fails_that_plugin_naming_pygit2(
    without_pygit2, up: Upstream, dest: Path
) -> None:
    with pytest.raises(SourceError) as caught:
        fetch("plug", up.url, dest, base_dir=dest.parent)
    assert caught.value.plugin == "plug"
    assert str(caught.value).startswith(
        'plugin "plug": git sources need pygit2, which cannot be imported ('
    )
    assert "install it (Debian: python3-pygit2) or use a local source" in str(caught.value)
    assert not dest.exists()


def test_local_source_needs_no_pygit2(without_pygit2, src: Path, dest: Path) -> None:
    assert fetch("plug", str(src), dest, base_dir=src).kind == "local"
    assert "aigis._git" not in sys.modules


# --- git clone -------------------------------------------------------------------------------


def test_clone_prefers_master_over_remote_default(tmp_path: Path, dest: Path, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    upstream = Upstream(tmp_path / "up.git", head="main")
    upstream.commit("main", "main-tip")
    master = upstream.commit("master", "master-tip")
    got = fetch("plug", upstream.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, master, True)
    assert version(dest) == "master-tip"
    repo = pygit2.Repository(dest)
    assert repo.head.name == "refs/heads/master"
    assert repo.branches.local["master"].upstream_name == "refs/remotes/origin/master"
    assert f'fetched: plugin "plug" from {upstream.url} at {master[:12]} (branch master)' in (
        caplog.messages
    )
    assert os.listdir(dest.parent) == ["plug"]


def test_clone_without_master_uses_remote_default_branch(tmp_path: Path, dest: Path) -> None:
    upstream = Upstream(tmp_path / "up.git", head="main")
    upstream.commit("aaa", "other")  # sorts before main: the default is not "the first branch"
    main = upstream.commit("main", "main-tip")
    got = fetch("plug", upstream.url, dest, base_dir=tmp_path)
    assert got.commit == main
    assert version(dest) == "main-tip"
    assert pygit2.Repository(dest).head.name == "refs/heads/main"


def test_clone_pinned_to_branch(up: Upstream, dest: Path, tmp_path: Path) -> None:
    dev = up.commit("dev", "dev-tip")
    got = fetch("plug", up.url, dest, ref="dev", base_dir=tmp_path)
    assert got.commit == dev
    assert version(dest) == "dev-tip"
    assert pygit2.Repository(dest).head.name == "refs/heads/dev"


@pytest.mark.parametrize("annotated", [True, False])
def test_clone_pinned_to_tag_is_detached(
    up: Upstream, dest: Path, tmp_path: Path, annotated: bool
) -> None:
    tagged = str(up.repo.head.target)
    if annotated:
        up.repo.create_tag(
            "v1",
            pygit2.Oid(hex=tagged),
            getattr(pygit2, "GIT_OBJ_COMMIT", None) or pygit2.enums.ObjectType.COMMIT,
            SIG,
            "v1",
        )
    else:
        up.repo.references.create("refs/tags/v1", tagged)
    up.commit("master", "two")
    got = fetch("plug", up.url, dest, ref="v1", base_dir=tmp_path)
    assert got.commit == tagged
    assert version(dest) == "one"
    assert pygit2.Repository(dest).head_is_detached


@pytest.mark.parametrize("length", [40, 7])
def test_clone_pinned_to_commit_is_detached(
    up: Upstream, dest: Path, tmp_path: Path, length: int
) -> None:
    first = str(up.repo.head.target)
    up.commit("master", "two")
    got = fetch("plug", up.url, dest, ref=first[:length], base_dir=tmp_path)
    assert got.commit == first
    assert version(dest) == "one"
    assert pygit2.Repository(dest).head_is_detached


def test_failed_clone_names_plugin_and_leaves_no_dest(tmp_path: Path, dest: Path) -> None:
    url = (tmp_path / "nowhere.git").as_uri()
    with pytest.raises(SourceError) as err:
        fetch("plug", url, dest, base_dir=tmp_path)
    assert err.value.plugin == "plug"
    assert str(err.value).startswith(f'plugin "plug": clone of {url} failed: ')
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


@pytest.mark.parametrize("ref", ["nope", "deadbeef", "refs/heads/nope"])
def test_bad_ref_fails_clone_and_leaves_no_dest(
    up: Upstream, dest: Path, tmp_path: Path, ref: str
) -> None:
    with pytest.raises(SourceError) as err:
        fetch("plug", up.url, dest, ref=ref, base_dir=tmp_path)
    assert (
        str(err.value) == f'plugin "plug": ref "{ref}" is not a branch, tag or commit of {up.url}'
    )
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_clone_of_empty_remote_fails(tmp_path: Path, dest: Path) -> None:
    upstream = Upstream(tmp_path / "empty.git")
    with pytest.raises(SourceError, match="neither a master branch nor a default branch"):
        fetch("plug", upstream.url, dest, base_dir=tmp_path)
    assert not dest.exists()


# --- git update ------------------------------------------------------------------------------


def test_update_fast_forwards_to_new_upstream_commit(up: Upstream, dest: Path, tmp_path) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    assert fetch("plug", up.url, dest, base_dir=tmp_path) == Fetched("git", dest, first, False)
    second = up.commit("master", "two")
    assert fetch("plug", up.url, dest, base_dir=tmp_path) == Fetched("git", dest, second, True)
    assert version(dest) == "two"
    assert str(pygit2.Repository(dest).head.target) == second


def test_failed_fetch_keeps_existing_checkout(up: Upstream, dest: Path, tmp_path, caplog) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    up.commit("master", "two")
    up.path.rename(tmp_path / "moved.git")
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, first, False)
    assert version(dest) == "one"
    [warning] = warnings(caplog)
    assert warning.startswith('not updated: plugin "plug": fetch failed: ')


def test_rewritten_upstream_history_keeps_existing_checkout(
    up: Upstream, dest: Path, tmp_path, caplog
) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    rewritten = up.commit("master", "rewritten", parents=[])  # a force-push of unrelated history
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, first, False)
    assert version(dest) == "one"
    assert warnings(caplog) == [
        f'not updated: plugin "plug": cannot fast-forward branch master from {first[:12]} to '
        f"{rewritten[:12]} (local and upstream history diverged)"
    ]


def test_local_commits_ahead_of_upstream_are_kept(
    up: Upstream, dest: Path, tmp_path, caplog
) -> None:
    fetch("plug", up.url, dest, base_dir=tmp_path)
    repo = pygit2.Repository(dest)
    tree = repo.head.peel(pygit2.Commit).tree.id
    local = repo.create_commit("HEAD", SIG, SIG, "local", tree, [repo.head.target])
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, str(local), False)
    assert version(dest) == "one"
    assert warnings(caplog) == []


def test_local_edits_are_never_overwritten(up: Upstream, dest: Path, tmp_path, caplog) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    (dest / "VERSION").write_text("edited")
    up.commit("master", "two")
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, first, False)
    assert version(dest) == "edited"
    [warning] = warnings(caplog)
    assert warning.startswith('not updated: plugin "plug": update failed: ')


def test_update_follows_upstream_rename_of_master_to_main(
    up: Upstream, dest: Path, tmp_path
) -> None:
    fetch("plug", up.url, dest, base_dir=tmp_path)
    main = up.commit("main", "on-main", parents=[str(up.repo.head.target)])
    up.repo.set_head("refs/heads/main")
    up.repo.references.delete("refs/heads/master")
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, main, True)
    assert version(dest) == "on-main"
    assert pygit2.Repository(dest).head.name == "refs/heads/main"


def test_update_moves_to_new_pin_and_back(up: Upstream, dest: Path, tmp_path) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    up.repo.references.create("refs/tags/v1", first)
    second = up.commit("master", "two")
    assert fetch("plug", up.url, dest, ref="v1", base_dir=tmp_path).commit == first
    assert pygit2.Repository(dest).head_is_detached
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, second, True)
    assert pygit2.Repository(dest).head.name == "refs/heads/master"
    assert version(dest) == "two"


def test_update_with_unknown_pin_keeps_existing_checkout(
    up: Upstream, dest: Path, tmp_path, caplog
) -> None:
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    got = fetch("plug", up.url, dest, ref="nope", base_dir=tmp_path)
    assert got == Fetched("git", dest, first, False)
    assert warnings(caplog) == [
        f'not updated: plugin "plug": ref "nope" is not a branch, tag or commit of {up.url}'
    ]


def test_update_uses_the_configured_url(up: Upstream, dest: Path, tmp_path) -> None:
    fetch("plug", up.url, dest, base_dir=tmp_path)
    up.path.rename(tmp_path / "moved.git")
    moved = Upstream(tmp_path / "moved.git")
    second = moved.commit("master", "two")
    assert fetch("plug", moved.url, dest, base_dir=tmp_path).commit == second
    assert pygit2.Repository(dest).remotes["origin"].url == moved.url


def test_existing_non_repository_dest_is_used_as_is(up: Upstream, tmp_path, caplog) -> None:
    # The enclosing directory is a repository: it must not be mistaken for the plugin's own.
    pygit2.init_repository(tmp_path / "state")
    dest = tmp_path / "state" / "ext" / "plug"
    dest.mkdir(parents=True)
    (dest / "VERSION").write_text("hand-made")
    got = fetch("plug", up.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, None, False)
    assert version(dest) == "hand-made"
    assert warnings(caplog) == [
        f'not updated: plugin "plug": {dest} is not a git repository; delete it to clone {up.url}'
    ]


def test_a_git_link_planted_in_the_checkout_is_not_followed(up: Upstream, tmp_path, caplog) -> None:
    """A checkout without its own .git (it was a local source's copy) where the plugin planted
    ``.git -> ../other/.git``: the core must not fetch into, re-point or move the other
    plugin's repository (libgit2 accepts the link: the repository it leads to is root's)."""
    other = tmp_path / "state" / "ext" / "other"
    fetch("other", up.url, other, base_dir=tmp_path)
    elsewhere = Upstream(tmp_path / "elsewhere.git")
    elsewhere.commit("master", "planted")
    dest = tmp_path / "state" / "ext" / "plug"
    dest.mkdir()
    (dest / ".git").symlink_to("../other/.git")
    got = fetch("plug", elsewhere.url, dest, base_dir=tmp_path)
    assert got == Fetched("git", dest, None, False)
    repo = pygit2.Repository(other)
    assert repo.remotes["origin"].url == up.url
    assert version(other) == "one"
    assert "elsewhere" not in str(list(repo.references))
    assert warnings(caplog) == [
        f'not updated: plugin "plug": {dest}/.git is not a directory of the core\'s '
        f"(a link, or another account's); delete {dest} to clone {elsewhere.url}"
    ]


def test_a_git_directory_of_another_account_is_not_opened(up: Upstream, tmp_path, caplog) -> None:
    """The same with a .git directory the plugin's account made (libgit2 refuses it too, since
    1.4.3; the core does not rely on that)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("chown to another account needs root, and CI must run it")
        pytest.skip("chown to another account needs root")
    dest = tmp_path / "state" / "ext" / "plug"
    fetch("plug", up.url, dest, base_dir=tmp_path)
    for path in (dest / ".git", *(dest / ".git").rglob("*")):
        os.chown(path, 65534, 65534, follow_symlinks=False)
    up.commit("master", "two")
    assert fetch("plug", up.url, dest, base_dir=tmp_path) == Fetched("git", dest, None, False)
    assert version(dest) == "one"
    assert "another account's" in warnings(caplog)[0]


def test_a_fifo_planted_in_the_checkout_cannot_hang_the_update(
    up: Upstream, dest: Path, tmp_path, caplog, monkeypatch
) -> None:
    """The plugin's account replaces a tracked file with a FIFO: libgit2's checkout opens it to
    compare it and would wait for a writer forever, holding the core's load (as root). The
    update gives up after its deadline instead, and the checkout stays at its commit."""
    first = fetch("plug", up.url, dest, base_dir=tmp_path).commit
    (dest / "VERSION").unlink()
    os.mkfifo(dest / "VERSION")
    up.commit("master", "two")
    monkeypatch.setattr(_git, "CHECKOUT_TIMEOUT", 2.0)
    got: list[Fetched] = []
    update = threading.Thread(
        target=lambda: got.append(fetch("plug", up.url, dest, base_dir=tmp_path)), daemon=True
    )
    update.start()
    update.join(60)
    if update.is_alive():  # let the stuck checkout (writing into the FIFO) go before failing
        os.close(os.open(dest / "VERSION", os.O_RDONLY | os.O_NONBLOCK))
        update.join(60)
        pytest.fail("the update waited for the FIFO's writer")
    assert got == [Fetched("git", dest, first, False)]
    (line,) = warnings(caplog)
    assert line.startswith('not updated: plugin "plug": update failed: checkout of ')
    assert "did not finish within 2 s" in line
