"""The load pipeline end to end (SPEC §4–6): real files, real imports, real subprocesses."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import aigis
from aigis._config import parse_config
from aigis._ctl import main
from aigis._loader import Loader
from aigis._namespace import Namespace

pytestmark = pytest.mark.integration

CORE_CFG = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n'


def loader_for(tmp_path: Path, plugins: str, extra: str = "") -> tuple[Loader, list]:
    config_path = tmp_path / "aigis.toml"
    config_path.write_text(f'[aigis]\nstate_dir = "state"\n{extra}\n{plugins}')
    config = parse_config(config_path.read_text(), config_path)
    loader = Loader(config.settings, Namespace(aigis, reserved=["RemoteError"]), tmp_path)
    return loader, list(config.plugins)


@pytest.fixture
def loaded(clean_aigis):
    """Unload every plugin a test loaded, so skills and modules don't leak between tests."""
    plugins = []
    yield plugins
    for loader, plugin in reversed(plugins):
        loader.unload(plugin)


def load_all(loader: Loader, entries, sink: list) -> dict:
    result = {}
    for entry in entries:
        plugin = loader.load(entry)
        sink.append((loader, plugin))
        result[entry.name] = plugin
    return result


def test_alias_skills_import_time_use_and_collision(tmp_path, make_plugin, loaded):
    make_plugin(
        "alpha",
        CORE_CFG,
        core="""
        import pkg_alpha.mod as alias
        SKILLS = ["alias.f", "alias.CONST", "alias.Klass", "alias.plain"]
        """,
        files={
            "pkg_alpha/__init__.py": "",
            "pkg_alpha/mod.py": """
        CONST = [1, 2, 3]
        class Klass:
            pass
        def f(x, logger=None):
            return (x * 2, logger.name if logger else None)
        def plain(x):
            return x + 1
        """,
        },
    )
    make_plugin(
        "beta",
        CORE_CFG,
        core="""
        import aigis
        AT_IMPORT = aigis.alias.f(21)
        def answer():
            return AT_IMPORT
        SKILLS = ["answer"]
        """,
    )
    make_plugin(
        "gamma",
        CORE_CFG,
        core="""
        class alias:
            f = staticmethod(lambda: 0)
        SKILLS = ["alias.f"]
        """,
    )
    loader, entries = loader_for(
        tmp_path, '[core]\nalpha = "src/alpha"\nbeta = "src/beta"\ngamma = "src/gamma"\n'
    )
    plugins = load_all(loader, entries, loaded)
    assert plugins["alpha"].state == "loaded"
    assert aigis.alias.f(5) == (10, "aigis.plugin.alpha")
    assert aigis.alias.plain(5) == 6  # no logger= for a function that does not accept it
    assert aigis.alias.CONST == [1, 2, 3]
    assert aigis.alias.Klass.__name__ == "Klass" and isinstance(aigis.alias.Klass, type)
    assert plugins["beta"].state == "loaded"
    assert aigis.answer() == (42, "aigis.plugin.alpha")
    assert plugins["gamma"].state == "failed"
    assert plugins["gamma"].reason.startswith(
        'skill "aigis.alias.f" is already registered by plugin "alpha"'
    )


