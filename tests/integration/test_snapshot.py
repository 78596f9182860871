"""The core reads, imports and runs only its own snapshot of a plugin's source, never the
plugin's checkout, which the plugin's account may rewrite: each test plays a plugin that rewrites
its checkout, then has the core reload it (as ``aigis.AIGISReload`` or a SIGHUP would).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

import aigis
from aigis._snapshot import in_snapshot, take_snapshot
from aigis._sources import Fetched

from .test_pipeline import loader_for

pytestmark = pytest.mark.integration

INTERNAL = """\
PLUGIN_TYPE = "internal"
ENTRYPOINT = "{root}"
LAUNCH = "main"
REQUIREMENTS_COMMAND = "sh"
REQUIREMENTS_FILE = "{root}/install.sh"
"""


@pytest.fixture
def loaded(clean_aigis):
    """Unload every plugin a test loaded, so skills and modules don't leak between tests."""
    plugins = []
    yield plugins
    for loader, plugin in reversed(plugins):
        loader.unload(plugin)


EVIL = "import os\nopen({marker!r}, 'w').write(str(os.getuid()))\n"


@pytest.fixture
def victim(tmp_path, make_plugin, loaded):
    """An internal plugin whose AIGIS.core imports its own ``helper`` module and whose
    requirements run ``sh install.sh``; loaded once from a local source."""
    counter = tmp_path / "installs"
    make_plugin(
        "victim",
        INTERNAL,
        core="from helper import value\nSKILLS = ['value']\n",
        files={
            "helper.py": "def value():\n    return 'from the source'\n",
            "main.py": "def launch():\n    pass\n",
            "install.sh": f"echo installed >> {counter}\n",
        },
    )
    loader, entries = loader_for(tmp_path, '[internal]\nvictim = "src/victim"\n')
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    assert aigis.value() == "from the source"
    assert counter.read_text() == "installed\n"

    def reload():
        loader.unload(plugin)
        fresh = loader.load(entries[0])
        loaded.append((loader, fresh))
        return fresh

    return tmp_path / "state" / "ext" / "victim", reload, counter


def test_a_module_rewritten_in_the_checkout_is_not_imported_by_the_core(tmp_path, victim):
    checkout, reload, _ = victim
    marker = tmp_path / "ran-in-the-core"
    (checkout / "helper.py").write_text(EVIL.format(marker=str(marker)) + "def value(): return 2\n")
    # A module the core has not imported yet, planted where the ENTRYPOINT is on sys.path.
    (checkout / "csv.py").write_text(EVIL.format(marker=str(marker)))
    fresh = reload()
    assert fresh.state == "loaded", fresh.reason
    assert aigis.value() == "from the source"
    assert not marker.exists()
    assert str(checkout) not in [os.path.realpath(p) for p in __import__("sys").path]


def test_a_rewritten_manifest_or_aigis_core_is_not_read_by_the_core(tmp_path, victim):
    checkout, reload, _ = victim
    marker = tmp_path / "ran-in-the-core"
    (checkout / "AIGIS" / "AIGIS.core").write_text(
        EVIL.format(marker=str(marker)) + "SKILLS = []\n"
    )
    (checkout / "AIGIS" / "AIGIS.config").write_text(
        INTERNAL.replace('"sh"', f'"touch {marker}; true"')
        + 'SECRETS = {"../other/token": "{root}/stolen"}\n'
    )
    fresh = reload()
    assert fresh.state == "loaded", fresh.reason
    assert aigis.value() == "from the source"
    assert fresh.manifest.requirements_command == "sh"
    assert fresh.manifest.secrets == {}
    assert not marker.exists()


def test_a_rewritten_requirements_file_is_not_run_by_the_core(tmp_path, victim):
    checkout, reload, counter = victim
    marker = tmp_path / "ran-as-the-core"
    (checkout / "install.sh").write_text(f"id -u > {marker}\n")
    fresh = reload()
    assert fresh.state == "loaded", fresh.reason
    assert not marker.exists()
    assert counter.read_text() == "installed\n"  # unchanged inputs: not run again


def test_the_snapshot_is_the_cores_alone(tmp_path, victim):
    snapshots = tmp_path / "state" / "snapshots"
    assert (snapshots.stat().st_mode & 0o777, (snapshots / "victim").stat().st_mode & 0o777) == (
        0o700,
        0o700,
    )
    assert (snapshots / "victim" / "helper.py").read_text().startswith("def value")


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_a_git_plugin_is_read_from_the_fetched_commit_not_its_working_files(tmp_path, loaded):
    upstream = tmp_path / "upstream"
    (upstream / "AIGIS").mkdir(parents=True)
    (upstream / "AIGIS" / "AIGIS.config").write_text(INTERNAL.replace("REQUIREMENTS", "#"))
    (upstream / "AIGIS" / "AIGIS.core").write_text("from gitty import value\nSKILLS = ['value']\n")
    (upstream / "gitty.py").write_text("def value():\n    return 1\n")
    (upstream / "main.py").write_text("def launch():\n    pass\n")
    os.symlink("gitty.py", upstream / "link.py")  # a link inside the tree is kept
    git(upstream, "init", "-q", "-b", "master")
    git(upstream, "add", ".")
    git(upstream, "commit", "-qm", "one")
    loader, entries = loader_for(tmp_path, f'[internal]\ng = "file://{upstream}"\n')
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    assert aigis.value() == 1
    # The plugin rewrites its working files: a reload still imports the commit's.
    checkout = tmp_path / "state" / "ext" / "g"
    (checkout / "gitty.py").write_text("def value():\n    return 'planted'\n")
    loader.unload(plugin)
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert aigis.value() == 1
    # Upstream moves on: the snapshot follows the fetched commit.
    (checkout / "gitty.py").write_text("def value():\n    return 1\n")  # as it was (fast-forward)
    (upstream / "gitty.py").write_text("def value():\n    return 2\n")
    git(upstream, "commit", "-qam", "two")
    loader.unload(plugin)
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    assert aigis.value() == 2
    snapshot = tmp_path / "state" / "snapshots" / "g"
    assert os.readlink(snapshot / "link.py") == "gitty.py"
    assert (tmp_path / "state" / "snapshots" / "g.commit").read_text().strip() == git(
        upstream, "rev-parse", "HEAD"
    )


