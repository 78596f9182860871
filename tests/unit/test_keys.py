"""Key files: a file someone else could have filled is read within a bound."""

from __future__ import annotations

import os

import pytest

from aigis._errors import AigisError
from aigis._keys import KEY_BYTES, PLUGIN_KEY_MODE, load_or_create_key


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
