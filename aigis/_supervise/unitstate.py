"""systemd's view of a plugin unit, and its translation into the shared states (pure)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace

from aigis._states import State
from aigis._supervise.policy import describe_exit

CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3  # ExecMainCode values (siginfo's si_code)
#: $EXIT_CODE as systemd passes it to ExecStopPost=, and the ExecMainCode it stands for.
_EXIT_CODES = {"exited": CLD_EXITED, "killed": CLD_KILLED, "dumped": CLD_DUMPED}


@dataclass(frozen=True)
class UnitState:
    """What systemd knows about one service unit."""

    unit: str
    load_state: str
    active_state: str
    sub_state: str
    result: str
    service_type: str  # Type=: "notify", "exec", "simple", ...
    restart: str  # the unit's Restart= policy: "no", "on-failure", ...
    n_restarts: int
    start_limit_burst: int
    main_pid: int
    exec_main_status: int
    exec_main_code: int  # 0 while running or never ran, CLD_EXITED=1, CLD_KILLED=2, CLD_DUMPED=3
    exec_main_start: float  # seconds since the epoch, 0 when it never ran
    state_change: float
    job_id: int  # 0 when no job is queued or running for the unit
    need_reload: bool  # unit files changed on disk since the last daemon-reload

    @property
    def returncode(self) -> int | None:
        """The last main process's exit as subprocess reports it (negative: signal), if any."""
        if self.exec_main_code in (CLD_KILLED, CLD_DUMPED):
            return -self.exec_main_status
        return self.exec_main_status if self.exec_main_code else None


@dataclass(frozen=True)
class ExitRecord:
    """How a unit's last main process ended, as its ExecStopPost= recorded it."""

    result: str  # $SERVICE_RESULT: success, exit-code, signal, timeout, ...
    code: int  # as ExecMainCode: CLD_EXITED, CLD_KILLED, CLD_DUMPED; 0 when none ran
    status: int  # as ExecMainStatus: the exit status or the signal number
    at: float  # when it was recorded (seconds since the epoch)


def parse_exit_record(text: str, at: float) -> ExitRecord | None:
    """``"success exited 0"`` or ``"signal killed TERM"`` (``$SERVICE_RESULT $EXIT_CODE
    $EXIT_STATUS``; the last two are empty when no main process ran); None when malformed."""
    words = text.split()
    if not 1 <= len(words) <= 3 or len(text) > 200:
        return None
    result, how, status = (*words, "", "")[:3]
    code = _EXIT_CODES.get(how, 0)
    if status.isdigit():
        number = int(status)
    else:
        try:
            number = signal.Signals[f"SIG{status}"].value
        except KeyError:
            number, code = 0, 0
    if code == 0:
        number = 0
    return ExitRecord(result, code, number, at)


def collected(unit: UnitState) -> bool:
    """True when systemd knows nothing of the unit's past (it never ran, or systemd collected the
    inactive unit): no process, no job, no exit status."""
    return (
        unit.active_state == "inactive"
        and not unit.job_id
        and not unit.exec_main_code
        and not unit.exec_main_start
    )


def with_exit_record(unit: UnitState, record: ExitRecord | None) -> UnitState:
    """``unit`` with how its last process ended taken from ``record`` when systemd collected it
    (its restart count and start time went with it); else ``unit`` unchanged."""
    if record is None or not record.code or not collected(unit):
        return unit
    return replace(
        unit,
        result=record.result,
        exec_main_code=record.code,
        exec_main_status=record.status,
        state_change=unit.state_change or record.at,
    )


@dataclass(frozen=True)
class UnitView:
    """A unit's state in the shared vocabulary."""

    state: State
    reason: str
    restarts: int
    last_exit: str | None
    gave_up: bool = False  # FAILED by the restart policy


def describe(unit: UnitState, *, restart_limit: int | None, stop_requested: bool) -> UnitView:
    """A plugin's state, reason, restarts and last exit from its unit's state (pure)."""
    code = unit.returncode
    last = describe_exit(code) if code is not None else None
    restarts = unit.n_restarts
    active, sub = unit.active_state, unit.sub_state
    if active in ("active", "reloading"):
        return UnitView(State.RUNNING, f"{unit.unit} {active}/{sub}", restarts, last)
    if active == "activating" and sub.startswith("auto-restart"):
        if restart_limit is not None and restarts >= restart_limit:
            # systemd 252 counts one more restart, which its start limit then refuses: the
            # unit turns failed (with the last exit) once RestartSec passes. Say so meanwhile.
            reason = f"{last or 'failed'}; restart limit {restart_limit} reached, giving up"
            return UnitView(State.BACKOFF, reason, restart_limit, last)
        limit = f"/{restart_limit}" if restart_limit else ""
        reason = f"{last}; restart {restarts + 1}{limit} pending"
        return UnitView(State.BACKOFF, reason, restarts, last)
    if active == "activating":
        return UnitView(State.STARTING, f"{unit.unit} {active}/{sub}", restarts, last)
    if active == "deactivating":
        reason = "stop requested" if stop_requested else f"stopping ({sub})"
        return UnitView(State.STOPPING, reason, restarts, last)
    if stop_requested:
        reason = f"stopped by request (last: {last or 'not running'})"
        return UnitView(State.STOPPED, reason, restarts, last)
    if active == "failed":
        if unit.restart != "no" or restart_limit == 0:
            # systemd 252 counts the restart its start limit then refuses (Result stays
            # exit-code): StartLimitBurst is RESTART + 1, so RESTART restarts really ran.
            if unit.start_limit_burst:
                restarts = min(restarts, unit.start_limit_burst - 1)
            noun = "restart" if restarts == 1 else "restarts"
            reason = f"gave up after {restarts} {noun} (last: {last})"
            return UnitView(State.FAILED, reason, restarts, last, gave_up=True)
        if unit.result not in ("exit-code", "signal", "core-dump"):
            return UnitView(State.FAILED, f"failed ({unit.result}; last: {last})", restarts, last)
        reason = f"{last}; not restarted (RESTART not set)"
        return UnitView(State.FAILED, reason, restarts, last, gave_up=True)
    if code == 0:
        return UnitView(State.EXITED, "exited cleanly (exit 0)", restarts, last)
    if unit.exec_main_start or unit.exec_main_code:
        return UnitView(State.STOPPED, f"stopped outside AIGIS (last: {last})", restarts, last)
    return UnitView(State.STOPPED, "not started", restarts, last)