def test_every_failure_kind_fails_alone(tmp_path, make_plugin, loaded, caplog):
    make_plugin("good", CORE_CFG, core="def hello():\n    return 'hi'\nSKILLS = ['hello']\n")
    make_plugin("syntax", CORE_CFG, core="SKILLS = [\n")
    make_plugin("noskills", CORE_CFG, core="X = 1\n")
    make_plugin("missingattr", CORE_CFG, core="SKILLS = ['nothere']\n")
    make_plugin(
        "nosecret",
        CORE_CFG + 'SECRETS = {"a.key": "{root}/etc/", "b.key": "x"}\n',
        core="SKILLS = []\n",
    )
    make_plugin(
        "nosysreq",
        CORE_CFG + 'SYSTEM_REQUIREMENTS = ["sh", "no-such-tool-1", "no-such-tool-2"]\n',
        core="SKILLS = []\n",
    )
    make_plugin(
        "badreqs",
        CORE_CFG + 'REQUIREMENT_COMMAND = "echo installing from; exit 3;"\n'
        'REQUIREMENT_FILE = "{root}/requirements.txt"\n',
        core="SKILLS = []\n",
        files={"requirements.txt": "x\n"},
    )
    make_plugin("good2", CORE_CFG, core="def bye():\n    return 'bye'\nSKILLS = ['bye']\n")
    loader, entries = loader_for(
        tmp_path,
        "[core]\n"
        + "".join(
            f'{n} = "src/{n}"\n'
            for n in [
                "good",
                "syntax",
                "noskills",
                "missingattr",
                "nosecret",
                "nosysreq",
                "badreqs",
            ]
        )
        + f'noclone = "file://{tmp_path}/no/such/repo.git"\ngood2 = "src/good2"\n',
        extra=f'secrets_dir = "{tmp_path}/secrets"',
    )
    with caplog.at_level(logging.INFO):
        plugins = load_all(loader, entries, loaded)
    reasons = {n: p.reason for n, p in plugins.items() if p.state == "failed"}
    assert set(reasons) == {
        "syntax",
        "noskills",
        "missingattr",
        "nosecret",
        "nosysreq",
        "badreqs",
        "noclone",
    }
    assert plugins["good"].state == plugins["good2"].state == "loaded"
    assert aigis.hello() == "hi" and aigis.bye() == "bye"
    # The same line `aigisctl check` prints: validation reads AIGIS.core before importing it.
    assert reasons["syntax"] == (
        f"{tmp_path}/state/ext/syntax/AIGIS/AIGIS.core:1: syntax error: '[' was never closed"
    )
    assert reasons["noskills"].startswith("AIGIS.core must define SKILLS")
    assert 'has no attribute "nothere"' in reasons["missingattr"]
    assert reasons["nosecret"].startswith("missing secrets: ")
    assert "secrets/nosecret/a.key" in reasons["nosecret"]
    assert "secrets/nosecret/b.key" in reasons["nosecret"]
    assert reasons["nosysreq"].startswith(
        "missing system requirements: no-such-tool-1, no-such-tool-2 "
    )
    assert reasons["badreqs"].startswith("requirements command failed (exit 3): ")
    assert "last output: installing from" in reasons["badreqs"]
    assert reasons["noclone"].startswith("clone of file://")
    assert not (tmp_path / "state" / "ext" / "noclone").exists()
    failed_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed:")]
    assert len(failed_lines) == 7
    assert 'failed: plugin "syntax": ' in failed_lines[0]


def test_secrets_copied_0400_and_confined(tmp_path, make_plugin, loaded):
    secrets = tmp_path / "secrets" / "s"
    secrets.mkdir(parents=True)
    (secrets / "k.secret").write_text("hush")
    (secrets / "other").write_text("x")
    make_plugin(
        "s",
        CORE_CFG + 'SECRETS = {"k.secret": "{root}/etc/", "other": "conf/o.txt"}\n',
        core="SKILLS = []\n",
    )
    make_plugin(
        "escape", CORE_CFG + 'SECRETS = {"k.secret": "{root}/../../x"}\n', core="SKILLS = []\n"
    )
    (tmp_path / "secrets" / "escape").mkdir()
    (tmp_path / "secrets" / "escape" / "k.secret").write_text("hush")
    loader, entries = loader_for(
        tmp_path,
        '[core]\ns = "src/s"\nescape = "src/escape"\n',
        extra=f'secrets_dir = "{tmp_path}/secrets"',
    )
    plugins = load_all(loader, entries, loaded)
    root = tmp_path / "state" / "ext" / "s"
    assert (root / "etc" / "k.secret").read_text() == "hush"
    assert stat.S_IMODE(os.stat(root / "etc" / "k.secret").st_mode) == 0o400
    assert (root / "conf" / "o.txt").read_text() == "x"
    assert plugins["escape"].state == "failed"
    assert "secret destinations outside the plugin directory" in plugins["escape"].reason


