"""The AIGIS wire format: framing, pickle-first/dill-fallback encoding, exception packing.

Pure: no sockets here. Frames use multiprocess.connection's layout (4-byte big-endian signed
length, then the payload), so a multiprocess ``Client`` can authenticate against the core.
A payload is one tag byte (``P`` pickle, ``D`` dill) followed by the pickle stream.
"""

from __future__ import annotations

import builtins
import os
import pickle
import site
import struct
import sys
import threading
from types import FunctionType

from aigis._errors import RemoteError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:  # not at run time: the plugin runner starts faster without typing
    from collections.abc import Sequence
    from typing import Any

Buffer = bytes | bytearray | memoryview

MAX_MESSAGE = 256 * 1024 * 1024  # cap per frame: a bad length prefix must never allocate GiBs
HEADER = struct.Struct("!i")
PICKLE_TAG = b"P"
DILL_TAG = b"D"
PROTOCOL = 5
_PICKLE_BYTE = PICKLE_TAG[0]
_DILL_BYTE = DILL_TAG[0]

_OK = True
_FAILED = False


class FrameError(ValueError):
    """A frame header announces a size that is negative or over the limit."""


class NotShared(pickle.PicklingError):
    """Pickle refused an object whose module the peer process cannot import."""


def frame_header(size: int, limit: int = MAX_MESSAGE) -> bytes:
    """The 4-byte length prefix for a payload of ``size`` bytes."""
    if size > limit:
        raise FrameError(f"message of {size} bytes exceeds the {_human(limit)} limit")
    return HEADER.pack(size)


def frame_size(header: Buffer, limit: int = MAX_MESSAGE, offset: int = 0) -> int:
    """The payload size announced by the 4-byte header at ``offset``, checked before allocating."""
    (size,) = HEADER.unpack_from(header, offset)
    if size < 0:
        # multiprocess uses -1 to announce a 64-bit length; that is always over our cap
        raise FrameError(f"message announces an oversized or negative length ({size})")
    if size > limit:
        raise FrameError(f"message of {size} bytes exceeds the {_human(limit)} limit")
    return size


def _human(limit: int) -> str:
    if limit >= 1024 * 1024 and limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    return f"{limit}-byte"


# --- which modules the peer can import -------------------------------------------------------

_shared_dirs: tuple[str, ...] | None = None
_shared_cache: dict[str, bool] = {}


def _shared_roots() -> tuple[str, ...]:
    global _shared_dirs
    if _shared_dirs is None:
        import sysconfig

        paths = sysconfig.get_paths()
        dirs = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
        _shared_dirs = tuple(
            os.path.join(os.path.realpath(d), "") for d in dirs if d and os.path.isdir(d)
        )
    return _shared_dirs


def is_shared_module(name: str | None) -> bool:
    """Whether the peer process can import module ``name``.

    Core and plugins run the same interpreter, so they share the standard library and
    site-packages (and ``aigis``); code anywhere else (a plugin's directory, ``__main__``)
    is only importable on this side and must travel by value.
    """
    if not name or name == "__main__":
        return False
    cached = _shared_cache.get(name)
    if cached is not None:
        return cached
    top = name.partition(".")[0]
    if top == "aigis" or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        shared = True
    else:
        module = sys.modules.get(name)
        files = [getattr(module, "__file__", None)]
        files += list(getattr(module, "__path__", None) or ())
        roots = _shared_roots()
        real = [os.path.realpath(f) for f in files if f]
        shared = bool(real) and all(f.startswith(roots) for f in real)
    _shared_cache[name] = shared
    return shared


# --- encoding --------------------------------------------------------------------------------


class _Parts:
    """A write-only file collecting the pickler's output without joining it."""

    __slots__ = ("parts", "write")

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        # the C pickler hands large bytes payloads over as-is: no copy of a 1 MiB result
        self.write = self.parts.append


