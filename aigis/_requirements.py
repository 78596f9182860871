"""System requirements (checked with ``shutil.which``) and the requirements command."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from aigis._errors import RequirementsError
from aigis._paths import make_dir

log = logging.getLogger(__name__)


def check_system(plugin: str, requirements: tuple[str, ...], origin: str) -> None:
    """Raise RequirementsError listing every missing executable at once."""
    missing = [r for r in requirements if shutil.which(r) is None]
    if missing:
        raise RequirementsError(
            plugin,
            "missing system requirements: "
            + ", ".join(missing)
            + f" (SYSTEM_REQUIREMENTS in {origin}; not found on PATH)",
        )


def requirements_shell(command: str, file: str | None) -> str:
    """The documented form: the command, then the quoted requirements file."""
    return f"{command} {shlex.quote(file)}" if file else command


def fingerprint(command: str, file: str | None) -> str:
    """A digest of the command and the requirements file's content."""
    digest = hashlib.sha256(command.encode())
    if file:
        try:
            digest.update(Path(file).read_bytes())
        except OSError:
            digest.update(b"\0missing")
    return digest.hexdigest()


def install(
    plugin: str,
    command: str | None,
    file: str | None,
    *,
    cwd: Path,
    marker: Path,
    timeout: float,
    logger: logging.Logger,
    cancel: threading.Event | None = None,
) -> bool:
    """Run the requirements command unless its inputs are unchanged; True when it ran.

    ``cancel`` (set when AIGIS is asked to stop) kills the command at once.
    """
    if not command:
        if file:
            logger.warning(
                "skipped: requirements: REQUIREMENTS_FILE %s given without REQUIREMENTS_COMMAND",
                file,
            )
        return False
    if file and not Path(file).is_file():
        raise RequirementsError(plugin, f"REQUIREMENTS_FILE {file} does not exist")
    stamp = fingerprint(command, file)
    if marker.is_file() and marker.read_text().strip() == stamp:
        logger.info("skipped: requirements unchanged since the last successful install")
        return False
    shell = requirements_shell(command, file)
    logger.info("installing: requirements: %s", shell)
    try:
        returncode, output = _run_shell(shell, cwd, timeout, cancel)
    except Cancelled as exc:
        _log_output(logger, exc.output)
        raise RequirementsError(plugin, "requirements command stopped: AIGIS is stopping") from None
    except subprocess.TimeoutExpired as exc:
        _log_output(logger, exc.output or b"")
        raise RequirementsError(
            plugin, f"requirements command timed out after {timeout:g} s: {shell}"
        ) from None
    except OSError as exc:
        raise RequirementsError(plugin, f"requirements command could not run: {exc}") from None
    last = _log_output(logger, output)
    if returncode != 0:
        raise RequirementsError(
            plugin,
            f"requirements command failed (exit {returncode}): "
            f"{shell}" + (f"; last output: {last}" if last else ""),
        )
    make_dir(marker.parent)
    marker.write_text(stamp + "\n")
    logger.info("installed: requirements")
    return True


class Cancelled(Exception):
    """The requirements command was killed because AIGIS is stopping."""

    def __init__(self, output: bytes) -> None:
        super().__init__("cancelled")
        self.output = output


CANCEL_CHECK = 0.2  # seconds between looks at the cancel event while the command runs


def _run_shell(
    shell: str, cwd: Path, timeout: float, cancel: threading.Event | None = None
) -> tuple[int, bytes]:
    """Run ``shell`` in its own session; on timeout or cancel kill the whole group (pip's
    children too)."""
    with subprocess.Popen(
        shell,
        shell=True,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    ) as proc:
        deadline = time.monotonic() + timeout
        while True:
            # communicate() may be retried after a timeout without losing output.
            step = min(CANCEL_CHECK, max(0.0, deadline - time.monotonic()))
            try:
                output, _ = proc.communicate(timeout=step)
                return proc.returncode, output
            except subprocess.TimeoutExpired as exc:
                cancelled = cancel is not None and cancel.is_set()
                if not cancelled and time.monotonic() < deadline:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                if cancelled:
                    raise Cancelled(output) from None
                exc.output = output
                raise
            except BaseException:  # e.g. the load timed out: never leave the command running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise


def _log_output(logger: logging.Logger, output: bytes) -> str:
    """Log each output line; return the last non-empty one."""
    last = ""
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip():
            logger.info("requirements | %s", line)
            last = line.strip()
    return last
