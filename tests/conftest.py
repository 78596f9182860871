"""Shared fixtures: building plugins and configs on disk."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aigis
from aigis._config import Settings, parse_config


def write_plugin(
    root: Path, config: str, core: str | None = None, files: dict[str, str] | None = None
) -> Path:
    """Create a plugin directory with AIGIS/AIGIS.config, optional AIGIS.core and files."""
    (root / "AIGIS").mkdir(parents=True, exist_ok=True)
    (root / "AIGIS" / "AIGIS.config").write_text(textwrap.dedent(config))
    if core is not None:
        (root / "AIGIS" / "AIGIS.core").write_text(textwrap.dedent(core))
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def make_plugin(tmp_path: Path) -> Callable[..., Path]:
    """``make_plugin(name, config, core=None, files=None)`` under tmp_path/src/<name>."""

    def make(
        name: str, config: str, core: str | None = None, files: dict[str, str] | None = None
    ) -> Path:
        return write_plugin(tmp_path / "src" / name, config, core, files)

    return make


@pytest.fixture
def clean_aigis():
    """Remove every skill attribute a test installed on the real ``aigis`` module."""
    before = set(vars(aigis))
    yield aigis
    for name in set(vars(aigis)) - before:
        delattr(aigis, name)


def settings_for(root: Path, **overrides: Any) -> Settings:
    """``[aigis]`` settings with every directory under ``root``, defaults otherwise."""
    text = f'[aigis]\nstate_dir = "{root / "state"}"\nruntime_dir = "{root / "run"}"\n'
    settings = parse_config(text, root / "aigis.toml").settings
    return dataclasses.replace(settings, **overrides)
