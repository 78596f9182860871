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
