"""Long start-ups say what they are doing: systemd's StatusText and ``aigisctl status`` name the
plugin being loaded, its step and the count so far."""

from __future__ import annotations

import re

import pytest

from .box import Box, wait_until
from .test_service import Aigis

pytestmark = pytest.mark.systemd


@pytest.fixture
def aigis(box: Box) -> Aigis:
    return Aigis(box)


def test_a_slow_requirements_command_is_named_while_it_runs(aigis: Aigis) -> None:
    aigis.examples()
    slow = 'PLUGIN_TYPE = "core"\nENTRYPOINT = "{root}"\nREQUIREMENTS_COMMAND = "sleep 600 #"\n'
    aigis.plugin("slow", "core", slow, {})
    (aigis.dir / "plugins" / "slow" / "AIGIS" / "AIGIS.core").write_text("SKILLS = []\n")
    aigis.write_config()
    aigis.box.systemctl("start", "--no-block", "aigis")
    status = 'loading 2/4: plugin "slow": running requirements'
    wait_until(lambda: aigis.prop("aigis.service", "StatusText") == status, 30, "StatusText")
    assert aigis.prop("aigis.service", "ActiveState") == "activating"  # READY=1 not sent yet
    code, out, err = aigis.ctl("status")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["dnd"].split()[3] == "loaded"
    assert re.search(r"starting .* loading \(2/4\): running requirements \(\d+ s\)", rows["slow"])
    assert "waiting" in rows["oracle"] and "waiting" in rows["clock"]
    aigis.box.systemctl("stop", "aigis")  # the requirements command is killed at once
    assert aigis.prop("aigis.service", "ActiveState") == "inactive"
