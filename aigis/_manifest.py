"""Plugin manifests (``AIGIS/AIGIS.config``): parsed as literal assignments, never executed."""

from __future__ import annotations

import ast
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aigis._errors import ManifestError

MANIFEST = Path("AIGIS") / "AIGIS.config"
CORE_FILE = Path("AIGIS") / "AIGIS.core"
PLUGIN_TYPES = ("core", "internal", "external")
ROOT_TOKEN = "{root}"

# Both spellings are accepted: the documentation's examples and real plugins use the singular.
_ALIASES = {
    "REQUIREMENT_COMMAND": "REQUIREMENTS_COMMAND",
    "REQUIREMENT_FILE": "REQUIREMENTS_FILE",
}
_KNOWN = {
    "PLUGIN_TYPE",
    "ENTRYPOINT",
    "LAUNCH",
    "HOST",
    "RESTART",
    "SECRETS",
    "SYSTEM_REQUIREMENTS",
    "REQUIREMENTS_COMMAND",
    "REQUIREMENTS_FILE",
    *_ALIASES,
}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with ``{root}`` already substituted."""

    plugin_type: str
    entrypoint: Path
    launch: str | tuple[str, ...] | None = None
    host: str = "localhost"
    restart: int | None = None
    secrets: dict[str, str] = field(default_factory=dict)
    system_requirements: tuple[str, ...] = ()
    requirements_command: str | None = None
    requirements_file: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        """True when HOST names this machine."""
        return is_local_host(self.host)


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine (localhost, a loopback address or our own hostname)."""
    # gethostname() only: getfqdn() may wait on DNS, which a plugin load must never do.
    names = {"localhost", "127.0.0.1", "::1", "", socket.gethostname()}
    return host.strip().lower() in {n.lower() for n in names}


def substitute_root(value: str, root: Path) -> str:
    """Replace the ``{root}`` token (not ``str.format``: other braces survive)."""
    return value.replace(ROOT_TOKEN, str(root).rstrip("/") or "/")


def read_literals(text: str, filename: str) -> tuple[dict[str, object], list[str]]:
    """Parse ``NAME = literal`` statements; return (values, problems naming file:line)."""
    problems: list[str] = []
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as exc:
        return {}, [f"{filename}:{exc.lineno}: syntax error: {exc.msg}"]
    values: dict[str, object] = {}
    for index, node in enumerate(tree.body):
        where = f"{filename}:{node.lineno}"
        if (
            index == 0
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            continue  # module docstring
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            problems.append(
                f"{where}: only NAME = literal assignments are allowed, got "
                f"{ast.get_source_segment(text, node) or type(node).__name__!s:.60}"
            )
            continue
        name = node.targets[0].id
        try:
            values[name] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            segment = ast.get_source_segment(text, node.value) or "?"
            problems.append(
                f"{where}: {name} must be a literal (str, int, bool, None, list, "
                f"tuple, dict), got {segment:.60}"
            )
    return values, problems


def _type_name(value: object) -> str:
    return type(value).__name__


def parse_manifest(text: str, filename: str, root: Path, plugin: str) -> Manifest:
    """Validate manifest ``text`` for ``plugin`` fetched at ``root``; raise ManifestError."""
    values, problems = read_literals(text, filename)
    lines = _key_lines(text)

    def bad(key: str, message: str) -> None:
        line = lines.get(key)
        problems.append(
            f"{filename}:{line}: {key} {message}" if line else f"{filename}: {key} {message}"
        )

    warnings = [
        f"{filename}:{lines.get(k, '?')}: unknown key {k} (ignored)"
        for k in values
        if k not in _KNOWN
    ]
    for singular, plural in _ALIASES.items():
        if singular in values and plural in values:
            bad(singular, f"and {plural} are the same setting; give only one")
        elif singular in values:
            values[plural] = values.pop(singular)
            lines.setdefault(plural, lines.get(singular, 0))

    def optional_str(key: str) -> str | None:
        value = values.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            bad(key, f"must be a string, got {_type_name(value)}")
            return None
        return value

    plugin_type = values.get("PLUGIN_TYPE")
    if plugin_type is None:
        bad("PLUGIN_TYPE", "is required (core, internal or external)")
    elif plugin_type not in PLUGIN_TYPES:
        bad("PLUGIN_TYPE", f"must be one of core, internal, external, got {plugin_type!r}")
        plugin_type = None

    entrypoint = optional_str("ENTRYPOINT")
    if "ENTRYPOINT" not in values:
        bad("ENTRYPOINT", 'is required (a path, usually "{root}")')

    launch: str | tuple[str, ...] | None = None
    raw_launch = values.get("LAUNCH")
    if plugin_type == "internal":
        if not isinstance(raw_launch, str) or not raw_launch.strip():
            bad(
                "LAUNCH",
                "is required for internal plugins: a module name or .py path, got "
                + ("nothing" if raw_launch is None else _type_name(raw_launch)),
            )
        else:
            launch = substitute_root(raw_launch, root)
    elif plugin_type == "external":
        if (
            not isinstance(raw_launch, (list, tuple))
            or not raw_launch
            or not all(isinstance(a, str) for a in raw_launch)
        ):
            bad(
                "LAUNCH",
                "is required for external plugins: a non-empty list of strings, got "
                + ("nothing" if raw_launch is None else repr(raw_launch)[:60]),
            )
        else:
            launch = tuple(substitute_root(a, root) for a in raw_launch)

    host = optional_str("HOST") or "localhost"
    restart = values.get("RESTART")
    if restart is not None and (
        isinstance(restart, bool) or not isinstance(restart, int) or restart < 0
    ):
        bad("RESTART", f"must be an integer >= 0, got {restart!r}")
        restart = None

    secrets = values.get("SECRETS") or {}
    if not isinstance(secrets, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
    ):
        bad("SECRETS", f'must be a dict of "file": "destination" strings, got {secrets!r:.60}')
        secrets = {}

    system_reqs = values.get("SYSTEM_REQUIREMENTS") or []
    if not isinstance(system_reqs, (list, tuple)) or not all(
        isinstance(r, str) for r in system_reqs
    ):
        bad("SYSTEM_REQUIREMENTS", f"must be a list of strings, got {system_reqs!r:.60}")
        system_reqs = []

    req_command = optional_str("REQUIREMENTS_COMMAND")
    req_file = optional_str("REQUIREMENTS_FILE")

    if problems:
        raise ManifestError(plugin, problems)
    assert plugin_type is not None and entrypoint is not None
    entry = Path(substitute_root(entrypoint, root))
    if not entry.is_absolute():
        entry = root / entry
    return Manifest(
        plugin_type=plugin_type,
        entrypoint=entry,
        launch=launch,
        host=host,
        restart=restart,
        secrets={k: substitute_root(v, root) for k, v in secrets.items()},
        system_requirements=tuple(system_reqs),
        requirements_command=req_command,
        requirements_file=substitute_root(req_file, root) if req_file else None,
        warnings=tuple(warnings),
    )


def _key_lines(text: str) -> dict[str, int]:
    """Line of each top-level assignment, for error messages (best effort)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {}
    return {
        node.targets[0].id: node.lineno
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }


def load_manifest(root: Path, plugin: str) -> Manifest:
    """Read ``<root>/AIGIS/AIGIS.config`` for ``plugin``."""
    path = root / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            plugin, [f"{path}: manifest not found (every plugin needs AIGIS/AIGIS.config)"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(plugin, [f"{path}: cannot read manifest: {exc}"]) from None
    return parse_manifest(text, str(path), root, plugin)
