"""Manifest parsing (SPEC §3): literal-only, both spellings, {root} as a token, types."""

from pathlib import Path

import pytest

from aigis._errors import ManifestError
from aigis._manifest import parse_manifest, read_literals

ROOT = Path("/var/lib/aigis/ext/p")
F = "/var/lib/aigis/ext/p/AIGIS/AIGIS.config"


def parse(text: str):
    return parse_manifest(text, F, ROOT, "p")


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse(text)
    assert str(info.value).startswith('plugin "p": ')
    return info.value.problems


def test_seed_core_example_with_singular_spellings():
    m = parse(
        '"""doc"""\nPLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'
        'SYSTEM_REQUIREMENTS = ["pip3.7"]\n'
        'REQUIREMENT_COMMAND = "pip3.7 install --user -r"\n'
        'REQUIREMENT_FILE = "{root}/requirements.txt"\nSECRETS = {}\n'
    )
    assert m.plugin_type == "core"
    assert m.entrypoint == ROOT
    assert m.requirements_command == "pip3.7 install --user -r"
    assert m.requirements_file == "/var/lib/aigis/ext/p/requirements.txt"
    assert m.restart is None and m.host == "localhost" and m.launch is None


def test_plural_spellings_and_both_at_once_is_an_error():
    m = parse('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nREQUIREMENTS_COMMAND = "x"\n')
    assert m.requirements_command == "x"
    lines = problems(
        'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'
        'REQUIREMENTS_COMMAND = "x"\nREQUIREMENT_COMMAND = "y"\n'
    )
    assert lines == [
        f"{F}:4: REQUIREMENT_COMMAND and REQUIREMENTS_COMMAND are the same setting; give only one"
    ]


def test_root_is_a_token_other_braces_survive():
    m = parse(
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}/bin"\n'
        'LAUNCH = ["{root}/run", "--fmt={x}", "{}"]\n'
        'SECRETS = {"{root}k": "{root}/etc/"}\n'
    )
    assert m.entrypoint == ROOT / "bin"
    assert m.launch == ("/var/lib/aigis/ext/p/run", "--fmt={x}", "{}")
    assert m.secrets == {"{root}k": "/var/lib/aigis/ext/p/etc/"}  # keys keep {root}


def test_internal_launch_substitutes_root():
    m = parse(
        'PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\nLAUNCH = "{root}/main.py"\n'
        'RESTART = 3\nHOST = "localhost"\n'
    )
    assert m.launch == "/var/lib/aigis/ext/p/main.py"
    assert m.restart == 3


def test_relative_entrypoint_is_under_root():
    assert parse('PLUGIN_TYPE = "core"\nENTRYPOINT = "src"\n').entrypoint == ROOT / "src"


def test_not_literal_only_is_an_error_naming_line_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    lines = problems(
        f'PLUGIN_TYPE = "core"\nimport os\nENTRYPOINT = "{{root}}"\nX = open("{marker}", "w")\n'
    )
    assert lines[0] == f"{F}:2: only NAME = literal assignments are allowed, got import os"
    assert lines[1].startswith(f"{F}:4: X must be a literal")
    assert not marker.exists()


def test_syntax_error_names_line():
    assert problems('PLUGIN_TYPE = "core"\nENTRYPOINT = (\n')[0].startswith(f"{F}:2: syntax")


def test_missing_entrypoint():
    assert problems('PLUGIN_TYPE = "core"\n') == [
        f'{F}: ENTRYPOINT is required (a path, usually "{{root}}")'
    ]


def test_wrong_types_say_what_was_expected():
    lines = problems(
        'PLUGIN_TYPE = "external"\nENTRYPOINT = 3\nLAUNCH = "run.sh"\n'
        'RESTART = "2"\nSECRETS = ["a"]\nSYSTEM_REQUIREMENTS = "git"\n'
    )
    assert f"{F}:2: ENTRYPOINT must be a string, got int" in lines
    assert (
        f"{F}:3: LAUNCH is required for external plugins: a non-empty list of strings, got 'run.sh'"
    ) in lines
    assert f"{F}:4: RESTART must be an integer >= 0, got '2'" in lines
    assert f'{F}:5: SECRETS must be a dict of "file": "destination" strings, got [\'a\']' in lines
    assert f"{F}:6: SYSTEM_REQUIREMENTS must be a list of strings, got 'git'" in lines


