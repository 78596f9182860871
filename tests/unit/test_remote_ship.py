"""Shipping plans and the receiving end (aigis._remote.ship, aigis._remote.syncer), in-process:
the tar ship builds is applied by syncer.apply to a local directory (what the remote host does).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from aigis._remote import syncer
from aigis._remote.ship import _tar, desired, plan


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def sync(src: Path, dest: Path, secrets: dict[str, Path] | None = None) -> tuple[list, list]:
    """One ship round done locally: plan against dest's manifest, apply the tar to dest."""
    secrets = secrets or {}
    wanted, sources = desired(src, secrets)
    send, delete = plan(wanted, syncer.manifest(str(dest)))
    if send or delete:
        data = _tar(send, delete, wanted, sources, secrets, None)
        syncer.apply(str(dest), io.BytesIO(data))
    return send, delete


def test_first_ship_sends_everything_then_nothing(tmp_path):
    src = tree(tmp_path / "src", {"AIGIS/AIGIS.config": "X = 1\n", "run.sh": "#!/bin/sh\n"})
    (src / "run.sh").chmod(0o775)
    (src / "empty").mkdir()
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref\n")
    dest = tmp_path / "dest"
    send, delete = sync(src, dest)
    assert send == ["AIGIS", "AIGIS/AIGIS.config", "empty", "run.sh"]
    assert delete == []
    assert (dest / "AIGIS/AIGIS.config").read_text() == "X = 1\n"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755  # normalised
    assert stat.S_IMODE((dest / "AIGIS/AIGIS.config").stat().st_mode) == 0o644
    assert not (dest / ".git").exists()
    assert sync(src, dest) == ([], [])


def test_only_changes_move(tmp_path):
    src = tree(tmp_path / "src", {"a.py": "a", "b.py": "b", "old/x.txt": "x"})
    dest = tmp_path / "dest"
    sync(src, dest)
    untouched = (dest / "a.py").stat().st_ino
    (src / "b.py").write_text("b2")
    (src / "old" / "x.txt").unlink()
    (src / "old").rmdir()
    (src / "c.py").write_text("c")
    assert sync(src, dest) == (["b.py", "c.py"], ["old", "old/x.txt"])
    assert (dest / "b.py").read_text() == "b2"
    assert not (dest / "old").exists()
    assert (dest / "a.py").stat().st_ino == untouched  # never rewritten
    assert syncer.manifest(str(dest)) == desired(src, {})[0]


def test_a_mode_change_alone_is_shipped(tmp_path):
    src = tree(tmp_path / "src", {"tool": "#!/bin/sh\n"})
    dest = tmp_path / "dest"
    sync(src, dest)
    (src / "tool").chmod(0o755)
    assert sync(src, dest) == (["tool"], [])
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755


def test_secrets_land_0400_over_tree_files(tmp_path):
    src = tree(tmp_path / "src", {"token.txt": "placeholder", "AIGIS/x": "x"})
    vault = tree(tmp_path / "vault", {"token": "s3cret", "key": "k"})
    dest = tmp_path / "dest"
    secrets = {"token.txt": vault / "token", "keys/api.key": vault / "key"}
    sync(src, dest, secrets)
    for rel, text in (("token.txt", "s3cret"), ("keys/api.key", "k")):
        assert (dest / rel).read_text() == text
        assert stat.S_IMODE((dest / rel).stat().st_mode) == 0o400
    assert sync(src, dest, secrets) == ([], [])
    (vault / "token").write_text("rotated")
    assert sync(src, dest, secrets) == (["token.txt"], [])


def test_type_changes_file_to_dir_and_symlinks(tmp_path):
    src = tree(tmp_path / "src", {"thing": "file"})
    os.symlink("thing", src / "link")
    dest = tmp_path / "dest"
    sync(src, dest)
    assert os.readlink(dest / "link") == "thing"
    (src / "thing").unlink()
    tree(src, {"thing/inside": "now a dir"})
    os.unlink(src / "link")
    os.symlink("thing/inside", src / "link")
    sync(src, dest)
    assert (dest / "thing" / "inside").read_text() == "now a dir"
    assert os.readlink(dest / "link") == "thing/inside"
    assert syncer.manifest(str(dest)) == desired(src, {})[0]


def test_apply_never_writes_through_a_symlinked_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")  # planted on the host
    src = tree(tmp_path / "src", {"sub/file": "data"})
    sync(src, dest)
    assert list(outside.iterdir()) == []
    assert (dest / "sub").is_dir() and not (dest / "sub").is_symlink()
    assert (dest / "sub" / "file").read_text() == "data"


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", "a//b", ""])
def test_apply_refuses_paths_leaving_the_destination(tmp_path, rel):
    with pytest.raises(ValueError, match="refusing path"):
        syncer._inside(str(tmp_path), rel)


@pytest.mark.parametrize("rel", ["../x", "/abs", ""])
def test_secret_paths_stay_inside_the_plugin(tmp_path, rel):
    src = tree(tmp_path / "src", {"a": "a"})
    with pytest.raises(ValueError, match="must be relative, inside the plugin"):
        desired(src, {rel: src / "a"})


def test_plan_is_pure_set_difference():
    wanted = {"a": ["f", 0o644, "1"], "b": ["f", 0o644, "2"], "d": ["d", 0, ""]}
    remote = {"a": ["f", 0o644, "1"], "b": ["f", 0o755, "2"], "z": ["f", 0o644, "9"]}
    assert plan(wanted, remote) == (["b", "d"], ["z"])
