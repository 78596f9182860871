"""The AIGIS runtime shipped to remote hosts: what ``python -m aigis._runner`` imports there.

The ``aigis`` package and the proxy's pure-Python dependencies are copied from the core's own
interpreter into one directory (``<state>/remote-runtime``), which ``ship`` keeps equal to
``/var/lib/aigis/lib`` on each host (sending only changes). So a host needs python3 >= 3.11 and
nothing else, and runs the very code of the core that drives it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

__all__ = ["PACKAGES", "stage"]

#: Top-level modules internal plugins need on the host (all pure Python).
PACKAGES = ("aigis", "multiprocess", "_multiprocess", "dill", "sdnotify")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")


def locate(name: str) -> Path:
    """The directory (package) or file (module) ``name`` is imported from here."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"{name} is not installed for this interpreter")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    assert spec.origin is not None
    return Path(spec.origin)


def stage(target: Path) -> Path:
    """(Re)build ``target`` holding PACKAGES as the core imports them; returns ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True, mode=0o755)
    for name in PACKAGES:
        source = locate(name)
        if source.is_dir():
            shutil.copytree(source, target / source.name, ignore=_SKIP)
        else:
            shutil.copy2(source, target / source.name)
    return target
