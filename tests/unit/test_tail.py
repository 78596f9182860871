"""``aigisctl logs`` helpers: the last N lines, and following across rotation."""

from aigis._tail import follow, last_lines


def test_last_lines_reads_across_blocks_and_keeps_bytes(tmp_path):
    log = tmp_path / "p.log"
    log.write_bytes(b"".join(b"line %d \xff\n" % i for i in range(1000)))
    assert last_lines(log, 3, block=16) == [
        b"line 997 \xff\n",
        b"line 998 \xff\n",
        b"line 999 \xff\n",
    ]
    assert len(last_lines(log, 5000)) == 1000
    assert last_lines(tmp_path / "missing.log", 3) == []
    assert last_lines(log, 0) == []


def test_follow_sees_appends_and_the_file_after_rotation(tmp_path):
    log = tmp_path / "p.log"
    log.write_bytes(b"old\n")
    chunks = follow(log, interval=0.01, stop_after=5)
    with open(log, "ab") as handle:
        handle.write(b"new\n")
    assert next(chunks) == b"new\n"
    log.rename(tmp_path / "p.log.1")
    log.write_bytes(b"after rotation\n")
    assert next(chunks) == b"after rotation\n"
    chunks.close()
