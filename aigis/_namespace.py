"""The shared skill namespace: dotted SKILLS paths installed as attributes of ``aigis``.

Registration is validated whole before anything is installed (all-or-nothing per plugin);
every path remembers its owning plugin so collisions name both sides.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aigis._errors import SkillError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BUILTIN_OWNER = "aigis"


class Node:
    """An intermediate namespace level (``aigis.a`` when a skill is ``a.b``)."""

    _aigis_path: str

    def __init__(self, path: str) -> None:
        self.__dict__["_aigis_path"] = path

    def __repr__(self) -> str:
        names = ", ".join(sorted(k for k in self.__dict__ if not k.startswith("_aigis")))
        return f"<aigis namespace {self._aigis_path}: {names}>"

    def __dir__(self) -> list[str]:
        return sorted(k for k in self.__dict__ if not k.startswith("_aigis"))


@dataclass(frozen=True)
class Skill:
    """One registered leaf: its dotted path, owner, and kind (function, class, value)."""

    path: str
    plugin: str
    kind: str


def accepts_logger(obj: Callable[..., Any]) -> bool:
    """True when ``obj``'s signature has a ``logger`` parameter or ``**kwargs``."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return False  # builtins without a signature: never guess
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            return True
        if param.name == "logger" and param.kind in (
            param.KEYWORD_ONLY,
            param.POSITIONAL_OR_KEYWORD,
        ):
            return True
    return False


def with_logger(obj: Callable[..., Any], logger: logging.Logger) -> Callable[..., Any]:
    """Wrap ``obj`` so calls get ``logger=`` unless the caller gave one."""

    @functools.wraps(obj)
    def skill(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("logger", logger)
        return obj(*args, **kwargs)

    return skill


def kind_of(obj: object) -> str:
    """``class``, ``function`` (any other callable) or ``value``."""
    if isinstance(obj, type):
        return "class"
    return "function" if callable(obj) else "value"


class Namespace:
    """Owns the skill tree rooted at a module-like object (the ``aigis`` package)."""

    def __init__(self, root: Any, reserved: Iterable[str] = ()) -> None:
        self.root = root
        self._owner: dict[str, Skill] = {}
        # Names that belong to AIGIS's documented API; skills cannot take them.
        self._reserved = set(reserved)

    def skills(self) -> list[Skill]:
        """Every registered leaf, sorted by path."""
        owners = dict(self._owner)  # RPC threads read while a reload writes
        return [owners[p] for p in sorted(owners)]

    def plan(
        self,
        plugin: str,
        source: Any,
        names: Iterable[object],
        origin: str,
    ) -> dict[str, object]:
        """Validate ``names`` against ``source`` (the AIGIS.core module): path -> object.

        Raises SkillError listing every bad name; installs nothing.
        """
        problems: list[str] = []
        found: dict[str, object] = {}
        for name in names:
            if not isinstance(name, str):
                problems.append(
                    f"SKILLS entries must be dotted names (str), got "
                    f"{type(name).__name__} {name!r:.40}"
                )
                continue
            parts = name.split(".")
            if not all(_IDENT.fullmatch(p) for p in parts):
                problems.append(f'SKILLS entry "{name}" is not a dotted Python name')
                continue
            if any(p.startswith("_") for p in parts):
                problems.append(
                    f'SKILLS entry "{name}": names starting with "_" are private and never exposed'
                )
                continue
            if parts[0] in self._reserved:
                problems.append(
                    f'SKILLS entry "{name}": "aigis.{parts[0]}" is part of AIGIS\'s own API'
                )
                continue
            obj: object = source
            try:
                for part in parts:
                    obj = getattr(obj, part)
            except AttributeError:
                problems.append(f'SKILLS entry "{name}": {origin} has no attribute "{name}"')
                continue
            except Exception as exc:  # a property or lazy attribute that raises
                problems.append(
                    f'SKILLS entry "{name}": reading it raised {type(exc).__name__}: {exc}'
                )
                continue
            owner = self._owner_excluding(name, plugin)
            if owner is not None:
                problems.append(f'skill "aigis.{name}" is already registered by plugin "{owner}"')
                continue
            found[name] = obj
        for name in found:
            for other in found:
                if other.startswith(name + "."):
                    problems.append(
                        f'SKILLS lists both "{name}" and "{other}"; a skill cannot '
                        "also be a namespace"
                    )
        if problems:
            raise SkillError(plugin, "; ".join(problems) + f" ({origin})")
        return found

    def _owner_excluding(self, path: str, plugin: str) -> str | None:
        """Another plugin's claim on ``path`` (same path, a prefix, or below it)."""
        for other, skill in list(self._owner.items()):
            if skill.plugin == plugin:
                continue
            if other == path or other.startswith(path + ".") or path.startswith(other + "."):
                return skill.plugin
        return None

    def install(
        self, plugin: str, found: dict[str, object], logger: logging.Logger | None
    ) -> list[Skill]:
        """Install a validated plan, replacing whatever ``plugin`` had registered before."""
        self.remove(plugin)
        installed = []
        for path, obj in found.items():
            leaf: object = obj
            if (
                logger is not None
                and callable(obj)
                and not isinstance(obj, type)
                and accepts_logger(obj)
            ):
                leaf = with_logger(obj, logger)
            self._set(path, leaf)
            skill = Skill(path=path, plugin=plugin, kind=kind_of(obj))
            self._owner[path] = skill
            installed.append(skill)
        return installed

    def register(
        self,
        plugin: str,
        source: Any,
        names: Iterable[object],
        origin: str,
        logger: logging.Logger | None = None,
    ) -> list[Skill]:
        """Validate then install (all or nothing)."""
        return self.install(plugin, self.plan(plugin, source, names, origin), logger)

    def remove(self, plugin: str) -> None:
        """Unregister every path of ``plugin`` and prune emptied intermediate nodes."""
        for path in [p for p, s in self._owner.items() if s.plugin == plugin]:
            del self._owner[path]
            self._unset(path)

    def _set(self, path: str, value: object) -> None:
        parts = path.split(".")
        parent = self.root
        for depth, part in enumerate(parts[:-1]):
            child = parent.__dict__.get(part)
            if not isinstance(child, Node):
                child = Node("aigis." + ".".join(parts[: depth + 1]))
                setattr(parent, part, child)
            parent = child
        setattr(parent, parts[-1], value)

    def _unset(self, path: str) -> None:
        parts = path.split(".")
        chain = [self.root]
        for part in parts[:-1]:
            chain.append(chain[-1].__dict__[part])
        delattr(chain[-1], parts[-1])
        # Prune nodes left empty, deepest first.
        for depth in range(len(parts) - 1, 0, -1):
            node = chain[depth]
            if isinstance(node, Node) and not dir(node):
                delattr(chain[depth - 1], parts[depth - 1])
            else:
                break

    def resolve(self, path: tuple[str, ...]) -> object:
        """Walk ``path`` from the root for a remote call; refuse internals and dunders."""
        if not path:
            raise PermissionError("an empty path names the aigis module itself")
        for name in path:  # a loop, not any(<generator>): this runs on every call
            if name.startswith("_"):
                raise PermissionError(f"aigis.{'.'.join(path)} is not exposed")
        if path[0] not in self.root.__dict__:
            raise AttributeError(f"aigis has no skill {path[0]!r}")
        obj = self.root
        for depth, part in enumerate(path):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                where = "aigis." + ".".join(path[:depth])
                raise AttributeError(f"{where} has no attribute {part!r}") from None
        return obj
