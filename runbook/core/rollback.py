"""Undo and hand-recorded work on steps: rollback (with cascade and the data guard) and mark-done."""
from __future__ import annotations

import shlex
from dataclasses import replace

from runbook.core.context import RunContext
from runbook.core.engine import Decision, RunFailed, evaluate_check, execute  # noqa: F401  (re-exported)
from runbook.core.step import Run, Step, fingerprint
from runbook.inventory import Host, InventoryError

DONE = ("done", "manual")


def find_step(steps: list[Step], name: str) -> Step:
    for s in steps:
        if s.name == name:
            return s
    raise InventoryError(f"no step named {name!r}; `inv runbook.status` lists them (e.g. etcd.config)")


def later_done(ctx: RunContext, steps: list[Step], step: Step, host: Host) -> list[Step]:
    """Steps after `step` that run on `host` and are recorded done there, newest (highest index) first."""
    out = []
    for s in steps:
        if s.index > step.index and host.name in {h.name for h in s.hosts(ctx, [host])}:
            rec = ctx.ledger.get(host.name, s.name)
            if rec and rec.status in DONE:
                out.append(s)
    return sorted(out, key=lambda s: -s.index)


def data_guard(ctx: RunContext, step: Step, host: Host) -> list[Run]:
    """Before an undo that would delete a data dir: refuse when it is non-empty, unless --destroy-data."""
    if step.guards_data is None or ctx.options.destroy_data:
        return []
    d = shlex.quote(step.guards_data(ctx, host))
    return [Run(f"if [ -d {d} ] && [ -n \"$(ls -A {d})\" ]; then echo 'refusing: {d} is not empty; "
                f"pass --destroy-data to delete it' >&2; exit 3; fi")]


def step_hosts(ctx: RunContext, step: Step, hosts: list[Host]) -> list[Host]:
    """The step's own hosts among `hosts` (Step.hosts); a named host it never runs on is an error."""
    mine = step.hosts(ctx, ctx.inventory.hosts)
    if step.role != "local":
        names = {h.name for h in mine}
        for h in hosts:
            if h.name not in names:
                raise InventoryError(f"{step.name} does not run on {h.name} (role {step.role}; it runs on "
                                     f"{', '.join(sorted(names)) or 'no host'})")
    return step.hosts(ctx, hosts)


def rollback(ctx: RunContext, steps: list[Step], name: str, hosts: list[Host], cascade: bool) -> list[tuple[str, str]]:
    """Undo `name` on hosts (and, with cascade, every later done step first, newest first)."""
    step = find_step(steps, name)
    plan: list[tuple[Host, Step]] = []
    for h in step_hosts(ctx, step, hosts):
        later = later_done(ctx, steps, step, h)
        if later and not cascade:
            raise RunFailed(f"refusing to roll back {name} on {h.name}: later steps are done there "
                            f"({', '.join(s.name for s in later)}); roll those back first or pass --cascade")
        plan += [(h, s) for s in later] + [(h, step)]
    # Refuse before anything is undone: a step without an undo, or a data dir the undo would delete.
    for h, s in plan:
        why = s.undo_missing(ctx, h)
        if why:
            raise RunFailed(f"{s.name} on {h.name} cannot be rolled back: {why}")
    for h, s in plan:
        for g in data_guard(ctx, s, h):
            r = ctx.transport_for(h).run(h, g.cmd, timeout=60)
            if not r.ok:
                data = s.guards_data(ctx, h) if s.guards_data else "its data dir"
                why = (r.stderr.strip() or r.stdout.strip())[-300:] or f"{data} is not empty"
                hint = "" if "--destroy-data" in why else "; pass --destroy-data to delete it"
                raise RunFailed(f"refusing to roll back {name} on {h.name}: the undo of {s.name} would delete "
                                f"data: {why}{hint}; nothing was rolled back")
    done: list[tuple[str, str]] = []
    for h, s in plan:
        actions = data_guard(ctx, s, h) + s.undo_actions(ctx, h)
        # The step's check probes the step's effect, which the undo removes: it must not judge the undo.
        dec = Decision(h, replace(s, check_fn=None), True, "rollback", "rollback", actions, fingerprint(actions))
        err = execute(ctx, dec, mode="rollback")
        if err:
            raise RunFailed(f"rollback of {s.name} on {h.name} failed: {err}\nnothing after it was rolled back; "
                            f"fix the cause and run the rollback again")
        # execute() recorded 'done' for the undo; the step itself is now rolled back
        ctx.ledger.set(h.name, s.name, "rolled_back", mode="rollback", note="undo ran")
        done.append((h.name, s.name))
    return done


def mark_done(ctx: RunContext, steps: list[Step], name: str, hosts: list[Host], note: str | None) -> None:
    """Record that a person did `name` by hand; the fingerprint is today's, so automation skips it."""
    step = find_step(steps, name)
    for h in step_hosts(ctx, step, hosts):
        fp = step.fingerprint(ctx, h, step.actions_fn(ctx, h))
        ctx.ledger.set(h.name, step.name, "manual", fingerprint=fp, mode="manual", note=note or "done by hand")
        ctx.ledger.event(h.name, step.name, "mark-done", f"marked done by hand: {note or ''}")
