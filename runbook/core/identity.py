"""Ledger vs reality: which machine a host name stands for.

A host re-imaged (or a lab host re-created) under the same name has a bare disk while the ledger
says its steps are done. Every record carries the host's /etc/machine-id; a run reads it once per
host (one short command, in parallel, before the first step that reaches it; with --verify inside the
host's batch of checks) and a record written on another machine is void: its step runs again. A run that
the ledger alone decides (all done: runbook.core.offline) contacts no host and reads none.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from runbook.core.context import RunContext
from runbook.core.transport import TransportError
from runbook.inventory import LOCAL, Host

IDENTITY_CMD = "cat /etc/machine-id"
DONE = ("done", "manual", "running")
_READING = threading.Lock()


def read_identities(ctx: RunContext, hosts: list[Host]) -> list[str]:
    """Read the identity of every (remote) host once; return one notice per host whose records are void.

    Records written before identities were kept are adopted (stamped with today's identity, except in a
    dry run). An unreachable host or one without a machine-id is left undecided: its steps fail or run
    as before."""
    with _READING:  # steps in flight at once (runbook.core.schedule): one reads, the others wait for its answer
        return _read_identities(ctx, hosts)


def _read_identities(ctx: RunContext, hosts: list[Host]) -> list[str]:
    asked = ctx.ledger.identities
    todo = [h for h in {h.name: h for h in hosts}.values() if h.name != LOCAL.name and h.name not in asked]
    if not todo:
        return []
    records = ctx.ledger.all()
    recorded = {r.host for r in records}
    for h in todo:
        asked.setdefault(h.name, "")  # asked once per run, even when there is nothing to compare
    # A dry run reads only where there is a record to judge: a plan on a fresh state contacts no host.
    todo = [h for h in todo if h.name in recorded or not ctx.options.dry]
    if not todo:
        return []

    def one(h: Host) -> tuple[Host, str | None]:
        try:
            r = ctx.transport_for(h).run(h, IDENTITY_CMD, timeout=30)
        except TransportError:
            return h, None
        mid = r.stdout.strip()
        return h, mid if r.ok and mid else None

    with ThreadPoolExecutor(max_workers=max(1, min(ctx.options.parallel, len(todo)))) as pool:
        found = list(pool.map(one, todo))
    return note_identities(ctx, found, records)


def note_identities(ctx: RunContext, found: list[tuple[Host, str | None]], records: list | None = None) -> list[str]:
    """Keep the identities read (machine-id, or None: undecided) for this run; one notice per host whose
    records were written on another machine. Records without an identity adopt it (not in a dry run).
    Used by read_identities and by --verify's batch (runbook.core.batch), which reads it with the checks."""
    records = ctx.ledger.all() if records is None else records
    notices = []
    for h, mid in found:
        if mid is None:
            continue
        ctx.ledger.identities[h.name] = mid
        stale = [r for r in records if r.host == h.name and r.machine and r.machine != mid and r.status in DONE]
        if stale:
            n = len(stale)
            notices.append(f"{h.name} is a new machine: its {n} recorded step{'s' if n > 1 else ''} will run again")
        elif not ctx.options.dry:
            ctx.ledger.adopt_identity(h.name, mid)
    return notices


def voided(ctx: RunContext, host: Host, machine: str | None) -> bool:
    """True when the record was written on another machine than the one answering as `host` now."""
    now = ctx.ledger.identities.get(host.name)
    return bool(machine and now and machine != now)
