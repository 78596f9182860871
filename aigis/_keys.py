"""Key files: random secrets created once with an explicit mode, read with errors naming the file.

The core holds several keys (the operators' control key, the plugins' authkey); each lives in
its own file so that file permissions decide who holds which capability.
"""

from __future__ import annotations

import logging
import os
import stat
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
    key = os.urandom(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        make_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fchmod(fd, mode)  # explicit: the umask must not decide who can read it
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() is atomic and fails if another process created the key first: readers never
        # see a half-written file, and two processes starting at once agree on one key
        os.link(tmp, path)
    except FileExistsError:
        return _read_bounded(path)
    except OSError as exc:
        raise AigisError(f"cannot create the {what} file {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created: %s file %s (mode %04o)", what, path, mode)
    return key
