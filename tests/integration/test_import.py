"""``import aigis`` in a fresh interpreter: no side effects, only the public API loaded."""

import subprocess
import sys


def test_import_aigis_has_no_side_effects_and_loads_only_the_public_api(tmp_path):
    code = "import sys, aigis; print(sorted(m for m in sys.modules if m.startswith('aigis')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "['aigis', 'aigis._errors', 'aigis._version']"
    assert list(tmp_path.iterdir()) == []  # nothing written where it was imported


HEAVY = ("pygit2", "multiprocess", "dill", "prometheus_client", "jeepney")


def loaded_heavy(code: str, cwd) -> list[str]:
    """Which of HEAVY a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=cwd
    )
    return out.stdout.split()


def test_the_core_loads_heavy_libraries_only_for_the_features_that_need_them(tmp_path):
    # pygit2: first git source; dill: a pickle that needs it; prometheus_client: metrics
    # listener; jeepney: systemd backend
    code = "import aigis._daemon, aigis._supervise.embedded"
    assert loaded_heavy(code, tmp_path) == []


def test_the_plugin_runner_loads_no_heavy_library(tmp_path):
    assert loaded_heavy("import aigis._runner", tmp_path) == []
