"""Key files created in one batch: each synced before it is linked into place, errors left to
the one-by-one path that names the file."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from aigis._errors import AigisError
from aigis._keys import KEY_BYTES, PLUGIN_KEY_MODE, create_missing_keys, load_or_create_key


def test_missing_keys_are_created_synced_then_linked_and_existing_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "old.key").write_bytes(b"kept")
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link
    synced: set[int] = set()

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def link(src: str, dst: str) -> None:
        events.append(("link", Path(dst).name, os.stat(src).st_ino in synced))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    caplog.set_level(logging.INFO, "aigis._keys")
    wanted = [(keys / f"{name}.key", f'key of plugin "{name}"', 0o600) for name in "abc"]
    create_missing_keys([*wanted, (keys / "old.key", 'key of plugin "old"', 0o600)])

    assert sorted(events) == [("link", f"{n}.key", True) for n in "abc"]  # each synced first
    contents = {(keys / f"{n}.key").read_bytes() for n in "abc"}
    assert len(contents) == 3 and all(len(c) == KEY_BYTES for c in contents)
    assert all(stat.S_IMODE((keys / f"{n}.key").stat().st_mode) == 0o600 for n in "abc")
    assert (keys / "old.key").read_bytes() == b"kept"
    assert sorted(os.listdir(keys)) == ["a.key", "b.key", "c.key", "old.key"]  # no temp files
    assert sorted(caplog.messages) == [
        f'created: key of plugin "{n}" file {keys / f"{n}.key"} (mode 0600)' for n in "abc"
    ]
    assert load_or_create_key(keys / "a.key", "a", 0o600) == (keys / "a.key").read_bytes()


def test_a_key_that_cannot_be_created_is_left_for_the_path_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the keys directory should be")
    bad = tmp_path / "blocker" / "x.key"
    good = tmp_path / "keys" / "y.key"
    create_missing_keys([(bad, 'key of plugin "x"', 0o600), (good, 'key of plugin "y"', 0o600)])
    assert len(good.read_bytes()) == KEY_BYTES
    with pytest.raises(AigisError) as caught:
        load_or_create_key(bad, 'key of plugin "x"', 0o600)
    assert str(caught.value) == f'cannot read the key of plugin "x" file {bad}: Not a directory'
    assert os.listdir(tmp_path) == ["blocker", "keys"]


def test_a_failed_fsync_leaves_no_key_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    create_missing_keys([(tmp_path / "z.key", 'key of plugin "z"', 0o600)])
    assert os.listdir(tmp_path) == []


def test_keys_are_written_in_bounded_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from aigis import _keys

    monkeypatch.setattr(_keys, "BATCH", 4)
    open_at_sync: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        open_at_sync.append(sum(1 for p in tmp_path.iterdir() if p.name.endswith(".tmp")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    create_missing_keys([(tmp_path / f"k{i}.key", f"key {i}", 0o600) for i in range(10)])
    assert len(open_at_sync) == 10 and max(open_at_sync) <= 4  # 4, 4, then 2 at most
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"k{i}.key" for i in range(10))


def test_a_key_is_created_once_with_its_mode(tmp_path):
    path = tmp_path / "keys" / "p.key"
    key = load_or_create_key(path, 'key of plugin "p"', PLUGIN_KEY_MODE)
    assert len(key) == KEY_BYTES
    assert os.stat(path).st_mode & 0o777 == PLUGIN_KEY_MODE
    assert load_or_create_key(path, 'key of plugin "p"', PLUGIN_KEY_MODE) == key


def test_a_huge_key_file_is_refused_not_read_into_memory(tmp_path):
    """On the embedded backend a plugin's account owns its key file and may grow it; the core
    reading it whole would hold that much memory."""
    path = tmp_path / "p.key"
    with open(path, "wb") as out:
        out.truncate(256 << 20)  # sparse: no disk used
    with pytest.raises(AigisError, match=r'the key of plugin "p" file .*p\.key is larger than'):
        load_or_create_key(path, 'key of plugin "p"', PLUGIN_KEY_MODE)
