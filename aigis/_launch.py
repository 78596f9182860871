"""What runs for an internal or external plugin: argv, environment, working directory (pure).

Every backend runs exactly this spec; only how it is kept alive differs.
"""

from __future__ import annotations

import sys

from aigis._config import Settings
from aigis._manifest import Manifest
from aigis._states import Kind
from aigis._supervise.base import ProcessSpec

#: The module an internal plugin's process runs (``python -m aigis._runner``).
RUNNER_MODULE = "aigis._runner"


def runner_argv(name: str, manifest: Manifest, python: str = sys.executable) -> tuple[str, ...]:
    """``python -m aigis._runner --name N --entrypoint D --launch L``."""
    return (
        python,
        "-m",
        RUNNER_MODULE,
        "--name",
        name,
        "--entrypoint",
        str(manifest.entrypoint),
        "--launch",
        str(manifest.launch),
    )


def process_spec(name: str, root: str, manifest: Manifest, settings: Settings) -> ProcessSpec:
    """The process of plugin ``name`` (checked out at ``root``) and how to supervise it."""
    kind = Kind(manifest.plugin_type)
    if kind not in (Kind.INTERNAL, Kind.EXTERNAL) or manifest.launch is None:
        raise ValueError(f'plugin "{name}": a {kind} plugin has no process')
    env = {
        "AIGIS_PLUGIN": name,
        "AIGIS_PLUGIN_DIR": root,
        "AIGIS_ADDRESS": str(settings.socket),
        "AIGIS_AUTHKEY_FILE": str(settings.authkey_file),
        "PYTHONUNBUFFERED": "1",
    }
    argv = runner_argv(name, manifest) if kind is Kind.INTERNAL else tuple(manifest.launch)
    return ProcessSpec(
        name=name,
        kind=kind,
        argv=argv,
        cwd=manifest.entrypoint,
        env=env,
        restart=manifest.restart,
        restart_delay=settings.restart_delay,
        restart_delay_max=settings.restart_delay_max,
        stop_timeout=settings.stop_timeout,
    )