def test_secret_names_cannot_leave_the_plugins_secrets_dir(tmp_path, make_plugin, loaded):
    (tmp_path / "secrets" / "a").mkdir(parents=True)
    (tmp_path / "secrets" / "b").mkdir()
    (tmp_path / "secrets" / "b" / "db.key").write_text("b's secret")
    make_plugin(
        "a",
        CORE_CFG + 'SECRETS = {"../b/db.key": "{root}/", "/etc/hostname": "{root}/"}\n',
        core="SKILLS = []\n",
    )
    loader, entries = loader_for(
        tmp_path, '[core]\na = "src/a"\n', extra=f'secrets_dir = "{tmp_path}/secrets"'
    )
    (plugin,) = load_all(loader, entries, loaded).values()
    assert plugin.state == "failed"
    assert plugin.reason == (
        f"secret names must be files inside {tmp_path}/secrets/a: ../b/db.key, /etc/hostname"
    )
    assert not (tmp_path / "state" / "ext" / "a" / "db.key").exists()


def test_requirements_run_once_then_skipped_until_file_changes(tmp_path, make_plugin, loaded):
    counter = tmp_path / "count"
    make_plugin(
        "r",
        CORE_CFG + f'REQUIREMENTS_COMMAND = "echo run >> {counter}; cat"\n'
        'REQUIREMENTS_FILE = "{root}/requirements.txt"\n',
        core="SKILLS = []\n",
        files={"requirements.txt": "dill\n"},
    )
    loader, entries = loader_for(tmp_path, '[core]\nr = "src/r"\n')
    for _ in range(2):
        plugin = loader.load(entries[0])
        loaded.append((loader, plugin))
        assert plugin.state == "loaded", plugin.reason
    assert counter.read_text().count("run") == 1
    # A local source is copied once: edit the source and delete the copy, as an operator would.
    (tmp_path / "src" / "r" / "requirements.txt").write_text("dill\npygit2\n")
    shutil.rmtree(tmp_path / "state" / "ext" / "r")
    assert loader.load(entries[0]).state == "loaded"
    assert counter.read_text().count("run") == 2
    skipping = Loader(loader.settings, loader.namespace, tmp_path, skip_requirements=True)
    (tmp_path / "src" / "r" / "requirements.txt").write_text("changed\n")
    shutil.rmtree(tmp_path / "state" / "ext" / "r")
    assert skipping.load(entries[0]).state == "loaded"
    assert counter.read_text().count("run") == 2


def test_reload_reimports_changed_code_and_runs_cleanup(tmp_path, make_plugin, loaded):
    log = tmp_path / "cleanups"
    src = make_plugin(
        "rl",
        CORE_CFG,
        core=f"""
        from rl_pkg.impl import value
        def cleanup():
            with open({str(log)!r}, "a") as out:
                out.write("cleaned\\n")
        SKILLS = ["value"]
        """,
        files={"rl_pkg/__init__.py": "", "rl_pkg/impl.py": "def value():\n    return 1\n"},
    )
    loader, entries = loader_for(tmp_path, '[core]\nrl = "src/rl"\n')
    plugin = loader.load(entries[0])
    assert aigis.value() == 1
    # A local source is copied once: edit the source and delete the copy, as an operator would.
    (src / "rl_pkg" / "impl.py").write_text("def value():\n    return 2\n")
    shutil.rmtree(tmp_path / "state" / "ext" / "rl")
    loader.unload(plugin)
    assert not hasattr(aigis, "value")
    plugin = loader.load(entries[0])
    loaded.append((loader, plugin))
    assert aigis.value() == 2
    assert log.read_text() == "cleaned\n"


def test_a_remote_host_leaves_requirements_and_secrets_to_that_host(tmp_path, make_plugin, loaded):
    make_plugin(
        "far",
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\nLAUNCH = ["true"]\n'
        'HOST = "far.example"\nSYSTEM_REQUIREMENTS = ["no-such-tool-here"]\n'
        'REQUIREMENTS_COMMAND = "exit 9"\nSECRETS = {"token": "t.txt"}\n',
    )
    (tmp_path / "secrets" / "far").mkdir(parents=True)
    (tmp_path / "secrets" / "far" / "token").write_text("x")
    loader, entries = loader_for(tmp_path, '[external]\nfar = "src/far"\n')
    plugin = loader.load(entries[0])
    assert plugin.state == "loaded", plugin.reason
    assert (plugin.host, plugin.remote.address) == ("far.example", "far.example")
    assert plugin.remote_secrets == [("t.txt", tmp_path / "secrets" / "far" / "token")]
    assert not (plugin.root / "t.txt").exists()  # shipped to the host, never copied here


