"""Observability against a real core running the example plugins: /metrics after real calls,
errors by type, the HTTP listener's refusals, no secret served, ``aigisctl top`` in a real
terminal (tmux), the status page in headless Chromium, and bash completion."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aigis import _ctlclient as client
from aigis._ctlwire import control_key_path
from tests.integration.daemon import DaemonProcess
from tests.integration.test_supervision import ctl, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"
SECRET = (EXAMPLES / "secrets" / "oracle" / "motd.secret").read_text().strip()
URL_TOKEN = "s3cr3t-url-token"
ARTIFACTS = Path(os.environ.get("AIGIS_TEST_ARTIFACTS", REPO / "test-artifacts"))


def needs(tool: str) -> str:
    """The path of ``tool``; a skip without it, a failure under CI (``CI=true``)."""
    found = shutil.which(tool)
    if found is None:
        reason = f"{tool} is not installed (apt-get install {tool})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI must run this test", pytrace=False)
        pytest.skip(reason)
    return found


def write_config(tmp_path: Path, http: str = "127.0.0.1:0", extra: str = "") -> Path:
    config = tmp_path / "aigis.toml"
    config.write_text(
        f'[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
        f'plugin_user = "root"\n'
        f'secrets_dir = "{EXAMPLES / "secrets"}"\nhttp = "{http}"\n{extra}'
        f'[core]\ndnd = "{EXAMPLES / "plugins" / "dnd"}"\n'
        f'leaky = "https://operator:{URL_TOKEN}@127.0.0.1:9/leaky.git"\n'
        f'[internal]\noracle = "{EXAMPLES / "plugins" / "oracle"}"\n'
        f'[external]\nclock = "{EXAMPLES / "plugins" / "clock"}"\n'
    )
    return config


def http_port(daemon: DaemonProcess) -> int:
    log = daemon.wait_for("listening: http://")
    return int(re.search(r"listening: http://127\.0\.0\.1:(\d+)/", log).group(1))


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """The example plugins (and one whose git URL carries a token) with the HTTP listener on
    loopback; (config, daemon, port). Shared by the module: starting it costs seconds."""
    tmp_path = tmp_path_factory.mktemp("observe")
    config = write_config(tmp_path)
    daemon = DaemonProcess(config)
    try:
        port = http_port(daemon)
        daemon.wait_for("ready:")
        wait_until(
            lambda: (
                {r["name"]: r["state"] for r in request(config, "status")}
                == {"dnd": "loaded", "leaky": "failed", "oracle": "running", "clock": "running"}
            ),
            what="the oracle and the clock running (past their start-up second)",
        )
        yield config, daemon, port
    finally:
        daemon.stop()


def request(config: Path, op: str, *args) -> object:
    state = config.parent / "state"
    return client.request(config.parent / "run" / "control.sock", control_key_path(state), op,
                          list(args), wait=True)  # fmt: skip


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    ask = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(ask, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, parsed back with the client library's parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**values: str) -> tuple:
    return tuple(sorted(values.items()))


def test_metrics_count_every_call_by_skill_and_caller_and_errors_by_type(core):
    config, daemon, port = core
    for _ in range(1000):
        assert 1 <= int(request(config, "call", "dnd.roll", ["6"])) <= 6
    status, body = get(port, "/metrics")
    assert status == 200
    found = samples(body.decode())
    roll = labels(skill="dnd.roll", caller="aigisctl")
    assert found[("aigis_skill_calls_total", roll)] == 1000
    assert found[("aigis_skill_call_duration_seconds_count", roll)] == 1000
    le = labels(skill="dnd.roll", caller="aigisctl", le="+Inf")
    assert found[("aigis_skill_call_duration_seconds_bucket", le)] == 1000
    buckets = sorted(
        (float(dict(key)["le"]), value)
        for (name, key), value in found.items()
        if name == "aigis_skill_call_duration_seconds_bucket"
        and dict(key)["skill"] == "dnd.roll"
        and dict(key)["caller"] == "aigisctl"
    )
    assert len(buckets) > 10
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert 0 < found[("aigis_skill_call_duration_seconds_sum", roll)] < 1000
    assert found[("aigis_skill_received_bytes_total", roll)] == 1000 * len("dnd.roll6")
    assert not any(
        name == "aigis_skill_errors_total" and dict(key)["caller"] == "aigisctl"
        for name, key in found
    )

    for _ in range(3):  # Character() needs a name
        with pytest.raises(client.Failed) as failed:
            request(config, "call", "dnd.Character", [])
        assert failed.value.error == "TypeError"
    with pytest.raises(client.Failed):
        request(config, "call", "dnd.nosuchskill", [])
    assert ctl(config, "call", "dnd.roll", "0").returncode == 1  # randint(1, 0): ValueError
    found = samples(get(port, "/metrics")[1].decode())
    assert found[("aigis_skill_calls_total", roll)] == 1001
    error = labels(skill="dnd.roll", caller="aigisctl", error="ValueError")
    assert found[("aigis_skill_errors_total", error)] == 1
    error = labels(skill="dnd.Character", caller="aigisctl", error="TypeError")
    assert found[("aigis_skill_errors_total", error)] == 3
    assert found[("aigis_skill_calls_total", labels(skill="dnd.Character", caller="aigisctl"))] == 3
    error = labels(skill="_unresolved", caller="aigisctl", error="AttributeError")
    assert found[("aigis_skill_errors_total", error)] == 1
    assert not any("nosuchskill" in str(labels) for _, labels in found)
    states = {
        dict(key)["plugin"]: dict(key)["state"]
        for (name, key), value in found.items()
        if name == "aigis_plugin_state" and value == 1
    }
    rows = {row["name"]: row["state"] for row in request(config, "status")}
    assert states == rows, daemon.log[-3000:]  # one state each, the one status shows
    assert states["dnd"] == "loaded"
    assert found[("aigis_plugin_state", (("plugin", "leaky"), ("state", "failed")))] == 1
    assert found[("aigis_plugin_memory_bytes", (("plugin", "oracle"),))] > 1_000_000
    assert ("aigis_plugin_cpu_seconds_total", (("plugin", "clock"),)) in found
    assert found[("aigis_calls_in_flight", ())] == 0
    assert found[("aigis_connections_accepted_total", (("listener", "control"),))] >= 1004
    assert found[("aigis_core_threads", ())] >= 2
    assert found[("aigis_core_resident_memory_bytes", ())] > 1_000_000


def test_nothing_served_carries_a_secret_or_a_url_token(core):
    config, daemon, port = core
    assert SECRET in (config.parent / "state" / "ext" / "oracle" / "secrets" / "motd.secret"
                      ).read_text()  # fmt: skip
    wait_until(lambda: "leaky" in daemon.log, what="the leaky plugin failing")
    for path in ("/", "/status.js", "/status.css", "/status.json", "/metrics"):
        status, body = get(port, path)
        assert status == 200, path
        assert SECRET.encode() not in body, path
        assert URL_TOKEN.encode() not in body, path
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/../etc/passwd")[0] == 404


def test_status_json_shows_plugins_and_skills_with_owners(core):
    import json

    _, _, port = core
    data = json.loads(get(port, "/status.json")[1])
    plugins = {p["name"]: p for p in data["plugins"]}
    assert set(plugins) == {"dnd", "leaky", "oracle", "clock"}
    assert "source" not in plugins["leaky"]
    assert plugins["oracle"]["memory_bytes"] > 0
    skills = {s["skill"]: s for s in data["skills"]}
    assert skills["dnd.roll"]["owner"] == "dnd"


def test_status_shows_cpu_and_memory_columns(core):
    config, _, _ = core
    proc = ctl(config, "status")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:9] == ["NAME", "TYPE", "HOST", "STATE", "PID", "RESTARTS", "UPTIME",
                                  "CPU", "MEM"]  # fmt: skip
    oracle = next(r for r in rows if r.startswith("oracle "))
    assert re.search(r"\d+\.\ds\s+\d+\.\dM", oracle), oracle


def test_top_prints_one_snapshot_when_not_on_a_terminal(core):
    config, daemon, _ = core
    request(config, "call", "dnd.roll", ["20"])
    proc = ctl(config, "top")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("AIGIS ")
    assert any(line.startswith("oracle ") and "running" in line for line in lines), (
        proc.stdout + daemon.log
    )
    skill = lines.index(next(line for line in lines if line.startswith("SKILL")))
    assert lines[skill + 1].startswith("dnd.roll ")  # the busiest skill first


def test_top_runs_in_a_real_terminal_and_quits_on_q(core, tmp_path):
    config, _, _ = core
    tmux = needs("tmux")
    server = f"aigis-top-{os.getpid()}"
    screen = ""

    def capture() -> str:
        nonlocal screen
        screen = subprocess.run([tmux, "-L", server, "capture-pane", "-p", "-t", "top"],
                                capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        return screen

    command = f"{sys.executable} -m aigis._ctl -c {config} top -d 0.5"
    subprocess.run([tmux, "-L", server, "-f", "/dev/null", "new-session", "-d", "-s", "top",
                    "-x", "120", "-y", "30", command], check=True, timeout=10)  # fmt: skip
    try:
        request(config, "call", "dnd.roll", ["20"])
        wait_until(lambda: "dnd.roll" in capture() and "oracle" in screen, timeout=20,
                   what="top showing the plugins and the skill")  # fmt: skip
        for name in ("dnd", "oracle", "clock", "leaky"):
            assert re.search(rf"^{name}\s", screen, re.M), screen
        skill_lines = screen[screen.index("SKILL") :].splitlines()
        assert skill_lines[1].startswith("dnd.roll"), screen
        (ARTIFACTS).mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "aigisctl-top.txt").write_text(screen)
        subprocess.run([tmux, "-L", server, "send-keys", "-t", "top", "q"], check=True,
                       timeout=10)  # fmt: skip
        wait_until(
            lambda: subprocess.run([tmux, "-L", server, "has-session", "-t", "top"],
                                   capture_output=True, timeout=10).returncode != 0,
            timeout=10, what="top to quit on q",
        )  # fmt: skip
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True, timeout=10)


def test_the_status_page_in_headless_chromium_shows_the_example_plugins(core, tmp_path):
    _, _, port = core
    browser = needs("chromium")
    driver_path = needs("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,800",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "yes"
        )
        # One script reads the tables at once: the page replaces its rows every refresh.
        shown = dict(driver.execute_script(
            "return Array.from(document.querySelectorAll('#plugins tbody tr'))"
            ".map(r => [r.dataset.plugin, r.innerText])"
        ))  # fmt: skip
        assert set(shown) == {"dnd", "leaky", "oracle", "clock"}
        assert "running" in shown["oracle"] and "loaded" in shown["dnd"]
        skills = driver.execute_script(
            "return Array.from(document.querySelectorAll('#skills tbody tr'))"
            ".map(r => r.dataset.skill)"
        )
        assert "dnd.roll" in skills
        assert not driver.find_elements(By.CSS_SELECTOR, "button, form, input")  # read-only
        assert URL_TOKEN not in driver.page_source and SECRET not in driver.page_source
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


def test_bash_completes_commands_and_plugin_names(core, tmp_path):
    config, _, _ = core
    bash = needs("bash")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "aigisctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m aigis._ctl "$@"\n')
    wrapper.chmod(0o755)
    script = REPO / "packaging" / "completion" / "bash" / "aigisctl"

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        program = (
            f"source {script}\n"
            f"COMP_WORDS=({line})\nCOMP_CWORD={len(words) - 1}\n"
            f'COMP_LINE="{line}"\nCOMP_POINT=${{#COMP_LINE}}\n'
            "_aigisctl aigisctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "AIGIS_CONFIG": str(config)}
        proc = subprocess.run([bash, "--norc", "--noprofile", "-c", program], env=env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return [w for w in proc.stdout.splitlines() if w]

    assert {"status", "top", "call", "logs", "skills"} <= set(complete("aigisctl", "''"))
    assert complete("aigisctl", "st") == ["start", "status", "stop"]
    assert set(complete("aigisctl", "status", "''")) >= {"dnd", "oracle", "clock", "leaky"}
    assert complete("aigisctl", "status", "or") == ["oracle"]
    assert "dnd.roll" in complete("aigisctl", "call", "dnd.")
    assert "--json" in complete("aigisctl", "status", "--")


def test_a_non_loopback_listener_without_a_token_file_is_refused(tmp_path):
    config = write_config(tmp_path, http="0.0.0.0:9120")
    proc = subprocess.run([sys.executable, "-m", "aigis", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 1
    assert '[aigis] http "0.0.0.0:9120" is not a loopback address: set http_token_file' in (
        proc.stderr
    )
    assert not (tmp_path / "run").exists()  # refused before anything was started
    check = ctl(config, "check")
    assert check.returncode == 1 and "http_token_file" in check.stderr


def test_a_token_file_makes_every_request_carry_the_token(tmp_path, daemons):
    token = tmp_path / "http.token"
    token.write_text("tok-123\n")
    config = write_config(tmp_path, extra=f'http_token_file = "{token}"\n')
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    port = http_port(daemon)
    for path in ("/", "/metrics", "/status.json"):
        status, body = get(port, path)
        assert status == 401 and b"aigis" not in body.lower(), path
        assert get(port, path, {"Authorization": "Bearer nope"})[0] == 401
        assert get(port, path, {"Authorization": "Bearer tok-123"})[0] == 200
    basic = base64.b64encode(b"anyone:tok-123").decode()
    assert get(port, "/", {"Authorization": f"Basic {basic}"})[0] == 200
    status, body = get(port, "/metrics", {"Authorization": "Bearer tok-123"})
    refused = samples(body.decode())[("aigis_handshakes_refused_total", (("listener", "http"),))]
    assert refused == 6


def test_zsh_completes_commands_and_plugin_names_in_a_real_terminal(core, tmp_path):
    config, _, _ = core
    tmux, zsh = needs("tmux"), needs("zsh")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "aigisctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m aigis._ctl "$@"\n')
    wrapper.chmod(0o755)
    server = f"aigis-zsh-{os.getpid()}"
    functions = REPO / "packaging" / "completion" / "zsh"
    shell = (f"env -i HOME={tmp_path} TERM=screen PATH={bindir}:/usr/bin:/bin "
             f"AIGIS_CONFIG={config} {zsh} -f")  # fmt: skip

    def keys(*sent: str) -> None:
        subprocess.run([tmux, "-L", server, "send-keys", "-t", "z", *sent], check=True,
                       timeout=10)  # fmt: skip

    def screen() -> str:
        return subprocess.run([tmux, "-L", server, "capture-pane", "-p", "-t", "z"],
                              capture_output=True, text=True, timeout=10).stdout  # fmt: skip

    subprocess.run([tmux, "-L", server, "-f", "/dev/null", "new-session", "-d", "-s", "z",
                    "-x", "120", "-y", "30", shell], check=True, timeout=10)  # fmt: skip
    try:
        keys(f"fpath=({functions} $fpath); autoload -U compinit; compinit -u -D; echo READY",
             "Enter")  # fmt: skip
        wait_until(lambda: "\nREADY" in screen(), timeout=20, what="zsh ready")
        keys("aigisctl st", "Tab")
        shown = wait_until(lambda: "stop" in (s := screen()) and "status" in s and s,
                           timeout=20, what="commands completed")  # fmt: skip
        assert "start" in shown
        keys("C-u", "aigisctl status ", "Tab")
        shown = wait_until(lambda: "oracle" in (s := screen()) and s, timeout=20,
                           what="plugin names completed")  # fmt: skip
        assert re.search(r"clock\s+dnd\s+leaky\s+oracle", shown), shown
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True, timeout=10)


def test_a_process_tree_is_read_by_walking_children_as_a_full_scan_would():
    from aigis._supervise.usage import process_usage, read_stats, tree_stats, tree_usage

    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:

        def sleeping() -> dict | None:
            found = tree_stats({"p": parent.pid})
            children = set(found) - {parent.pid}
            names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in children}
            return found if len(children) == 2 and names == {"sleep"} else None

        walked = wait_until(sleeping, timeout=10, what="the two sleeps running")
        assert set(walked) <= set(read_stats())
        # two reads of live processes: the sleeps' memory may still move for a moment after
        # exec, so wait (bounded) until both ways of reading agree; they never would if the
        # walk missed a process the full scan sees
        wait_until(
            lambda: process_usage({"p": parent.pid}) == tree_usage({"p": parent.pid}, read_stats()),
            timeout=10,
            what="the walk and the full scan to agree",
        )
    finally:
        os.killpg(parent.pid, 9)
        parent.wait(timeout=10)


def test_the_listener_serves_a_bounded_number_of_peers_and_answers_garbage_briefly(core):
    import socket

    from aigis._http import MAX_CONNECTIONS

    _, _, port = core
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\n")  # a request never finished: holds its slot
            idle.append(sock)

        # Every slot is taken once the server has accepted them all: the next peer is closed.
        def refused() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                return extra.recv(100) == b""

        wait_until(refused, timeout=20, what="a peer beyond the limit refused")
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        try:
            return get(port, "/metrics")[0] == 200
        except OSError:  # still refused: the closed peers' slots are being released
            return False

    wait_until(served, timeout=20, what="slots freed")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01<script>alert(1)</script> garbage\r\n\r\n")
        answer = sock.recv(65536)
    assert b"400" in answer[:20] and b"script" not in answer  # nothing echoed back


def test_the_operator_commands_never_import_prometheus_client(core):
    config, _, _ = core
    probe = (
        "import sys, io, contextlib, aigis._ctl as c\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    codes = [c.main(['-c', {str(config)!r}, *a]) for a in (['status'], ['top'])]\n"
        "print(codes, 'prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[0, 0] False", out.stderr


def test_calls_over_the_plugins_socket_are_counted_too(core):
    """Skill calls over the plugins' socket go through the RPC server: 1,000 calls of dnd.roll
    with the authkey count exactly 1,000 under caller "root" (a plugin's own key counts under
    its name: tests/integration/test_keys.py)."""
    from aigis._rpc.client import CoreClient, read_authkey

    config, _daemon, port = core
    state = config.parent / "state"
    key = ("aigis_skill_calls_total", labels(skill="dnd.roll", caller="root"))
    before = samples(get(port, "/metrics")[1].decode()).get(key, 0)
    with CoreClient(config.parent / "run" / "aigis.sock", read_authkey(state / "authkey")) as rpc:
        for _ in range(1000):
            rpc.call(("dnd", "roll"), (20,))
        with pytest.raises(ValueError):
            rpc.call(("dnd", "roll"), (0,))
    found = samples(get(port, "/metrics")[1].decode())
    assert found[key] - before == 1001
    bucket = ("aigis_skill_call_duration_seconds_count", labels(skill="dnd.roll", caller="root"))
    assert found[bucket] == found[key]
    error = labels(skill="dnd.roll", caller="root", error="ValueError")
    assert found[("aigis_skill_errors_total", error)] == 1
    oracle = ("aigis_skill_calls_total", labels(skill="dnd.roll", caller="oracle"))
    assert found.get(oracle, 0) >= 1  # the example internal plugin's own calls, under its name


PRINTER = '''"""Prints argv[1] lines, one partial line last, then waits."""
import sys, time
out = sys.stdout.buffer
for number in range(int(sys.argv[1])):
    out.write(b"line %d\\n" % number)
out.write(b"no newline")
out.flush()
time.sleep(3600)
'''


def test_the_lines_a_plugin_prints_are_counted_in_the_metrics(tmp_path, daemons):
    """The log sink's counts never reached the metrics: the family was always empty."""
    plugin = tmp_path / "printer"
    (plugin / "AIGIS").mkdir(parents=True)
    (plugin / "print.py").write_text(PRINTER)
    (plugin / "AIGIS" / "AIGIS.config").write_text(
        'PLUGIN_TYPE = "external"\nENTRYPOINT = "{root}"\n'
        f'LAUNCH = ["{sys.executable}", "{{root}}/print.py", "250"]\n'
    )
    config = tmp_path / "aigis.toml"
    config.write_text(
        '[aigis]\nstate_dir = "state"\nruntime_dir = "run"\nsupervisor = "embedded"\n'
        'plugin_user = "root"\n'  # as root: this interpreter may be where other users cannot go
        f'http = "127.0.0.1:0"\n[external]\nprinter = "{plugin}"\n'
    )
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    port = http_port(daemon)
    key = ("aigis_plugin_log_lines_total", labels(plugin="printer"))
    # 250 lines, then the partial one: the sink holds it until EOF, so 250 while it runs
    wait_until(
        lambda: samples(get(port, "/metrics")[1].decode()).get(key) == 250,
        what="250 lines counted",
    )
    found = samples(get(port, "/metrics")[1].decode())
    assert found[("aigis_plugin_log_dropped_bytes_total", labels(plugin="printer"))] == 0
    log = config.parent / "state" / "log" / "printer.log"
    assert log.read_bytes().count(b"\n") == 250
    assert ctl(config, "stop", "printer").returncode == 0  # EOF: the partial line goes out
    found = samples(get(port, "/metrics")[1].decode())
    assert found[key] == 251
    assert log.read_bytes().endswith(b"line 249\nno newline")
