"""Credentials never shown: one helper that hides passwords and tokens in URLs inside any text
(log lines, status rows, ``aigisctl check``, error messages). Pure."""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:secret@host -> scheme://user:***@host ; scheme://token@host -> scheme://***@host
# (a lone user name is kept for ssh-style users such as git@ and deploy@ without a password)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
# ?token=… &access_token=… &private_token=… &key=… &password=… &sig=…
_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|sig|signature|"
    r"credential|auth)[A-Za-z0-9_.-]*)=)(?P<value>[^&;#\s'\"]+)",
    re.IGNORECASE,
)
_TOKEN_USERS = re.compile(r"^(?:ghp_|gho_|ghs_|github_pat_|glpat-|x-access-token|oauth2)", re.I)


def _userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, colon, _secret = userinfo.partition(":")
    if colon:
        return f"{match.group('scheme')}{user}:{MASK}@"
    if _TOKEN_USERS.match(user) or len(user) >= 32:  # a bare token in the user part
        return f"{match.group('scheme')}{MASK}@"
    return match.group(0)


def redact(text: str) -> str:
    """``text`` with URL passwords, bare tokens and token-like query values masked."""
    if "://" not in text and "=" not in text:
        return text  # the common case: nothing that could hold a credential
    text = _USERINFO.sub(_userinfo, text)
    return _QUERY.sub(lambda m: m.group("key") + MASK, text)
