"""Key files: random secrets created once with an explicit mode, read with errors naming the file.

The core holds several keys (the operators' control key, the plugins' authkey); each lives in
its own file so that file permissions decide who holds which capability.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from aigis._errors import AigisError
from aigis._paths import make_dir

log = logging.getLogger(__name__)

KEY_BYTES = 32
KEY_MODE = 0o640  # the core's group (aigis under systemd) may read it; nobody else
#: Larger files are not keys: never read whole (a plugin's account owns its key file).
MAX_KEY_FILE = 4096
PLUGIN_KEY_MODE = 0o600  # a plugin's own key: root's; its unit gets it as a credential


def load_or_create_key(path: Path, what: str, mode: int = KEY_MODE) -> bytes:
    """The key in ``path``, created once (random bytes, ``mode``) if it does not exist; an
    existing file readable by more than ``mode`` allows is tightened to ``mode``."""
    path = Path(path)
    try:
        key = _read_bounded(path)
    except FileNotFoundError:
        key = _create(path, what, mode)
    except OSError as exc:
        raise AigisError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    else:
        _tighten(path, what, mode)
    if not key:
        raise AigisError(f"the {what} file {path} is empty")
    if len(key) > MAX_KEY_FILE:
        raise AigisError(
            f"the {what} file {path} is larger than {MAX_KEY_FILE} bytes: not a key AIGIS "
            "made; remove it to make a new one"
        )
    return key


def _read_bounded(path: Path) -> bytes:
    """At most MAX_KEY_FILE + 1 bytes of ``path``: a key file its reader's account did not
    write (a plugin's, on the embedded backend) could be any size."""
    with open(path, "rb") as stream:
        return stream.read(MAX_KEY_FILE + 1)


def _tighten(path: Path, what: str, mode: int) -> None:
    """An older release created some keys with wider modes: take away what ``mode`` does not
    grant (the file's group stays)."""
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
        if current & ~mode:
            os.chmod(path, current & mode)
            log.warning(
                "tightened: %s file %s from %04o to %04o", what, path, current, current & mode
            )
    except OSError as exc:
        raise AigisError(f"cannot restrict the {what} file {path}: {exc.strerror}") from None


def _create(path: Path, what: str, mode: int) -> bytes:
    try:
        tmp, key = _write(path, mode)
    except OSError as exc:
        raise AigisError(f"cannot create the {what} file {path}: {exc.strerror}") from None
    try:
        os.fsync(tmp.fd)
    except OSError as exc:
        tmp.discard()
        raise AigisError(f"cannot create the {what} file {path}: {exc.strerror}") from None
    return _publish(tmp, path, what, mode, key)


class _Pending:
    """A key written to its temporary file, not yet linked into place."""

    __slots__ = ("fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def discard(self) -> None:
        """Close and remove the temporary file."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.path.unlink(missing_ok=True)


def _write(path: Path, mode: int) -> tuple[_Pending, bytes]:
    """A fresh key in a temporary file beside ``path`` (open; the caller syncs it)."""
    key = os.urandom(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    make_dir(path.parent)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    pending = _Pending(tmp, fd)
    try:
        os.write(fd, key)
        os.fchmod(fd, mode)  # explicit: the umask must not decide who can read it
    except BaseException:
        pending.discard()
        raise
    return pending, key


def _publish(tmp: _Pending, path: Path, what: str, mode: int, key: bytes) -> bytes:
    """Link the synced temporary file to ``path``; the key that is there now."""
    try:
        os.close(tmp.fd)
        # link() is atomic and fails if another process created the key first: readers never
        # see a half-written file, and two processes starting at once agree on one key
        os.link(tmp.path, path)
    except FileExistsError:
        return _read_bounded(path)
    except OSError as exc:
        raise AigisError(f"cannot create the {what} file {path}: {exc.strerror}") from None
    finally:
        tmp.path.unlink(missing_ok=True)
    log.info("created: %s file %s (mode %04o)", what, path, mode)
    return key


SYNC_THREADS = 16
BATCH = 128  # keys written before their fsyncs: bounds the files held open at once


def create_missing_keys(keys: Sequence[tuple[Path, str, int]]) -> None:
    """Create each missing key file of ``keys`` (path, what, mode) in batches: the fsyncs of a
    batch run side by side, so the file system commits them together (a first start with 100
    plugins waits for a few journal commits instead of 100 one after another). A key that fails
    here is left for ``load_or_create_key``, which tries again and names the file."""
    missing = [(Path(path), what, mode) for path, what, mode in keys if not os.path.lexists(path)]
    for start in range(0, len(missing), BATCH):
        _create_batch(missing[start : start + BATCH])


def _create_batch(keys: list[tuple[Path, str, int]]) -> None:
    pending: list[tuple[_Pending, Path, str, int, bytes]] = []
    for path, what, mode in keys:
        try:
            tmp, key = _write(path, mode)
        except OSError:
            continue
        pending.append((tmp, path, what, mode, key))
    synced = _fsync_all([tmp.fd for tmp, *_ in pending])
    for tmp, path, what, mode, key in pending:
        if tmp.fd in synced:
            with contextlib.suppress(AigisError):
                _publish(tmp, path, what, mode, key)
        else:
            tmp.discard()


def _fsync_all(fds: list[int]) -> set[int]:
    """fsync every fd, from up to SYNC_THREADS threads; the fds that synced."""
    todo, done = list(fds), set()
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                fd = todo.pop()
            try:
                os.fsync(fd)
            except OSError:
                continue
            with lock:
                done.add(fd)

    threads = [threading.Thread(target=work) for _ in range(min(SYNC_THREADS, len(fds)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done
