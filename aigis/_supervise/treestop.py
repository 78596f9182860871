"""Stopping process trees in batches: SIGTERM to all at once, a deadline each, then SIGKILL."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aigis._log import about
from aigis._supervise.procs import Os, Stray

log = logging.getLogger(__name__)

STEP_MIN, STEP_MAX = 0.01, 0.1  # between looks at the groups: often at first, less once it drags
KILL_GRACE = 5.0  # after SIGKILL, how long a process may take to vanish (D state, dying NFS)
CONFIRM_EVERY = 0.5  # how often a batch with some quiet trees re-scans the table to confirm them


@dataclass
class Tree:
    """One plugin's processes to stop: its main (if running), groups, known escapees, tags."""

    name: str
    main: int | None  # a running main process: its exit arrives as an event (``main_gone``)
    groups: set[int]  # process groups (a main is its group's leader: pgid == main pid)
    tags: set[str]  # what a /proc scan looks for: descendants that left the groups (setsid)
    timeout: float  # SIGTERM -> SIGKILL
    escapees: set[int] = field(default_factory=set)
    deadline: float = 0.0
    kill_at: float | None = None  # set once SIGKILL went out: then survivors are given up on
    survivors: set[int] = field(default_factory=set)
    done: bool = False

    @property
    def killed(self) -> bool:
        """SIGKILL was needed."""
        return self.kill_at is not None


def stop_trees(
    os_: Os,
    trees: Sequence[Tree],
    main_gone: Callable[[Tree], bool],
    wait: Callable[[float], None],
    *,
    confirm: bool = True,
) -> None:
    """SIGTERM every tree at once; each gets its own deadline, then SIGKILL; returns when every
    tree is gone or given up (``survivors``). ``confirm``: a tree counts as gone only once a
    scan of the process table finds nothing with its tags (one scan serves the whole batch)."""
    now = os_.monotonic()
    for tree in trees:
        tree.deadline = now + tree.timeout
        for pgid in tree.groups:
            os_.kill_group(pgid, signal.SIGTERM)
        for pid in tree.escapees:
            os_.kill(pid, signal.SIGTERM)
    last_scan = now
    if confirm:
        _scan(os_, trees)
    pending, step = [tree for tree in trees if not tree.done], STEP_MIN
    while pending:
        now = os_.monotonic()
        for tree in pending:
            if tree.kill_at is None and now >= tree.deadline:
                _kill(os_, tree, now, main_alive=tree.main is not None and not main_gone(tree))
        quiet = [tree for tree in pending if _quiet(os_, tree, main_gone)]
        if quiet and not confirm:
            for tree in quiet:
                tree.done = True
        elif quiet and (len(quiet) == len(pending) or now - last_scan >= CONFIRM_EVERY):
            found = _scan(os_, quiet)
            last_scan = now
            for tree in quiet:
                tree.done = tree.name not in found
        for tree in pending:
            if not tree.done and tree.kill_at is not None and now >= tree.kill_at:
                tree.survivors = set(tree.escapees) | tree.groups
                if tree.main is not None and not main_gone(tree):
                    tree.survivors.add(tree.main)
                tree.done = True
        pending = [tree for tree in pending if not tree.done]
        if pending:
            soonest = min(t.kill_at if t.kill_at is not None else t.deadline for t in pending)
            wait(max(0.0, min(step, soonest - now)))
            step = min(step * 1.5, STEP_MAX)


def _quiet(os_: Os, tree: Tree, main_gone: Callable[[Tree], bool]) -> bool:
    """Nothing of the tree is known to be alive (groups and escapees are pruned as they go)."""
    if tree.main is not None and not main_gone(tree):
        return False
    tree.groups = {pgid for pgid in tree.groups if os_.group_alive(pgid)}
    tree.escapees = {pid for pid in tree.escapees if os_.alive(pid)}
    return not tree.groups and not tree.escapees


def _scan(os_: Os, trees: Sequence[Tree]) -> set[str]:
    """One look at the process table for the trees' tags: what left the groups is signalled
    (SIGKILL once the tree's deadline passed). Returns the names of trees with processes."""
    by_tag = {tag: tree for tree in trees for tag in tree.tags}
    found: set[str] = set()
    roots = [tree.main for tree in trees if tree.main is not None]
    for pid, tagged in os_.find_tagged(by_tag.keys(), roots).items():
        tree = by_tag[tagged.tag]
        found.add(tree.name)
        if tagged.pgid in tree.groups or pid in tree.escapees:
            continue  # reached by killpg, or already signalled
        tree.escapees.add(pid)
        os_.kill(pid, signal.SIGKILL if tree.killed else signal.SIGTERM)
    return found


def _kill(os_: Os, tree: Tree, now: float, *, main_alive: bool) -> None:
    """The deadline passed: SIGKILL the groups, the main and every escapee."""
    alive = sorted(tree.escapees | ({tree.main} if main_alive and tree.main else set()))
    log.warning(
        'killing: "%s" %s alive %gs after SIGTERM (SIGKILL)',
        tree.name,
        f"pid {alive}" if alive else f"process group {sorted(tree.groups)}",
        tree.timeout,
        **about(tree.name),
    )
    for pgid in tree.groups:
        os_.kill_group(pgid, signal.SIGKILL)
    if main_alive and tree.main is not None:  # once reaped, its pid may be someone else's
        os_.kill(tree.main, signal.SIGKILL)
    for pid in tree.escapees:
        os_.kill(pid, signal.SIGKILL)
    tree.kill_at = now + KILL_GRACE


def stop_strays(os_: Os, name: str, strays: Sequence[Stray], timeout: float) -> None:
    """Stop what an earlier core left of plugin ``name`` (its groups and the processes seen),
    blocking until they are gone: the plugin must never run twice."""
    strays = [s for s in strays if os_.alive(s.pid)]
    if not strays:
        return
    log.warning(
        'stopping: "%s": %d process(es) left by an earlier core: %s',
        name,
        len(strays),
        " ".join(str(s.pid) for s in strays),
        **about(name),
    )
    tree = Tree(
        name,
        None,
        {s.pgid for s in strays},
        {s.tag for s in strays},
        timeout,
        escapees={s.pid for s in strays},
    )
    stop_trees(os_, [tree], lambda _: True, os_.sleep, confirm=False)
    if tree.survivors:
        log.error(
            'failed: "%s": could not stop processes left by an earlier core: %s',
            name,
            " ".join(map(str, sorted(tree.survivors))),
            **about(name),
        )
