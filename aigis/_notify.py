"""sd_notify for the core: READY, STATUS, RELOADING, STOPPING and the watchdog ping."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd when ``NOTIFY_SOCKET`` is set; does nothing otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        watchdog_pid = env.get("WATCHDOG_PID")
        usec = int(env.get("WATCHDOG_USEC") or 0)
        # WATCHDOG_PID names the process the watchdog is for; another process must not ping.
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            usec = 0
        self.watchdog_interval = usec / 2e6 if usec else 0.0
        self._last_ping = 0.0
        self._notifier = None
        self._warned = False
        if self.enabled:
            import sdnotify

            # debug=True: sdnotify swallows send errors otherwise, and we want to log them.
            self._notifier = sdnotify.SystemdNotifier(debug=True)

    def send(self, message: str) -> None:
        """Send one notification; a failure is logged once, never raised."""
        if self._notifier is None:
            return
        try:
            self._notifier.notify(message)
        except OSError as exc:
            if not self._warned:
                log.warning("notify failed: %s (%s)", exc, message.split("\n")[0])
                self._warned = True

    def ready(self, status: str) -> None:
        """Startup or reload finished."""
        self.send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        """A reload began (MONOTONIC_USEC lets systemd >= 253 match it to the request)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading configuration")

    def stopping(self) -> None:
        """Shutdown began."""
        self.send("STOPPING=1\nSTATUS=stopping plugins")

    def status(self, text: str) -> None:
        """Update the one-line status shown by ``systemctl status``."""
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping at half the watchdog interval; call it from the main loop."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")
