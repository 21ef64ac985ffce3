"""Dependency scheduling: a step starts as soon as every step it needs is done, so sections that do not need
each other overlap (the etcd section and postgres.packages, say) instead of running one after the other.

What a step needs (Step.needs): by default the step before it in its section (the first step of a section:
the step before it in the run); `needs=(...)` names them instead, e.g. postgres.packages needs only
bundle.push. A needed step is done when it is done on every host it runs on. A need outside this run's
steps (`inv patroni.install` has no etcd steps) is met; a step whose needs are all outside it follows the
step before it. A step never needs one after it in the run's order (a definition error, said up front), so
the order of the run is always a valid order: --dry, --step and --verify keep walking it one step at a time.

A failure stops what needs the failed step (directly or not); steps that do not need it go on, and the run
fails at the end with every failure.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from runbook.core.step import Step
from runbook.errors import RunbookError

MAX_STEPS_AT_ONCE = 8  # steps in flight; the hosts they work on are bounded by runbook.parallel


class NeedsError(RunbookError):
    exit_code = 2


def needs_of(steps: list[Step]) -> dict[int, set[int]]:
    """{position: positions of the steps it needs} for the steps of one run, in their order."""
    pos = {s.name: i for i, s in enumerate(steps)}
    out: dict[int, set[int]] = {}
    for i, s in enumerate(steps):
        deps: set[int] = set()
        for name in getattr(s, "needs", None) or ():
            j = pos.get(name)
            if j is None:
                continue  # not part of this run: met
            if j >= i:
                raise NeedsError(f"step {s.name} needs {name}, which comes after it in the runbook ({name} is "
                                 f"step {j + 1}, {s.name} step {i + 1}); fix Step.needs of {s.name}")
            deps.add(j)
        if not deps and i:
            same = [j for j in range(i) if steps[j].section == s.section]
            deps = {same[-1] if same and getattr(s, "needs", None) is None else i - 1}
        out[i] = deps
    return out


def waves(steps: list[Step]) -> dict[int, int]:
    """{position: wave} in dependency order: wave 1 needs nothing in this run, wave n needs steps of waves below
    n (one of them n - 1). A step starts when what it needs is done, so steps of one wave may run at once."""
    needs = needs_of(steps)
    out: dict[int, int] = {}
    for i in range(len(steps)):  # needs point backwards only (needs_of says so up front)
        out[i] = 1 + max((out[j] for j in needs[i]), default=0)
    return out


def plan_order(steps: list[Step]) -> dict[str, tuple[int, list[str]]]:
    """{step name: (wave, names of the steps of this run it needs)}: the order the plan table shows."""
    needs = needs_of(steps)
    wave = waves(steps)
    return {s.name: (wave[i], [steps[j].name for j in sorted(needs[i])]) for i, s in enumerate(steps)}


def run_graph(steps: list[Step], body: Callable[[int], dict[str, str]]) -> tuple[dict[int, dict[str, str]], set[int]]:
    """Run body(i) for every step once its needs are done, several at once. Returns the failures
    ({position: {host: error}}) and the positions never started because a step they need failed. An
    exception from body (a bug, a bad bundle) lets the steps in flight finish, starts nothing more, and is
    raised then."""
    needs = needs_of(steps)
    pending = set(range(len(steps)))
    ok: set[int] = set()
    failed: dict[int, dict[str, str]] = {}
    blocked: set[int] = set()
    running: dict[Future, int] = {}
    crash: BaseException | None = None
    with ThreadPoolExecutor(max_workers=MAX_STEPS_AT_ONCE) as pool:
        while True:
            if crash is None:
                for i in sorted(pending):
                    if needs[i] & (set(failed) | blocked):
                        blocked.add(i)
                        pending.discard(i)
                    elif needs[i] <= ok and len(running) < MAX_STEPS_AT_ONCE:
                        pending.discard(i)
                        running[pool.submit(body, i)] = i
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    errors = fut.result()
                except BaseException as exc:  # noqa: BLE001 - raised once the steps in flight are done
                    crash = crash or exc
                    continue
                if errors:
                    failed[i] = errors
                else:
                    ok.add(i)
    if crash is not None:
        raise crash
    return failed, blocked | pending
