"""Cluster section: prove replication end to end (write on the leader, read on every replica)."""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.core.step import Local, Section
from runbook.inventory import Host

section = Section("cluster", 50, "Cluster: end-to-end verification")


def write_and_read(ctx: Ctx) -> str:
    from runbook.cluster.commands import psql
    from runbook.cluster.readers import host_of, members, wait

    ms = members(ctx)
    lead = [m for m in ms if m.is_leader]
    if not lead:
        raise RuntimeError("no running leader: " + ", ".join(f"{m.name}={m.role}/{m.state}" for m in ms))
    lh = host_of(ctx, lead[0].name)
    token = f"verify-{ctx.ledger.run_id}"
    sql = ("CREATE TABLE IF NOT EXISTS runbook_verify (token text primary key, at timestamptz default now()); "
           f"INSERT INTO runbook_verify (token) VALUES ('{token}') ON CONFLICT DO NOTHING;")
    r = ctx.transport.run(lh, psql(ctx, f"-v ON_ERROR_STOP=1 -c {shlex.quote(sql)}"), user="postgres", timeout=60)
    if not r.ok:
        raise RuntimeError(f"{lh.name}: write on the leader failed: {r.stderr.strip()}")
    q = shlex.quote(f"select count(*) from runbook_verify where token = '{token}'")
    seen = []
    for m in ms:
        if m.is_leader:
            continue
        h = host_of(ctx, m.name)
        ok = wait(lambda h=h: ctx.transport.run(h, psql(ctx, f"-tAc {q}"), user="postgres").stdout.strip() == "1",
                  60, 1)
        if not ok:
            raise RuntimeError(f"{h.name}: the row written on {lh.name} did not arrive within 60 s")
        seen.append(h.name)
    if not seen:
        raise RuntimeError("no replica to read from")
    return f"row {token} written on {lh.name}, read on {', '.join(seen)}"


@section.step("verify", role="local")
def verify(ctx: Ctx, host: Host) -> list:
    """Verify: write a row on the leader and read it on every replica (bounded wait)"""
    return [Local("write a row on the leader, read it on every replica", lambda: write_and_read(ctx))]


@verify.undo
def _verify_undo(ctx: Ctx, host: Host) -> list:
    return []  # the verification rows stay in runbook_verify
