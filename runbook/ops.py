"""Operations on recorded steps: rollback (with cascade), mark-done, forget, export, diffs."""
from __future__ import annotations

import difflib
import shlex
from dataclasses import replace

from .context import Ctx
from .engine import RunFailed, execute, Decision, evaluate_check  # noqa: F401  (re-exported)
from .inventory import Host, InventoryError
from .step import Put, Run, Step, fingerprint

DONE = ("done", "manual")


def find_step(steps: list[Step], name: str) -> Step:
    for s in steps:
        if s.name == name:
            return s
    raise InventoryError(f"no step named {name!r}; `inv runbook.status` lists them (e.g. etcd.config)")


def later_done(ctx: Ctx, steps: list[Step], step: Step, host: Host) -> list[Step]:
    """Steps after `step` that are recorded done on `host`, newest (highest index) first."""
    out = []
    for s in steps:
        if s.index > step.index:
            rec = ctx.ledger.get(host.name, s.name)
            if rec and rec.status in DONE:
                out.append(s)
    return sorted(out, key=lambda s: -s.index)


def data_guard(ctx: Ctx, step: Step, host: Host) -> list[Run]:
    """Before an undo that would delete a data dir: refuse when it is non-empty, unless --destroy-data."""
    if step.guards_data is None or ctx.options.destroy_data:
        return []
    d = shlex.quote(step.guards_data(ctx, host))
    return [Run(f"if [ -d {d} ] && [ -n \"$(ls -A {d})\" ]; then echo 'refusing: {d} is not empty; "
                f"pass --destroy-data to delete it' >&2; exit 3; fi")]


def rollback(ctx: Ctx, steps: list[Step], name: str, hosts: list[Host], cascade: bool) -> list[tuple[str, str]]:
    """Undo `name` on hosts (and, with cascade, every later done step first, newest first)."""
    step = find_step(steps, name)
    if step.role == "local":
        hosts = ctx.inventory.role("local")
    plan: list[tuple[Host, Step]] = []
    for h in hosts:
        if step.role not in ("all", "local") and not h.has(step.role):
            raise InventoryError(f"{name} does not apply to {h.name} (role {step.role})")
        later = later_done(ctx, steps, step, h)
        if later and not cascade:
            raise RunFailed(f"refusing to roll back {name} on {h.name}: later steps are done there "
                            f"({', '.join(s.name for s in later)}); roll those back first or pass --cascade")
        plan += [(h, s) for s in later] + [(h, step)]
    # Refuse before anything is undone: a step without an undo, or a data dir the undo would delete.
    for h, s in plan:
        if s.undo_fn is None:
            raise RunFailed(f"{s.name} on {h.name} cannot be rolled back: {s.undo_reason or 'no undo defined'}")
    for h, s in plan:
        for g in data_guard(ctx, s, h):
            r = ctx.transport_for(h).run(h, g.cmd, timeout=60)
            if not r.ok:
                why = (r.stderr.strip() or r.stdout.strip())[-300:] or f"{s.guards_data(ctx, h)} is not empty"
                hint = "" if "--destroy-data" in why else "; pass --destroy-data to delete it"
                raise RunFailed(f"refusing to roll back {name} on {h.name}: the undo of {s.name} would delete "
                                f"data: {why}{hint}; nothing was rolled back")
    done: list[tuple[str, str]] = []
    for h, s in plan:
        actions = data_guard(ctx, s, h) + s.undo_fn(ctx, h)
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


def mark_done(ctx: Ctx, steps: list[Step], name: str, hosts: list[Host], note: str | None) -> None:
    """Record that a person did `name` by hand; the fingerprint is today's, so automation skips it."""
    step = find_step(steps, name)
    if step.role == "local":
        hosts = ctx.inventory.role("local")
    for h in hosts:
        fp = fingerprint(step.actions_fn(ctx, h))
        ctx.ledger.set(h.name, step.name, "manual", fingerprint=fp, mode="manual", note=note or "done by hand")
        ctx.ledger.event(h.name, step.name, "mark-done", f"marked done by hand: {note or ''}")


def file_diffs(ctx: Ctx, dec: Decision) -> list[str]:
    """Unified diffs of the step's rendered files against the host (secrets masked)."""
    out = []
    for a in dec.actions:
        if not isinstance(a, Put):
            continue
        tr = ctx.transport_for(dec.host)
        try:
            current = tr.read(dec.host, a.path) or ""
        except Exception as exc:  # an unreachable host: the plan still shows, the diff says why
            out.append(f"--- {dec.host.name}:{a.path}: cannot read ({exc})")
            continue
        new = a.content.decode(errors="replace")
        if current == new:
            continue
        if a.local_copy:  # a private key: say that it differs, never show it
            out.append(f"--- {dec.host.name}:{a.path}: differs from {a.local_copy} (content not shown)")
            continue
        if a.secret:
            current, new = ctx.redact(current), ctx.redact(new)
        out.append("".join(difflib.unified_diff(current.splitlines(True), new.splitlines(True),
                                                f"{dec.host.name}:{a.path} (on host)", f"{a.path} (rendered)")))
    return out


def export_markdown(ctx: Ctx, steps: list[Step]) -> str:
    """The whole runbook for a person: per section, step and host, exact commands and files."""
    inv = ctx.inventory
    lines = [f"# Runbook for cluster `{inv.cluster.name}`", "",
             f"Inventory: `{inv.path}`. Run every block as root on the host named in its heading, in order.",
             "Secrets are masked as `***`: take them from state/secrets.yml on the control machine.",
             "After doing a step by hand, record it: `inv runbook.mark-done STEP --hosts HOST --note '...'`.", ""]
    section = None
    for s in steps:
        if s.section != section:
            section = s.section
            lines += [f"## Section `{section}`", ""]
        lines += [f"### {s.name}: {s.title}", ""]
        body = "\n".join(line.strip() for line in s.doc.strip().splitlines()[1:]).strip()
        if body:
            lines += [body, ""]
        hosts = ctx.inventory.role(s.role)
        lines.append(f"Hosts: {', '.join(h.name for h in hosts)} ({s.kind})." + "\n")
        for h in hosts:
            lines += [f"#### {s.name} on {h.name}", "", "```sh"]
            lines += [a.shell(ctx.redact) for a in s.actions_fn(ctx, h)]
            lines += ["```", ""]
            probe = s.check_fn(ctx, h) if s.check_fn else None
            if isinstance(probe, str):
                lines += ["Check (exit 0 = done):", "", "```sh", ctx.redact(probe), "```", ""]
    return "\n".join(lines)
