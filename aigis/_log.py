"""Logging set-up: console for humans; under journald native records (``AIGIS_PLUGIN=``) or
plain lines without timestamps; plugin loggers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from aigis._redact import redact

PLUGIN_LOGGER = "aigis.plugin"


def plugin_logger(name: str) -> logging.Logger:
    """The logger handed to ``name``'s skills: ``aigis.plugin.<name>``."""
    return logging.getLogger(f"{PLUGIN_LOGGER}.{name}")


def about(name: str) -> dict[str, Any]:
    """``**about(name)`` in a log call: journald gets the plugin as the AIGIS_PLUGIN field."""
    return {"extra": {"plugin": name}}


def under_journald() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _PluginField(logging.Filter):
    """Adds ``record.plugin`` (from ``extra=`` or the logger name) and ``record.priority``, and
    masks credentials in the message (a git URL with a token must never reach a log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if not hasattr(record, "plugin"):
            prefix = PLUGIN_LOGGER + "."
            record.plugin = record.name[len(prefix) :] if record.name.startswith(prefix) else ""
        # journald reads a leading <N> as the syslog priority of the line.
        record.priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return True


def journal_handler() -> logging.Handler | None:
    """A handler sending records to journald natively, with ``AIGIS_PLUGIN=`` for records about
    a plugin; None without systemd-python (the ``systemd`` extra)."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None

    class PluginJournalHandler(JournalHandler):
        """JournalHandler that sends our fields only: its own emit sends every record attribute
        (args, msg, plugin, ...) as a field."""

        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields = {"LOGGER": record.name, "THREAD_NAME": record.threadName}
                plugin = getattr(record, "plugin", "")
                if plugin:
                    fields["AIGIS_PLUGIN"] = plugin
                self.send(
                    self.format(record),
                    PRIORITY=str(self.map_priority(record.levelno)),
                    CODE_FILE=record.pathname,
                    CODE_LINE=record.lineno,
                    CODE_FUNC=record.funcName,
                    **self._extra,
                    **fields,
                )
            except Exception:
                self.handleError(record)

    return PluginJournalHandler(SYSLOG_IDENTIFIER="aigis")


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for the daemon."""
    journald = under_journald()
    handler = journal_handler() if journald else None
    if handler is not None:
        # journald adds the time, the pid and the unit; the level is PRIORITY=.
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    elif journald:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("<%(priority)d>%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    handler.addFilter(_PluginField())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
