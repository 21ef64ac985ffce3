"""One membership operation (remove, reinit, add ...) as ledger steps run by the engine.

A day-2 procedure runs the same steps again next month on the same host: its records cannot simply stay
`done`. Each operation has an id, recorded on the control machine's row `membership:<op>:<target>` while it
is under way. A run that finds it `running` resumes the same operation (done steps are skipped, an
interrupted one is decided by its check, a destructive one is never repeated once done); a run that finds
it finished starts a new operation, whose id enters every step's fingerprint, so its steps run again.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import replace

from runbook.cluster.context import Ctx
from runbook.core.engine import Report, apply
from runbook.core.step import Step
from runbook.inventory import LOCAL

OP_HOST = LOCAL.name


def op_key(op: str, target: str) -> str:
    return f"membership:{op}:{target}"


def operation_id(ctx: Ctx, op: str, target: str) -> tuple[str, bool]:
    """(the operation's id, whether it resumes an interrupted one)."""
    rec = ctx.ledger.get(OP_HOST, op_key(op, target))
    if rec is not None and rec.status in ("running", "failed") and rec.note:
        return rec.note, True
    return f"{op}-{target}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}", False


def with_operation(steps: list[Step], op_id: str) -> list[Step]:
    """The procedure's own steps (section `etcd.add`, `patroni.remove`, ...: a dotted name) with the operation
    id in their fingerprint: a new operation runs them again. The install sections' steps a procedure reuses
    (etcd.config, patroni.config, ...) keep theirs, so that `cluster.up` afterwards finds them done."""
    out = []
    for s in steps:
        if "." not in s.section:
            out.append(s)
            continue
        own = s.depends_on

        def deps(ctx, host, own=own):
            return [f"operation {op_id}"] + (own(ctx, host) if own else [])

        out.append(replace(s, depends_on=deps))
    return out


def run_operation(ctx: Ctx, op: str, target: str, steps: list[Step],
                  known: tuple[str, bool] | None = None) -> tuple[Report, str, bool]:
    """Apply `steps` as one operation on `target`; (report, operation id, resumed). `known`: the (id, resumed)
    the caller took from operation_id() already (its steps were built with that id)."""
    op_id, resumed = known or operation_id(ctx, op, target)
    return run_with_id(ctx, op, target, steps, op_id, resumed)


def run_with_id(ctx: Ctx, op: str, target: str, steps: list[Step], op_id: str,
                resumed: bool) -> tuple[Report, str, bool]:
    """run_operation for steps that were built knowing their operation's id (from operation_id)."""
    key = op_key(op, target)
    steps = with_operation(steps, op_id)
    if not ctx.options.dry:
        ctx.ledger.set(OP_HOST, key, "running", note=op_id, mode="procedure")
        ctx.ledger.event(OP_HOST, key, "operation", f"{'resume' if resumed else 'start'} {op_id}")
    try:
        report = apply(ctx, steps, list(ctx.inventory.hosts), in_order=True)  # the list is the plan
    except Exception as exc:
        if not ctx.options.dry:
            ctx.ledger.set(OP_HOST, key, "failed", note=op_id, error=str(exc), mode="procedure")
        raise
    if not ctx.options.dry:
        ctx.ledger.set(OP_HOST, key, "done", note=op_id, mode="procedure")
    return report, op_id, resumed
