"""The steps a remote host runs for its plugins: account, files and drop-ins, requirements, jobs.

Self-contained (standard library only, Python 3.11), like ``syncer``: the core sends this file's
source as ``python3 -c SOURCE COMMAND`` over the master connection with a JSON request on stdin
and reads one JSON answer on stdout. Runs as root on the host; every file it writes goes to a
fixed path given by the core, by rename, never through a symlink.

- ``prepare``: create the plugin's account (systemd-sysusers, as the core does locally), find
  missing SYSTEM_REQUIREMENTS; answers ``{"missing": [...], "python": sys.executable}``.
- ``install``: run the requirements command when its stamp changed, write the plugin's key
  files (0400 root's), the unit template (if the host has none) and the plugin's drop-in;
  answers what changed.
- ``jobs``: daemon-reload once if asked, then reset-failed + start, restart, stop units.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys

UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")  # fmt: skip
OUTPUT_MAX = 4000  # bytes of a requirements command's output sent back (its tail)


def _write(path: str, data: bytes, mode: int, dir_mode: int = 0o755) -> bool:
    """Replace ``path`` with ``data`` (mode ``mode``, root's) unless equal; True if written."""
    try:
        with open(path, "rb") as f:
            same = f.read() == data
        if same and (os.lstat(path).st_mode & 0o7777) == mode:
            return False
    except OSError:
        pass
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=dir_mode, exist_ok=True)
    temp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    if os.path.lexists(temp):
        os.unlink(temp)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        os.fchmod(out.fileno(), mode)
    os.replace(temp, path)
    return True


def prepare(request: dict) -> dict:
    user, line = request.get("user"), request.get("sysusers")
    if user and user != "root":
        try:
            pwd.getpwnam(user)
        except KeyError:
            if not line:
                why = f'user "{user}" (aigis.toml) does not exist on this host'
                raise SystemExit(why) from None
            fragment = f"/run/sysusers.d/{user}.conf"
            _write(fragment, line.encode(), 0o644)
            done = subprocess.run(["systemd-sysusers", fragment], capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
                raise SystemExit(f"systemd-sysusers could not create {user}: {why}") from None
    missing = [r for r in request.get("which", []) if shutil.which(r) is None]
    try:
        first = subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                               timeout=30).stdout.split()  # fmt: skip
        version = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
    except (OSError, subprocess.SubprocessError):
        version = 0
    return {"missing": missing, "python": sys.executable, "systemd": version}


def _requirements(req: dict) -> dict:
    """Run the command unless the stamp of its inputs is the one of the last success."""
    marker = req["marker"]
    try:
        with open(marker) as f:
            if f.read().strip() == req["stamp"]:
                return {"ran": False}
    except OSError:
        pass
    try:
        done = subprocess.run(["/bin/sh", "-c", req["shell"]], capture_output=True,
                              timeout=req["timeout"], stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"ran": True, "code": None, "output": f"timed out after {req['timeout']}s"}
    output = (done.stdout + done.stderr)[-OUTPUT_MAX:].decode(errors="replace")
    if done.returncode == 0:
        _write(marker, (req["stamp"] + "\n").encode(), 0o644)
    return {"ran": True, "code": done.returncode, "output": output}


def install(request: dict) -> dict:
    answer: dict = {}
    if request.get("requirements"):
        done = answer["requirements"] = _requirements(request["requirements"])
        if done["ran"] and done.get("code") != 0:
            return answer  # nothing installed: the plugin fails with the command's output
    changed = False
    for path, hexdata in sorted(request.get("files", {}).items()):
        changed = _write(path, bytes.fromhex(hexdata), 0o400, 0o700) or changed
    template = request.get("template")
    if template and not any(
        os.path.exists(os.path.join(d, "aigis-plugin@.service")) for d in UNIT_DIRS
    ):
        _write("/run/systemd/system/aigis-plugin@.service", template.encode(), 0o644)
        changed = True
    dropin = request.get("dropin")
    if dropin:
        changed = _write(dropin["path"], dropin["text"].encode(), 0o644) or changed
    answer["changed"] = changed
    return answer


def _systemctl(*args: str) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    return done.stderr.strip() if done.returncode != 0 else ""


def jobs(request: dict) -> dict:
    errors: dict[str, str] = {}
    if request.get("reload"):
        error = _systemctl("daemon-reload")
        if error:
            return {"errors": {"*": f"daemon-reload failed: {error}"}}
    for path in request.get("delete", []):
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass
    for how in ("stop", "restart", "start"):
        units = request.get(how, [])
        if not units:
            continue
        if how == "start":
            _systemctl("reset-failed", "--", *units)  # a start limit hit before must not hold
        flags = ["--no-block"] if how != "stop" else []
        error = _systemctl(how, *flags, "--", *units)
        if error:  # one bad unit fails the whole call: try them one by one for the culprit
            for unit in units:
                one = _systemctl(how, *flags, "--", unit)
                if one:
                    errors[unit] = one
    for unit in request.get("forget", []):
        _systemctl("reset-failed", "--", unit)
    return {"errors": errors}


def main(argv: list[str]) -> int:
    request = json.loads(sys.stdin.read() or "{}")
    command = {"prepare": prepare, "install": install, "jobs": jobs}.get(argv[1])
    if command is None:
        print(f"unknown command {argv[1]!r}", file=sys.stderr)
        return 2
    json.dump(command(request), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