def test_a_remote_host_still_needs_every_secret_here(tmp_path, make_plugin, loaded):
    make_plugin(
        "far",
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\nLAUNCH = ["true"]\n'
        'HOST = "far.example"\nSECRETS = {"token": "t.txt"}\n',
    )
    loader, entries = loader_for(tmp_path, '[external]\nfar = "src/far"\n')
    plugin = loader.load(entries[0])
    assert plugin.state == "failed"
    assert plugin.reason == f"missing secrets: {tmp_path}/secrets/far/token"


def test_a_core_plugin_on_another_host_is_a_clear_error(tmp_path, make_plugin, loaded):
    make_plugin("near", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', core="SKILLS = []\n")
    loader, entries = loader_for(
        tmp_path, '[core]\nnear = { source = "src/near", host = "web1" }\n'
    )
    plugin = loader.load(entries[0])
    assert plugin.state == "failed"
    assert plugin.reason == (
        'its host in aigis.toml is "web1", but core plugins run inside the core, on its machine'
    )


# --- one validator for `aigisctl check` and the loader ---------------------------------------


@pytest.mark.parametrize(
    ("manifest", "core"),
    [
        ('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}/nowhere"\n', "SKILLS = []\n"),
        ('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', None),
        ('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', "SKILLS = [\n"),
        ('PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nHOST = "far.example"\n', "SKILLS = []\n"),
        ('PLUGIN_TYPE = "core"\nENTRYPOINT = 3\n', None),
    ],
    ids=["entrypoint", "no-core-file", "core-syntax", "host", "manifest"],
)
def test_check_and_loader_report_the_same_problem_in_the_same_words(
    tmp_path, make_plugin, loaded, capsys, manifest, core
):
    make_plugin("p", manifest, core=core)
    # The loader copies the source to state/ext/p; check reads that copy once it exists.
    loader, entries = loader_for(tmp_path, '[core]\np = "src/p"\n')
    (plugin,) = load_all(loader, entries, loaded).values()
    assert plugin.state == "failed"
    assert main(["check", "-c", str(tmp_path / "aigis.toml")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f'error: plugin "p": {plugin.reason}']


def test_type_mismatch_warning_is_worded_the_same_by_check_and_loader(
    tmp_path, make_plugin, loaded, capsys, caplog
):
    make_plugin("p", 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\n', core="SKILLS = []\n")
    loader, entries = loader_for(tmp_path, '[external]\np = "src/p"\n')
    with caplog.at_level(logging.WARNING):
        (plugin,) = load_all(loader, entries, loaded).values()
    assert plugin.state == "loaded"
    expected = (
        f"{tmp_path}/state/ext/p/AIGIS/AIGIS.config: listed under [external] but PLUGIN_TYPE "
        'is "core"; loaded as core'
    )
    assert f'manifest: plugin "p": {expected}' in caplog.messages
    assert main(["check", "-c", str(tmp_path / "aigis.toml")]) == 0
    assert f'warning: plugin "p": {expected}' in capsys.readouterr().err


# --- core plugins share one interpreter: same-named top-level modules -------------------------


def test_second_core_plugin_with_a_same_named_module_fails_naming_both(
    tmp_path, make_plugin, loaded
):
    for name in ("one", "two"):
        make_plugin(
            name,
            CORE_CFG,
            core=f"import helper\ndef {name}():\n    return helper.WHO\nSKILLS = ['{name}']\n",
            files={"helper.py": f"WHO = {name!r}\n"},
        )
    loader, entries = loader_for(tmp_path, '[core]\none = "src/one"\ntwo = "src/two"\n')
    plugins = load_all(loader, entries, loaded)
    assert plugins["one"].state == "loaded"
    assert aigis.one() == "one"
    # It used to load, and two() silently ran plugin "one"'s helper.
    assert plugins["two"].state == "failed"
    assert plugins["two"].reason == (
        f'module "helper" is already imported from plugin "one" '
        f'({tmp_path}/state/snapshots/one/helper.py) and plugin "two" ships its own '
        f"({tmp_path}/state/snapshots/two/helper.py); core plugins share one interpreter, "
        "so top-level module names must differ: rename one of them"
    )
    assert not hasattr(aigis, "two")
    # Once "one" is unloaded, "two" loads and runs its own helper.
    loader.unload(plugins["one"])
    plugin = loader.load(entries[1])
    loaded.append((loader, plugin))
    assert plugin.state == "loaded", plugin.reason
    assert aigis.two() == "two"


def test_same_named_packages_are_detected_too(tmp_path, make_plugin, loaded):
    for name in ("one", "two"):
        make_plugin(
            name,
            CORE_CFG,
            core="from util.text import WHO\nSKILLS = []\n",
            files={"util/__init__.py": "", "util/text.py": f"WHO = {name!r}\n"},
        )
    loader, entries = loader_for(tmp_path, '[core]\none = "src/one"\ntwo = "src/two"\n')
    plugins = load_all(loader, entries, loaded)
    assert plugins["one"].state == "loaded"
    assert plugins["two"].state == "failed"
    assert plugins["two"].reason.startswith('module "util" is already imported from plugin "one"')


def test_plugins_with_distinct_helpers_and_stdlib_names_still_load(tmp_path, make_plugin, loaded):
    make_plugin(
        "one",
        CORE_CFG,
        core="import helper_one\nimport json\nSKILLS = []\n",
        files={"helper_one.py": "X = 1\n"},
    )
    make_plugin(
        "two",
        CORE_CFG,
        core="import helper_two\nimport json\nSKILLS = []\n",
        files={"helper_two.py": "X = 2\n", "setup.py": "", "main.py": ""},
    )
    make_plugin("three", CORE_CFG, core="SKILLS = []\n", files={"setup.py": "", "main.py": ""})
    loader, entries = loader_for(
        tmp_path, '[core]\none = "src/one"\ntwo = "src/two"\nthree = "src/three"\n'
    )
    plugins = load_all(loader, entries, loaded)
    assert {p.state for p in plugins.values()} == {"loaded"}, [p.reason for p in plugins.values()]


def test_a_failed_import_leaves_no_module_behind_for_the_next_plugin(tmp_path, make_plugin, loaded):
    make_plugin(
        "broken",
        CORE_CFG,
        core="import helper\nraise RuntimeError('boom')\n",
        files={"helper.py": "WHO = 'broken'\n"},
    )
    make_plugin(
        "fine",
        CORE_CFG,
        core="import helper\ndef who():\n    return helper.WHO\nSKILLS = ['who']\n",
        files={"helper.py": "WHO = 'fine'\n"},
    )
    loader, entries = loader_for(tmp_path, '[core]\nbroken = "src/broken"\nfine = "src/fine"\n')
    plugins = load_all(loader, entries, loaded)
    assert plugins["broken"].state == "failed"
    assert plugins["fine"].state == "loaded", plugins["fine"].reason
    assert aigis.who() == "fine"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("a = " + "[" * 100_000 + "]" * 100_000, "TOML too deeply nested or too large"),
        ('[aigis]\nstate_dir = "/tmp/a\\u0000b"', "[aigis] state_dir must be a path"),
        ("[aigis]\nstop_timeout = nan", "[aigis] stop_timeout must be a number of seconds"),
    ],
    ids=["nested", "nul", "nan"],
)
def test_the_daemon_refuses_a_bad_config_in_one_line(tmp_path, setting, expected):
    config = tmp_path / "aigis.toml"
    config.write_text(setting + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "aigis", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"aigis: {config}") and expected in line


def test_a_module_another_plugin_imports_lazily_is_reported_as_shadowed(
    tmp_path, make_plugin, loaded, caplog
):
    # "one" imports its helper only when called; "two" imports its own at load time first.
    make_plugin(
        "one",
        CORE_CFG,
        core="def one():\n    import helper\n    return helper.WHO\nSKILLS = ['one']\n",
        files={"helper.py": "WHO = 'one'\n"},
    )
    make_plugin(
        "two",
        CORE_CFG,
        core="import helper\nSKILLS = []\n",
        files={"helper.py": "WHO = 'two'\n"},
    )
    loader, entries = loader_for(tmp_path, '[core]\none = "src/one"\ntwo = "src/two"\n')
    with caplog.at_level(logging.WARNING):
        plugins = load_all(loader, entries, loaded)
    assert {p.state for p in plugins.values()} == {"loaded"}
    assert (
        'shadowed: module "helper" of plugin "one" is now plugin "two"\'s: core plugins share '
        'one interpreter, and an import of it by plugin "one" gets this one'
    ) in caplog.messages