class _SharedPickler(pickle.Pickler):
    """The C pickler, refusing classes and functions the peer cannot import."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | FunctionType) and not is_shared_module(
            getattr(obj, "__module__", None)
        ):
            raise NotShared(f"{obj.__module__}.{obj.__qualname__} is not importable by the peer")
        return NotImplemented


_dill_pickler: Any = None
_dill_lock = threading.Lock()


def dill_missing() -> str | None:
    """Why values pickle refuses cannot travel, when dill cannot be found (it is imported only
    when first needed, so a core would otherwise learn it at a call); None when it is there."""
    import importlib.util

    if importlib.util.find_spec("dill") is not None:
        return None
    return (
        "dill is not installed: results and arguments that pickle cannot encode (lambdas, "
        "classes defined in a plugin) will fail to travel; install dill (Debian: python3-dill)"
    )


def _dill_pickler_class() -> Any:
    """dill's pickler, set up so non-shared classes and functions ship by value."""
    global _dill_pickler
    with _dill_lock:
        if _dill_pickler is None:
            import dill
            import dill._dill as dill_impl

            class ByValuePickler(dill.Pickler):
                """dill, shipping classes and functions of non-shared modules by value."""

            # dill only ships a class by value when it cannot find it by name; the core *can*
            # import plugin modules, the plugin cannot, so decide by module (dill has no API).
            locate = dill_impl._locate_function
            if not getattr(locate, "_aigis_by_value", False):

                def _locate_function(obj: Any, pickler: Any = None) -> bool:
                    if isinstance(pickler, ByValuePickler) and not is_shared_module(
                        getattr(obj, "__module__", None)
                    ):
                        return False
                    return locate(obj, pickler)

                _locate_function._aigis_by_value = True  # type: ignore[attr-defined]
                _locate_function._aigis_pickler = ByValuePickler  # type: ignore[attr-defined]
                dill_impl._locate_function = _locate_function
                _dill_pickler = ByValuePickler
            else:  # installed by an earlier import of this module (e.g. a test's reload)
                _dill_pickler = locate._aigis_pickler
        return _dill_pickler


class _Encoder:
    """A reusable pickler and its output: building a Pickler costs more than a small call."""

    def __init__(self) -> None:
        self.out = _Parts()
        self.pickler = _SharedPickler(self.out, PROTOCOL)
        self.busy = False

    def encode(self, obj: Any) -> list[Buffer]:
        parts = self.out.parts
        parts.append(PICKLE_TAG)
        self.busy = True
        try:
            self.pickler.dump(obj)
        except Exception as pickle_error:
            parts.clear()
            parts.append(DILL_TAG)
            try:
                # recurse: a by-value function carries only the globals it uses, not its module
                _dill_pickler_class()(self.out, PROTOCOL, byref=False, recurse=True).dump(obj)
            except Exception as dill_error:
                parts.clear()
                raise dill_error from pickle_error
        finally:
            self.pickler.clear_memo()  # the memo keeps everything pickled alive
            self.busy = False
        result = parts[:]
        parts.clear()  # the pickler is bound to this list's append; empty it in place
        return result


_local = threading.local()


def encode(obj: Any) -> list[Buffer]:
    """Tag and pickle ``obj``: the C pickler first, dill (by value) only when pickle refuses."""
    try:
        encoder = _local.encoder
    except AttributeError:
        encoder = _local.encoder = _Encoder()
    if encoder.busy:  # re-entered from some __reduce__: do not disturb the outer pickle
        return _Encoder().encode(obj)
    return encoder.encode(obj)


def decode(data: Buffer) -> Any:
    """Inverse of :func:`encode`."""
    tag = data[0] if len(data) else None
    if tag == _PICKLE_BYTE:
        return pickle.loads(data[1:])
    if tag == _DILL_BYTE:
        import dill

        return dill.loads(bytes(data[1:]))
    raise ValueError(f"unknown payload tag {bytes(data[:1])!r}; expected b'P' or b'D'")


def message_size(parts: Sequence[Buffer]) -> int:
    """Total byte length of an encoded message."""
    return sum(memoryview(p).nbytes for p in parts)