def test_bool_is_not_a_restart_count_and_negative_rejected():
    assert (
        "RESTART must be an integer >= 0, got True"
        in problems('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nRESTART = True\n')[0]
    )
    assert "got -1" in problems('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nRESTART = -1\n')[0]


def test_bad_plugin_type_and_internal_without_launch():
    assert (
        "must be one of core, internal, external, got 'daemon'"
        in problems('PLUGIN_TYPE = "daemon"\nENTRYPOINT = "{root}"\n')[0]
    )
    assert (
        "LAUNCH is required for internal plugins"
        in problems('PLUGIN_TYPE = "internal"\nENTRYPOINT = "{root}"\n')[0]
    )


def test_unknown_key_is_a_warning():
    m = parse('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nRESTARTS = 2\n')
    assert m.warnings == (f"{F}:3: unknown key RESTARTS (ignored)",)


def test_read_literals_allows_comments_docstring_and_containers():
    values, problems_ = read_literals('"""d"""\n# c\nA = {"k": [1, (2, None)], "b": True}\n', "f")
    assert problems_ == [] and values == {"A": {"k": [1, (2, None)], "b": True}}


# --- hardening: every bad manifest is a ManifestError line, never a traceback or "None" -------


def test_nul_byte_is_reported_without_a_line_not_at_line_none():
    assert problems('PLUGIN_TYPE = "core"\x00\n') == [
        f"{F}: syntax error: source code string cannot contain null bytes"
    ]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("X = " + "-" * 100_000 + "1\n", "MemoryError"),
        ("X = " + "1+" * 100_000 + "1\n", "RecursionError"),
    ],
)
def test_deeply_nested_expressions_are_one_line(text, kind):
    assert problems(text) == [f"{F}: too deeply nested or too large to parse ({kind})"]


def test_control_characters_are_escaped():
    lines = problems('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nprint("\x1b[2J\x07")\n')
    assert lines == [
        f'{F}:3: only NAME = literal assignments are allowed, got print("\\x1b[2J\\x07")'
    ]
    lines = problems('PLUGIN_TYPE = "\x1b]0;owned\x07"\nENTRYPOINT = "{root}"\n')
    assert lines == [
        f"{F}:1: PLUGIN_TYPE must be one of core, internal, external, got '\\x1b]0;owned\\x07'"
    ]


def test_long_values_are_cut():
    lines = problems(
        f'PLUGIN_TYPE = "core"\nENTRYPOINT = "{{root}}"\nRESTART = "{"9" * 10_000_000}"\n'
        f'SECRETS = {{"a": {list(range(100_000))}}}\nX = f({"1," * 100_000})\n'
    )
    assert len(lines) == 3
    assert all(len(line) < 300 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith(f"{F}:5: X must be a literal")
    assert lines[1].startswith(f"{F}:3: RESTART must be an integer >= 0, got '9999")
    assert lines[2].startswith(f'{F}:4: SECRETS must be a dict of "file": "destination" strings')


def test_huge_integer_is_an_error_not_a_crash():
    line = problems(f'PLUGIN_TYPE = "core"\nENTRYPOINT = "{{root}}"\nRESTART = {"9" * 5000}\n')[0]
    assert line.startswith(f"{F}:3: syntax error: Exceeds the limit (4300 digits)")


def test_lone_surrogate_is_an_error_not_a_crash():
    # Found by tests/unit/test_fuzz.py: ast.parse raised UnicodeEncodeError.
    assert problems("PLUGIN_TYPE = \ud800") == [f"{F}: not valid text: surrogates not allowed"]
