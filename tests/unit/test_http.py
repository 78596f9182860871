"""The HTTP listener's decisions (pure): who may read, what the page shows."""

from __future__ import annotations

import base64

import pytest

from aigis._errors import AigisError
from aigis._http import authorized, read_token
from aigis._metrics import Metrics
from aigis._page import PLUGIN_FIELDS, page_data


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer tok", True),
        ("bearer tok", True),
        (basic("anyone", "tok"), True),
        ("Bearer tok2", False),
        ("Bearer", False),
        (None, False),
        ("", False),
        (basic("tok", ""), False),  # the token as user name is not the password
        ("Basic !!!notbase64", False),
        ("Token tok", False),
    ],
)
def test_a_request_needs_the_token_when_one_is_set(header, ok):
    assert authorized(header, b"tok") is ok


def test_without_a_token_every_request_is_served():
    assert authorized(None, None)


def test_the_token_file_gives_its_first_line(tmp_path):
    path = tmp_path / "token"
    path.write_text("  abc  \nignored\n")
    assert read_token(path) == b"abc"
    path.write_text("\n \n")
    with pytest.raises(AigisError, match="expected one line with a token"):
        read_token(path)
    with pytest.raises(AigisError, match="cannot read http_token_file"):
        read_token(tmp_path / "missing")


def test_the_page_shows_an_allowlist_of_plugin_fields_and_every_skill_with_its_owner():
    metrics = Metrics()
    metrics.observe_call("dnd.roll", "plugin", 0.001, "ValueError", started=False)
    metrics.observe_call("gone.skill", "plugin", 0.001, started=False)
    row = {k: 1 for k in PLUGIN_FIELDS} | {"source": "https://u:secret@host/x.git",
                                            "commit": "abc"}  # fmt: skip
    view = {
        "time": 5.0,
        "core": {"version": "1", "supervisor": "embedded", "summary": "ok"},
        "plugins": [row],
        "skills": [{"path": "aigis.dnd.roll", "plugin": "dnd"},
                   {"path": "aigis.dnd.Character", "plugin": "dnd"}],
        "metrics": metrics.snapshot(),
    }  # fmt: skip
    data = page_data(view)
    assert list(data["plugins"][0]) == list(PLUGIN_FIELDS)
    assert "secret" not in repr(data)
    skills = {s["skill"]: s for s in data["skills"]}
    assert skills["dnd.roll"]["owner"] == "dnd" and skills["dnd.roll"]["errors"] == 1
    assert skills["dnd.Character"]["calls"] == 0 and skills["dnd.Character"]["p99_seconds"] is None
    assert skills["gone.skill"]["owner"] == ""  # called, then unloaded