# --- requests --------------------------------------------------------------------------------

# values that cannot refer to a class or function, pickled without the per-object checks;
# long strings take the checked, zero-copy path instead of pickle.dumps's copy
_ATOMS = frozenset({type(None), bool, int, float, complex})
_SHORT = frozenset({str, bytes})
_SHORT_MAX = 4096


def dotted(path: Sequence[str]) -> str:
    """``("a", "b")`` -> ``"aigis.a.b"`` for messages."""
    return ".".join(("aigis", *path))


def refusal(path: Sequence[str]) -> str | None:
    """Why the core refuses ``path`` before resolving it, or None when it may be resolved."""
    for name in path:
        if type(name) is not str:
            return f"malformed path {path!r}: every name must be a str"
        if name.startswith("__") and name.endswith("__"):
            return f"{dotted(path)}: dunder attribute {name!r} is never forwarded"
    if path and path[0].startswith("_"):
        return f"{dotted(path)}: names starting with '_' are AIGIS internals, not skills"
    for name in path[1:]:
        # Private attributes of skills stay private; this also closes walks such as
        # aigis.somemodule.aigis._daemon through a module skill that imported aigis.
        if name.startswith("_"):
            return f"{dotted(path)}: private attribute {name!r} is never forwarded"
    return None


def encode_request(path: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> list[Buffer]:
    """One call: the skill path and its arguments."""
    if not kwargs and _plain(args):
        # plain values only: nothing the peer could fail to import, so skip the checks
        return [PICKLE_TAG, pickle.dumps((path, args, kwargs), PROTOCOL)]
    return encode((path, args, kwargs))


def _plain(args: tuple) -> bool:
    """Whether every value in ``args`` is an atom or a short str/bytes (see _ATOMS)."""
    for arg in args:
        kind = type(arg)
        if kind not in _ATOMS and (kind not in _SHORT or len(arg) > _SHORT_MAX):
            return False
    return True


def call_frame(path: tuple[str, ...], args: tuple, limit: int = MAX_MESSAGE) -> bytes | None:
    """The whole frame, header included, of a call without keyword arguments whose arguments
    are all plain values: the bytes ``encode_request`` gives, in one piece (one copy, no list).
    None when an argument is not plain: the caller takes ``encode_request``."""
    if not _plain(args):
        return None
    payload = pickle.dumps((path, args, {}), PROTOCOL)
    return b"".join((frame_header(len(payload) + 1, limit), PICKLE_TAG, payload))


def reply_frame(value: Any, limit: int = MAX_MESSAGE) -> bytes | list[Buffer]:
    """A successful reply carrying ``value``: the whole frame, header included, when it is a
    plain value (what ``encode_result`` gives, in one piece), else ``encode_result``'s parts."""
    kind = type(value)
    if kind in _ATOMS or (kind in _SHORT and len(value) <= _SHORT_MAX):
        payload = pickle.dumps((_OK, value), PROTOCOL)
        if len(payload) < limit:
            return b"".join((HEADER.pack(len(payload) + 1), PICKLE_TAG, payload))
    return encode_result(value)


def plain_call(path: tuple[str, ...]) -> bytes:
    """The payload of a call of ``path`` without arguments: always these bytes, so both ends may
    keep it instead of pickling or unpickling it per call."""
    return PICKLE_TAG + pickle.dumps((path, (), {}), PROTOCOL)


def decode_request(data: Buffer) -> tuple[tuple[str, ...], tuple, dict[str, Any]]:
    """Inverse of :func:`encode_request`; a malformed request raises TypeError.

    Only the shape is checked here; :func:`refusal` checks the names.
    """
    # the usual tag inline: one call less per request
    request = pickle.loads(data[1:]) if len(data) and data[0] == _PICKLE_BYTE else decode(data)
    if type(request) is tuple and len(request) == 3:
        path, args, kwargs = request
        if type(path) is tuple and path and type(args) is tuple and type(kwargs) is dict:
            return path, args, kwargs
    raise TypeError("malformed request: expected (path, args, kwargs)")


# --- replies and exceptions ------------------------------------------------------------------


NONE_RESULT = PICKLE_TAG + pickle.dumps((_OK, None), PROTOCOL)  # what most skills return
_NONE_SIZE = len(NONE_RESULT)
_NONE_REPLY = (True, None)


def encode_result(value: Any) -> list[Buffer]:
    """A successful reply carrying ``value``."""
    kind = type(value)
    if kind in _ATOMS or (kind in _SHORT and len(value) <= _SHORT_MAX):
        # cannot refer to a class or function: the plain (faster) pickle is safe; big strings
        # take the zero-copy path below
        return [PICKLE_TAG, pickle.dumps((_OK, value), PROTOCOL)]
    return encode((_OK, value))


def encode_error(exc: BaseException) -> list[Buffer]:
    """A failed reply carrying ``exc`` (see :func:`pack_exception`)."""
    return encode((_FAILED, pack_exception(exc)))


def decode_reply(data: Buffer) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception ready to raise)``."""
    if len(data) == _NONE_SIZE and data == NONE_RESULT:
        return _NONE_REPLY
    reply = pickle.loads(data[1:]) if len(data) and data[0] == _PICKLE_BYTE else decode(data)
    if reply.__class__ is tuple and len(reply) == 2 and reply[0] is True:
        return reply  # the usual success: as unpickled, not unpacked and packed again
    ok, value = reply
    if ok:
        return True, value
    return False, unpack_exception(value)


def _pickle_shared(obj: Any) -> bytes:
    out = _Parts()
    _SharedPickler(out, PROTOCOL).dump(obj)  # not the thread's pickler: encode() may be using it
    return b"".join(out.parts)


def builtin_base(cls: type) -> type:
    """The nearest builtin ancestor of an exception class (``Exception`` at worst)."""
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":
            return klass
    return Exception


def pack_exception(exc: BaseException) -> tuple:
    """Plain data describing ``exc``: its pickle when the peer can import it, plus a fallback."""
    cls = type(exc)
    import traceback  # only when a call fails

    text = "".join(traceback.format_exception(exc))
    try:
        blob: bytes | None = _pickle_shared(exc)
    except Exception:
        blob = None
    try:
        _pickle_shared(exc.args)
        args = exc.args
    except Exception:
        args = (str(exc),)
    return (blob, cls.__module__, cls.__qualname__, builtin_base(cls).__name__, args, text)


_remote_classes: dict[tuple[str, str, str], type] = {}
_remote_lock = threading.Lock()


def remote_error_class(module: str, qualname: str, base_name: str) -> type[BaseException]:
    """The generated ``RemoteError`` subclass standing in for a class we cannot import (cached)."""
    key = (module, qualname, base_name)
    with _remote_lock:
        cls = _remote_classes.get(key)
        if cls is None:
            base = getattr(builtins, base_name, Exception)
            if not (isinstance(base, type) and issubclass(base, BaseException)):
                base = Exception
            namespace = {"__module__": module, "__qualname__": qualname}
            name = qualname.rpartition(".")[2]
            bases = (RemoteError,) if issubclass(RemoteError, base) else (RemoteError, base)
            cls = type(name, bases, namespace)
            _remote_classes[key] = cls
        return cls


def unpack_exception(packed: tuple) -> BaseException:
    """Rebuild an exception from :func:`pack_exception`, with the core's traceback attached."""
    blob, module, qualname, base_name, args, text = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None  # the plugin cannot import the class: fall back to a generated one
        if not isinstance(exc, BaseException):
            exc = None
    if exc is None:
        cls = remote_error_class(module, qualname, base_name)
        try:
            exc = cls(*args)
        except Exception:
            exc = cls.__new__(cls)
            exc.args = tuple(args)
    exc.remote_traceback = text  # type: ignore[attr-defined]
    exc.add_note(f"--- raised in the AIGIS core ---\n{text.rstrip()}")
    return exc