def test_a_link_out_of_the_repository_is_refused_in_the_snapshot(tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    os.symlink("/etc/passwd", upstream / "out")
    git(upstream, "init", "-q", "-b", "master")
    git(upstream, "add", ".")
    git(upstream, "commit", "-qm", "one")
    fetched = Fetched("git", upstream, git(upstream, "rev-parse", "HEAD"), True)
    with pytest.raises(Exception, match=r"out leads to /etc/passwd, outside the repository"):
        take_snapshot("p", fetched, "file:///x", tmp_path, tmp_path / "snapshots")
    assert not (tmp_path / "snapshots" / "p").exists()


def test_a_link_leaving_the_snapshot_through_another_link_is_refused(tmp_path):
    """``b -> .`` stays inside, and ``b/b/../../secret`` looks inside when read as text
    ("secret"); but b/b is the snapshot itself, so ../.. leaves it: such a link is refused."""
    (tmp_path / "secret").write_text("outside\n")
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    os.symlink(".", upstream / "b")
    os.symlink("b/b/../../secret", upstream / "escape")
    git(upstream, "init", "-q", "-b", "master")
    git(upstream, "add", ".")
    git(upstream, "commit", "-qm", "one")
    fetched = Fetched("git", upstream, git(upstream, "rev-parse", "HEAD"), True)
    with pytest.raises(Exception, match=r"escape leads to .*secret, outside the repository"):
        take_snapshot("p", fetched, "file:///x", tmp_path, tmp_path / "snapshots")
    assert not (tmp_path / "snapshots" / "p").exists()


def test_paths_map_into_the_snapshot_only_inside_the_checkout():
    root, snap = Path("/s/ext/p"), Path("/s/snapshots/p")
    assert in_snapshot(root, root, snap) == snap
    assert in_snapshot(root / "sub" / "r.txt", root, snap) == snap / "sub" / "r.txt"
    assert in_snapshot(Path("/opt/shared"), root, snap) == Path("/opt/shared")
    assert in_snapshot(Path("/s/ext/p2/x"), root, snap) == Path("/s/ext/p2/x")


def test_a_local_checkout_copied_before_snapshots_is_snapshotted_from_the_source(
    tmp_path, make_plugin, loaded
):
    src = make_plugin("old", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', core="SKILLS=[]\n")
    checkout = tmp_path / "state" / "ext" / "old"
    checkout.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(checkout)], check=True)
    (checkout / "AIGIS" / "AIGIS.core").write_text(textwrap.dedent("raise SystemExit(3)\n"))
    loader, entries = loader_for(tmp_path, '[core]\nold = "src/old"\n')
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    snapshot = tmp_path / "state" / "snapshots" / "old" / "AIGIS" / "AIGIS.core"
    assert snapshot.read_text() == "SKILLS=[]\n"


def test_a_git_update_never_writes_through_a_link_the_plugin_planted(tmp_path, loaded):
    upstream = tmp_path / "upstream"
    (upstream / "AIGIS").mkdir(parents=True)
    (upstream / "AIGIS" / "AIGIS.config").write_text(
        'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'
    )
    (upstream / "AIGIS" / "AIGIS.core").write_text("SKILLS = []\n")
    (upstream / "lib").mkdir()
    (upstream / "lib" / "x.py").write_text("one\n")
    git(upstream, "init", "-q", "-b", "master")
    git(upstream, "add", ".")
    git(upstream, "commit", "-qm", "one")
    loader, entries = loader_for(tmp_path, f'[core]\ng = "file://{upstream}"\n')
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    # The plugin swaps a directory of its checkout for a link to a place only root may write.
    checkout, elsewhere = tmp_path / "state" / "ext" / "g", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (checkout / "lib" / "x.py", checkout / "lib"):
        path.unlink() if path.is_file() else path.rmdir()
    (checkout / "lib").symlink_to(elsewhere)
    (upstream / "lib" / "x.py").write_text("two\n")
    (upstream / "lib" / "new.py").write_text("new\n")
    git(upstream, "add", ".")
    git(upstream, "commit", "-qm", "two")
    loader.unload(plugin)
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    assert list(elsewhere.iterdir()) == []  # libgit2 refused the checkout: a conflict
    # The core's copy stays at the commit the checkout is at (the update was not applied).
    snapshot = tmp_path / "state" / "snapshots" / "g"
    assert (snapshot / "lib" / "x.py").read_text() == "one\n"
