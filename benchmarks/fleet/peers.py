"""supervisord and circus, from PyPI, in their own venv (``benchmarks/.venv-peers``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGES = ("supervisor", "circus")
EXECUTABLES = ("supervisord", "supervisorctl", "circusd", "circusctl")


def ensure_peers(venv: Path) -> dict[str, str]:
    """Create ``venv`` with the peers on first use; their versions by package name."""
    if not all((venv / "bin" / exe).exists() for exe in EXECUTABLES):
        print(f"installing {', '.join(PACKAGES)} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PACKAGES],
            check=True,
            timeout=900,
        )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    versions = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {pkg: versions.get(pkg, "?") for pkg in PACKAGES}
