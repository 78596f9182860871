"""Directories the core creates get their mode explicitly, whatever the umask."""

from __future__ import annotations

import os
import stat

from aigis._paths import make_dir


def test_new_directories_are_0750_whatever_the_umask(tmp_path):
    old = os.umask(0o077)  # e.g. UMask=0077: mkdir alone would give 0700
    try:
        make_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, path


def test_an_existing_directory_keeps_its_mode(tmp_path):
    (tmp_path / "kept").mkdir(mode=0o755)
    os.chmod(tmp_path / "kept", 0o755)
    make_dir(tmp_path / "kept" / "new")
    assert stat.S_IMODE((tmp_path / "kept").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "kept" / "new").stat().st_mode) == 0o750
