"""Generated inputs for the config and manifest parsers: a ConfigError/ManifestError or a result.

Never another exception, every message line names the file, is bounded in length and carries
no raw control character. AIGIS_FUZZ_EXAMPLES raises the number of examples (``make fuzz``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigis._config import parse_config
from aigis._errors import ConfigError, ManifestError
from aigis._manifest import parse_manifest
from aigis._quote import LINE_LIMIT
from aigis._settings import SETTINGS

EXAMPLES = int(os.environ.get("AIGIS_FUZZ_EXAMPLES", "250"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis directory in the tree; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONFIG = Path("/etc/aigis/aigis.toml")
ROOT = Path("/var/lib/aigis/ext/p")
MANIFEST = "/var/lib/aigis/ext/p/AIGIS/AIGIS.config"

nasty_text = st.text(
    st.one_of(
        st.characters(),
        st.sampled_from(["\x00", "\x1b", "\x07", "\n", "\r", "\u2028", "\u202e", "\ud800"]),
    ),
    max_size=40,
)


def assert_clean(lines: list[str], filename: str) -> None:
    assert lines, "an error without a message"
    for line in lines:
        assert line.startswith(filename), line[:200]
        assert len(line) <= LINE_LIMIT, len(line)
        assert line.isprintable(), line[:200]
        assert ":None" not in line, line[:200]


# --- the config (TOML) -------------------------------------------------------------------------


def toml_string(text: str) -> str:
    return json.dumps(text)  # a TOML basic string (JSON escapes are TOML escapes)


toml_scalar = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda x: (
            "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else repr(x)
        )
    ),
    st.booleans().map(lambda b: "true" if b else "false"),
    nasty_text.map(toml_string),
    st.sampled_from(["1979-05-27T07:32:00Z", "07:32:00", '""', "'/srv/a'", '"h:99999"']),
    st.text(max_size=10_000, alphabet="x").map(toml_string),  # long values
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["source", "ref", "x"]), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=8,
)
toml_key = st.one_of(
    st.sampled_from([s.name for s in SETTINGS] + ["core", "a", "aigis", "x.y"]),
    nasty_text.map(toml_string),
)
toml_header = st.sampled_from(
    ["[aigis]", "[core]", "[internal]", "[external]", "[plugins]", "[[core]]", "[core.x]"]
)
toml_line = st.one_of(
    toml_header,
    st.tuples(toml_key, toml_value).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.integers(1, 3000).map(lambda n: "deep = " + "[" * n + "]" * n),
    nasty_text,
)
toml_document = st.lists(toml_line, max_size=12).map("\n".join)


def check_config(text: str) -> None:
    try:
        parse_config(text, CONFIG)
    except ConfigError as exc:
        assert_clean(exc.problems, str(CONFIG))


@fuzz
@given(toml_document)
def test_config_parser_on_toml_like_documents(text):
    check_config(text)


@fuzz
@given(st.text())
def test_config_parser_on_any_text(text):
    check_config(text)


# --- the manifest (Python literals) -------------------------------------------------------------

literal = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        nasty_text,
        st.text(max_size=10_000, alphabet="y"),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    ),
    max_leaves=10,
).map(repr)
raw_string = nasty_text.map(  # a string literal holding raw control characters
    lambda t: '"' + "".join(c for c in t if c not in '\\"\n\r\x00') + '"'
)
long_string = st.integers(1000, 20_000).map(lambda n: '"' + "z" * n + '"')
expression = st.one_of(
    literal,
    raw_string,
    long_string,
    st.one_of(raw_string, long_string).map(lambda x: f"f({x})"),  # not a literal
    st.sampled_from(
        ['"core"', '"internal"', '"external"', '"{root}"', '["{root}/run"]', "{}", "f(1)", "x"]
    ),
    st.integers(1, 500).map(lambda n: "(" * n + "1" + ")" * n),
    st.integers(1, 50_000).map(lambda n: "-" * n + "1"),
    st.integers(1, 20_000).map(lambda n: "1" + "+1" * n),
    nasty_text,
)
manifest_key = st.one_of(
    st.sampled_from(
        [
            "PLUGIN_TYPE",
            "ENTRYPOINT",
            "LAUNCH",
            "HOST",
            "RESTART",
            "SECRETS",
            "SYSTEM_REQUIREMENTS",
            "REQUIREMENTS_COMMAND",
            "REQUIREMENT_COMMAND",
            "REQUIREMENTS_FILE",
            "REQUIREMENT_FILE",
            "UNKNOWN",
        ]
    ),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
)
manifest_line = st.one_of(
    st.tuples(manifest_key, expression).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(['"""doc"""', "# comment", "import os", "del x", "X: int = 1"]),
    st.one_of(raw_string, long_string).map(lambda x: f"print({x})"),  # not an assignment
    nasty_text,
)
manifest_document = st.lists(manifest_line, max_size=10).map("\n".join)


def check_manifest(text: str) -> None:
    try:
        manifest = parse_manifest(text, MANIFEST, ROOT, "p")
    except ManifestError as exc:
        assert str(exc).startswith('plugin "p": ')
        assert_clean(exc.problems, MANIFEST)
    else:
        if manifest.warnings:
            assert_clean(list(manifest.warnings), MANIFEST)


@fuzz
@given(manifest_document)
def test_manifest_parser_on_assignment_like_documents(text):
    check_manifest(text)


@fuzz
@given(st.text())
def test_manifest_parser_on_any_text(text):
    check_manifest(text)
