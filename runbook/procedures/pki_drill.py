"""Lab drill: `pki.rotate` of every leaf certificate under the writer harness.

A writer inserts rows through libpq multi-host (read-write) the whole time; the rotation runs as its
ledger steps (issue, then each purpose host by host, PostgreSQL replicas before the leader, each proven by a
fresh handshake); then every acknowledged row must be on the final primary. Figures: the rotation's time,
the writer's longest gap, main PIDs of etcd, Patroni and the postmaster before and after (a leaf rotation
restarts no service: etcd re-reads per handshake, Patroni and PostgreSQL reload).
"""
from __future__ import annotations

import time

from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members
from runbook.inventory import Host
from runbook.procedures.drill import one_leader, prepare_table, prove, require_lab, start_writer
from runbook.procedures.pki_rotate import run_rotation, selection


def main_pids(ctx: Ctx, h: Host) -> list[str]:
    """Main PIDs of the services on *h* (etcd; Patroni and the postmaster)."""
    if h.has("etcd"):
        cmd = "systemctl show -p MainPID --value etcd"
    else:
        cmd = (f"systemctl show -p MainPID --value patroni; "
               f"head -n 1 {ctx.paths.pgdata()}/postmaster.pid 2>/dev/null || echo none")
    return ctx.transport.run(h, cmd, timeout=30).stdout.split()


def rotation_drill(ctx: Ctx, hosts: str | None = None, service: str | None = None) -> dict:
    require_lab(ctx, "pki drill")
    pairs = selection(ctx, hosts, service)
    lead = one_leader(members(ctx))
    prepare_table(ctx, host_of(ctx, lead.name))
    before = {h.name: main_pids(ctx, h) for h in ctx.inventory.hosts}
    w = start_writer(ctx, "pki-rotate")
    try:
        t0 = time.monotonic()
        report, op_id, _ = run_rotation(ctx, pairs)
        took = time.monotonic() - t0
        time.sleep(1)
    finally:
        stopped = w.stop(30)
    after = {h.name: main_pids(ctx, h) for h in ctx.inventory.hosts}
    restarted = sorted(n for n in before if before[n] != after[n])
    return {"operation": op_id, "certificates": len(pairs), "steps_executed": len(report.executed),
            "rotation_s": round(took, 1), "writer_stopped": stopped, "restarted": restarted,
            **prove(ctx, w)}
