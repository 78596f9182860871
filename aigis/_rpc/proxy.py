"""The ``aigis`` that plugin processes import: immutable skill paths, one round trip per call."""

from __future__ import annotations

import sys
import types

from aigis._errors import AigisError, CoreUnavailable, RemoteError
from aigis._rpc import wire
from aigis._version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

_PATH = "__aigis_path__"
_CLIENT = "__aigis_client__"


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class SkillPath:
    """``aigis.a.b``: an immutable path; calling it evaluates the whole path in the core."""

    # state lives in dunder slots, which are never forwarded, so no skill name is shadowed
    __slots__ = (_PATH, _CLIENT)
    __aigis_path__: tuple[str, ...]
    __aigis_client__: Any

    def __init__(self, client: Any, path: tuple[str, ...]) -> None:
        object.__setattr__(self, _CLIENT, client)
        object.__setattr__(self, _PATH, path)

    def __getattr__(self, name: str) -> SkillPath:
        if _is_dunder(name):
            # copy, pickle, inspect and friends probe dunders; they must not become RPCs
            raise AttributeError(name)
        return SkillPath(self.__aigis_client__, (*self.__aigis_path__, name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__aigis_client__.call(self.__aigis_path__, args, kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self!r} is immutable; skills are changed in the core")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self!r} is immutable; skills are changed in the core")

    def __repr__(self) -> str:
        return f"<aigis proxy {wire.dotted(self.__aigis_path__)}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkillPath):
            return NotImplemented
        return (
            self.__aigis_client__ is other.__aigis_client__
            and self.__aigis_path__ == other.__aigis_path__
        )

    def __hash__(self) -> int:
        return hash(self.__aigis_path__)

    def __copy__(self) -> SkillPath:
        return self

    def __deepcopy__(self, memo: dict) -> SkillPath:
        return self

    def __reduce__(self) -> tuple:
        # a pickled path means "this skill": it is looked up again wherever it is unpickled,
        # so a path passed to the core arrives as the real skill
        return (rebuild_path, (self.__aigis_path__,))


def rebuild_path(path: tuple[str, ...]) -> Any:
    """``aigis.<path>`` in this process (the proxy in a plugin, the live skill in the core)."""
    reason = wire.refusal(path)
    if reason is not None:
        raise PermissionError(reason)
    target: Any = sys.modules["aigis"]
    for name in path:
        target = getattr(target, name)
    return target


def make_proxy_module(client: Any) -> types.ModuleType:
    """The module plugin code sees as ``aigis``: every public name is a skill path."""
    module = types.ModuleType(
        "aigis",
        "AIGIS proxy: aigis.<skill path>(...) runs in the AIGIS core.\n\n"
        "Only `import aigis` is supported; constants are read by calling them.",
    )
    module.AigisError = AigisError  # type: ignore[attr-defined]
    module.CoreUnavailable = CoreUnavailable  # type: ignore[attr-defined]
    module.RemoteError = RemoteError  # type: ignore[attr-defined]
    module.__version__ = __version__  # type: ignore[attr-defined]
    module.__all__ = ["AigisError", "CoreUnavailable", "RemoteError"]  # type: ignore[attr-defined]

    def __getattr__(name: str) -> SkillPath:  # noqa: N807 - the module-level hook (PEP 562)
        if _is_dunder(name):
            raise AttributeError(f"module 'aigis' has no attribute {name!r}")
        return SkillPath(client, (name,))

    setattr(module, "__getattr__", __getattr__)  # noqa: B010 - PEP 562 hook on a module object
    setattr(module, _CLIENT, client)
    return module
