"""Plugin manifests (``AIGIS/AIGIS.config``): parsed as literal assignments, never executed."""

from __future__ import annotations

import ast
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aigis._errors import ManifestError
from aigis._quote import escape, shown
from aigis._remote.hosts import is_local, parse_destination

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
    return is_local(host, own_names())


def own_names() -> tuple[str, ...]:
    """The names that mean this machine besides localhost and loopback addresses."""
    return (socket.gethostname(),)


def substitute_root(value: str, root: Path) -> str:
    """Replace the ``{root}`` token (not ``str.format``: other braces survive)."""
    return value.replace(ROOT_TOKEN, str(root).rstrip("/") or "/")


def _parse(text: str, filename: str) -> tuple[ast.Module | None, list[str]]:
    """``ast.parse`` with every failure as one problem naming the file (and line when known)."""
    try:
        return ast.parse(text, filename=filename), []
    except SyntaxError as exc:
        where = f"{filename}:{exc.lineno}" if exc.lineno else filename
        return None, [escape(f"{where}: syntax error: {exc.msg}")]
    except (RecursionError, MemoryError) as exc:
        return None, [
            escape(f"{filename}: too deeply nested or too large to parse ({type(exc).__name__})")
        ]
    except UnicodeEncodeError as exc:  # a lone surrogate: only a str not read from a file has one
        return None, [escape(f"{filename}: not valid text: {exc.reason}")]


_NEWLINE = re.compile(r"\r\n?|\n")  # Python's own line ends (not str.splitlines's \f, \x1c...)


def _segment(lines: list[str], node: ast.AST, limit: int = 60) -> str:
    """The start of ``node``'s source, for a message. (``ast.get_source_segment`` takes
    quadratic time on long lines.)"""
    lineno, col = getattr(node, "lineno", 0), getattr(node, "col_offset", 0)
    end_lineno, end_col = getattr(node, "end_lineno", None), getattr(node, "end_col_offset", None)
    if not 0 < lineno <= len(lines):
        return ""
    raw = lines[lineno - 1].encode("utf-8", "surrogatepass")  # offsets count UTF-8 bytes
    if end_lineno == lineno and end_col is not None:
        raw = raw[:end_col]
    text = raw[col : col + 4 * limit + 4].decode("utf-8", "replace")
    if end_lineno != lineno:
        text += " ..."
    return escape(text, limit)


def _literals(text: str, filename: str, tree: ast.Module) -> tuple[dict[str, object], list[str]]:
    """The ``NAME = literal`` statements of ``tree``; problems name file:line."""
    problems: list[str] = []
    values: dict[str, object] = {}
    lines = _NEWLINE.split(text)
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
            got = _segment(lines, node) or type(node).__name__
            problems.append(
                escape(
                    f"{where}: only NAME = literal assignments are allowed, got {escape(got, 60)}"
                )
            )
            continue
        name = node.targets[0].id
        try:
            values[name] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            segment = _segment(lines, node.value) or "?"
            problems.append(
                escape(
                    f"{where}: {name} must be a literal (str, int, bool, None, list, "
                    f"tuple, dict), got {escape(segment, 60)}"
                )
            )
    return values, problems


def read_literals(text: str, filename: str) -> tuple[dict[str, object], list[str]]:
    """Parse ``NAME = literal`` statements; return (values, problems naming file:line)."""
    tree, problems = _parse(text, filename)
    return _literals(text, filename, tree) if tree is not None else ({}, problems)


def _type_name(value: object) -> str:
    return type(value).__name__


def parse_manifest(text: str, filename: str, root: Path, plugin: str) -> Manifest:
    """Validate manifest ``text`` for ``plugin`` fetched at ``root``; raise ManifestError."""
    tree, problems = _parse(text, filename)
    if tree is None:
        raise ManifestError(plugin, problems)
    values, problems = _literals(text, filename, tree)
    lines = _key_lines(tree)

    def bad(key: str, message: str) -> None:
        line = lines.get(key)
        where = f"{filename}:{line}" if line else filename
        problems.append(escape(f"{where}: {key} {message}"))

    warnings = [
        escape(f"{filename}:{lines[k]}: unknown key {k} (ignored)")
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
        bad("PLUGIN_TYPE", f"must be one of core, internal, external, got {shown(plugin_type)}")
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
                + ("nothing" if raw_launch is None else shown(raw_launch)),
            )
        else:
            launch = tuple(substitute_root(a, root) for a in raw_launch)

    host = optional_str("HOST") or "localhost"
    restart = values.get("RESTART")
    if restart is not None and (
        isinstance(restart, bool) or not isinstance(restart, int) or restart < 0
    ):
        bad("RESTART", f"must be an integer >= 0, got {shown(restart)}")
        restart = None

    secrets = values.get("SECRETS") or {}
    if not isinstance(secrets, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()
    ):
        bad("SECRETS", f'must be a dict of "file": "destination" strings, got {shown(secrets)}')
        secrets = {}

    system_reqs = values.get("SYSTEM_REQUIREMENTS") or []
    if not isinstance(system_reqs, (list, tuple)) or not all(
        isinstance(r, str) for r in system_reqs
    ):
        bad("SYSTEM_REQUIREMENTS", f"must be a list of strings, got {shown(system_reqs)}")
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


def _key_lines(tree: ast.Module) -> dict[str, int]:
    """Line of each top-level assignment, for error messages."""
    return {
        node.targets[0].id: node.lineno
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }


def plugin_problems(
    manifest: Manifest,
    table: str,
    origin: str,
    *,
    entrypoint_is_dir: bool,
    core_file: str,
    core_text: str | None,
    core_problem: str | None = None,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about a parsed manifest in its setting: the config table it is
    listed under, whether ENTRYPOINT is a directory, and AIGIS.core's text (None: absent)."""
    warnings = list(manifest.warnings)
    errors: list[str] = []
    kind = manifest.plugin_type
    if kind != table:
        warnings.append(
            f'{origin}: listed under [{table}] but PLUGIN_TYPE is "{kind}"; loaded as {kind}'
        )
    if not manifest.is_local:
        if kind == "core":
            errors.append(
                f'{origin}: HOST "{escape(manifest.host, 80)}": core plugins run inside the core, '
                'always on its machine (set HOST = "localhost" or remove it)'
            )
        else:
            try:
                parse_destination(manifest.host)
            except ValueError as exc:
                errors.append(f"{origin}: HOST: {escape(str(exc), 200)}")
    if not entrypoint_is_dir:
        errors.append(escape(f"{origin}: ENTRYPOINT {manifest.entrypoint} is not a directory"))
    if core_problem is not None:
        errors.append(core_problem)
    elif core_text is not None:
        errors.extend(_parse(core_text, core_file)[1])
    elif kind == "core":
        errors.append(f"core plugins need {core_file}")
    return errors, warnings
