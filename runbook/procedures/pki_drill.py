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


def starts_since(ctx: Ctx, h: Host, since: float) -> int:
    """How many times the host's service (etcd, or Patroni) started since *since* (epoch seconds), per its journal."""
    unit = "etcd" if h.has("etcd") else "patroni"
    r = ctx.transport.run(h, f"journalctl -u {unit} --since @{int(since)} -o cat --no-pager | grep -c '^Started ' "
                             "|| true", timeout=30)
    return int((r.stdout.strip() or "0").splitlines()[-1])


def health(ctx: Ctx) -> list[str]:
    """What `cluster.status` would show unhealthy: etcd endpoints down or in error, no single Patroni leader, a
    member neither leading nor streaming ([] = healthy)."""
    from runbook.cluster.readers import etcd_status

    eps, errs = etcd_status(ctx)
    out = [f"etcd {h}: {e}" for h, e in errs.items()] + [f"etcd {e.endpoint}: {', '.join(e.errors)}"
                                                         for e in eps if e.errors]
    ms = members(ctx)
    if len([m for m in ms if m.is_leader]) != 1:
        out.append(f"{len([m for m in ms if m.is_leader])} Patroni leader(s)")
    out += [f"{m.name}: {m.role} {m.state}" for m in ms if not m.is_leader and not m.streaming]
    if len(ms) != len(ctx.inventory.postgres):
        out.append(f"{len(ms)} Patroni member(s) of {len(ctx.inventory.postgres)}")
    return out


def rotate_ca_drill(ctx: Ctx, cas: tuple[str, ...]) -> dict:
    """`pki.rotate-ca` under the writer, phase by phase (one operation): per phase its time, the starts of etcd
    and Patroni per member (journal) and the cluster's health after it; then acknowledged / present / lost."""
    from runbook.procedures.membership_ops import operation_id, run_with_id
    from runbook.procedures.pki_rotate_ca import OP, finish, phase_steps, target

    require_lab(ctx, "pki rotate-ca drill")
    lead = one_leader(members(ctx))
    prepare_table(ctx, host_of(ctx, lead.name))
    tgt = target(ctx, cas)
    op_id, resumed = operation_id(ctx, OP, tgt)
    phases: list[dict] = []
    w = start_writer(ctx, "pki-rotate-ca")
    try:
        t_all = time.monotonic()
        for name, steps in phase_steps(ctx, cas, op_id):
            since, t0 = time.time() - 1, time.monotonic()
            report, _, _ = run_with_id(ctx, OP, tgt, steps, op_id, resumed or bool(phases))
            took = time.monotonic() - t0
            phases.append({"phase": name, "seconds": round(took, 1), "steps_executed": len(report.executed),
                           "starts": {h.name: starts_since(ctx, h, since) for h in ctx.inventory.hosts},
                           "unhealthy": health(ctx)})
        finish(ctx, op_id)
        took = time.monotonic() - t_all
        time.sleep(1)
    finally:
        stopped = w.stop(30)
    return {"operation": op_id, "cas": list(cas), "rotation_s": round(took, 1), "phases": phases,
            "writer_stopped": stopped, **prove(ctx, w)}
