"""Plugin output into a log file that can fail: dropped, counted, said once, resumed; no raise."""

from __future__ import annotations

import errno
import logging

import pytest

from aigis._supervise.logsink import LogSink


class FlakyFile:
    """A RotatingFile stand-in whose writes fail with ENOSPC while ``full``."""

    def __init__(self) -> None:
        self.full = False
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.full:
            exc = OSError(errno.ENOSPC, "No space left on device")
            exc.stored = 0  # type: ignore[attr-defined]
            raise exc
        self.data += data
        return len(data)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def sink(tmp_path):
    sink = LogSink("p", tmp_path / "p.log", console=None)
    sink._file.close()
    sink._file = FlakyFile()
    return sink


def messages(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records]


def test_a_full_disk_drops_output_once_per_episode_and_resumes(sink, caplog):
    caplog.set_level(logging.INFO, logger="aigis._supervise.logsink")
    stream = sink.stream()
    stream.feed(b"before\n")
    sink._file.full = True
    for _ in range(1000):
        stream.feed(b"lost line\n")
    assert sink.dropped == 10_000
    assert messages(caplog) == ["dropped"]  # one line for the whole episode
    sink._file.full = False
    stream.feed(b"after\n")
    assert sink._file.data == b"before\nafter\n"
    assert messages(caplog) == ["dropped", "resumed"]
    assert "after dropping 10000 bytes" in caplog.records[-1].getMessage()
    assert (sink.dropped, sink.dropped_total) == (0, 10_000)
    sink._file.full = True
    stream.feed(b"again\n")
    assert messages(caplog) == ["dropped", "resumed", "dropped"]  # a new episode


def test_close_never_raises_and_reports_what_was_lost(sink, caplog):
    stream = sink.stream()
    sink._file.full = True
    stream.feed(b"partial line without end")
    stream.close()  # EOF: the partial line is written (and dropped)
    file = sink._file
    sink.close(timeout=0)
    assert file.closed
    assert messages(caplog)[-1] == "dropped"
    assert "24 bytes of log output in the end" in caplog.records[-1].getMessage()
    stream2 = sink.stream()
    stream2.feed(b"a straggler after close\n")  # dropped silently: the file is closed
    stream2.close()


def test_drain_waits_for_every_stream(sink):
    first, second = sink.stream(), sink.stream()
    first.close()
    assert not sink.drain(0)
    second.close()
    assert sink.drain(0)


def test_a_log_that_cannot_be_opened_drops_until_it_can(tmp_path, caplog, monkeypatch):
    """The plugin starts anyway; its output is dropped, then written once the file opens."""
    blocker = tmp_path / "log"
    blocker.write_text("a file where the log directory should be")
    sink = LogSink("p", blocker / "p.log", console=None)  # no raise
    stream = sink.stream()
    stream.feed(b"lost\n")
    assert sink.dropped == 5
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["dropped"]
    blocker.unlink()
    monkeypatch.setattr(sink, "_retry_at", 0.0)  # instead of waiting a second
    stream.feed(b"kept\n")
    assert (blocker / "p.log").read_bytes() == b"kept\n"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["dropped", "resumed"]
    stream.close()
    sink.close(timeout=0)


def test_log_files_and_their_directory_are_not_readable_by_others(tmp_path):
    import os
    import stat

    from aigis._supervise.logsink import RotatingFile

    old = os.umask(0o022)  # what a shell leaves: files would be 0644, directories 0755
    try:
        log = RotatingFile(tmp_path / "log" / "p.log", max_bytes=10, backups=1)
        log.write(b"a token the plugin printed\n")
        log.write(b"more than ten bytes\n")  # rotates: the new file too
        log.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "log").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "log" / "p.log").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "log" / "p.log.1").stat().st_mode) == 0o640


def test_counts_are_lines_as_the_console_shows_them_and_bytes_dropped(sink):
    from aigis._supervise.base import OutputCounts
    from aigis._supervise.logsink import MAX_PARTIAL

    stream = sink.stream()
    stream.feed(b"one\ntwo\nthr")  # two whole lines; "thr" waits for its end
    assert sink.counts() == OutputCounts(lines=2, dropped_bytes=0)
    stream.feed(b"ee\n\n")  # "three" and an empty line
    sink._file.full = True
    stream.feed(b"lost\n")
    stream.feed(b"x" * MAX_PARTIAL)  # no newline, but too long to hold: out as one line
    assert sink.counts() == OutputCounts(lines=6, dropped_bytes=5 + MAX_PARTIAL)
    stream.feed(b"tail")
    stream.close()  # EOF: the partial line goes out too
    assert sink.counts() == OutputCounts(lines=7, dropped_bytes=9 + MAX_PARTIAL)
