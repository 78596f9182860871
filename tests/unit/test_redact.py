"""One redaction helper for every place a git URL can show up."""

from __future__ import annotations

import pytest

from aigis._redact import redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://deploy:TOKEN123@host/x.git", "https://deploy:***@host/x.git"),
        (
            "fetch failed: https://u:p%40ss@git.example/r.git: 401",
            "fetch failed: https://u:***@git.example/r.git: 401",
        ),
        ("https://ghp_abcdefABCDEF0123456789@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("https://oauth2:glpat-xyz@gitlab/r.git", "https://oauth2:***@gitlab/r.git"),
        (
            "https://host/r.git?private_token=abc&ref=main",
            "https://host/r.git?private_token=***&ref=main",
        ),
        (
            "https://host/r.git?ref=main&access_token=abc",
            "https://host/r.git?ref=main&access_token=***",
        ),
        ("ssh://git@host/r.git", "ssh://git@host/r.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
        ("/srv/plugins/oracle", "/srv/plugins/oracle"),
        ("plain text, no url", "plain text, no url"),
    ],
)
def test_credentials_are_masked_and_nothing_else_changes(text, shown):
    assert redact(text) == shown


def test_every_occurrence_is_masked():
    text = "a https://x:1@h/a b https://y:2@h/b"
    assert redact(text) == "a https://x:***@h/a b https://y:***@h/b"
