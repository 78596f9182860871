"""Running the AIGIS daemon as a real subprocess in tests, with bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class DaemonProcess:
    """``python -m aigis -c CONFIG`` with stderr captured to a file we can poll."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = config.parent / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aigis", "-c", str(config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """Poll the log until ``text`` appears (bounded); return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log
            if text in log:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {text!r}:\n" + log
                )
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log}")

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``signum`` and wait (bounded) for the exit code."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout} s:\n{self.log}") from None

    def stop(self) -> None:
        """Finalizer: SIGTERM (the daemon stops its plugins), SIGKILL if it hangs, then kill
        any plugin process left behind (they run in their own sessions)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        kill_plugins_under(self.log_path.parent)
        self._log.close()


def kill_plugins_under(directory: Path) -> list[int]:
    """SIGKILL every process whose AIGIS_PLUGIN_DIR lies under ``directory``; their pids."""
    marker = f"AIGIS_PLUGIN_DIR={directory}/".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed
