"""`inv drill.restore` (lab only): a mistaken DROP TABLE undone by a point-in-time restore, under the writer.

The writer inserts rows; the primary's clock is read as T; more rows; the writer stops; the table is read
(seq, transaction start time) and dropped. Then backup.restore to T on a restore host. Proven there: every row
acknowledged before T was asked for is present, no row whose transaction started after T is, and the time
to restore (the whole procedure: WAL switch, restore, replay, promotion) is printed.
"""
from __future__ import annotations

import datetime as dt
import shlex
import time

from runbook.cluster.commands import psql
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.backup_ops import read_info
from runbook.procedures.drill import TABLE, one_leader, prepare_table, require_lab, start_writer, writer_dsn
from runbook.procedures.membership_ops import run_operation
from runbook.procedures.restore import recovered_at, restore_host, restore_steps


def _rows(ctx: Ctx, host: Host, run: str) -> dict[int, float]:
    """{seq: epoch of its transaction start} of the drill's run, read on host as postgres."""
    sql = f"select seq, extract(epoch from at) from {TABLE} where run = '{run}'"
    r = ctx.transport.run(host, psql(ctx, f"-tA -F ' ' -c {shlex.quote(sql)}"), user="postgres", timeout=120)
    if not r.ok:
        raise ProcedureFailed(f"{host.name}: reading {TABLE} failed: {r.stderr.strip()[-300:]}", 1)
    return {int(a): float(b) for a, b in (line.split() for line in r.stdout.splitlines() if line.strip())}


def verdict(acked_before: set[int], started_after: set[int], restored: dict[int, float], t: float) -> dict:
    """The proof (pure): acknowledged before T all present; none started after T present."""
    missing = sorted(acked_before - set(restored))
    leaked = sorted(s for s, at in restored.items() if s in started_after or at > t)
    return {"acknowledged_before_t": len(acked_before), "present_before_t": len(acked_before & set(restored)),
            "missing": len(missing), "missing_seqs": missing[:20], "written_after_t": len(started_after),
            "restored_after_t": len(leaked), "leaked_seqs": leaked[:20], "restored_rows": len(restored)}


def restore_drill(ctx: Ctx, before: float, after: float, on: str | None) -> dict:
    require_lab(ctx, "drill.restore", power=False)  # it drops a table; the inventory may add hosts
    info = read_info(ctx)
    if not any(b.type == "full" for b in info.backups):
        raise ProcedureFailed("drill.restore refused: the repository has no full backup (inv backup.run)", 1)
    spare = restore_host(ctx, on)
    lead = host_of(ctx, one_leader(members(ctx)).name)
    prepare_table(ctx, lead)
    w = start_writer(ctx, "restore")
    try:
        time.sleep(before)
        import psycopg

        sent = time.monotonic()
        with psycopg.connect(writer_dsn(ctx)) as conn:
            row = conn.execute("SELECT clock_timestamp()").fetchone()
        if row is None:
            raise ProcedureFailed("the primary did not tell its time", 1)
        target: dt.datetime = row[0]
        time.sleep(after)
    finally:
        w.stop(30)
    original = _rows(ctx, lead, w.run)
    t = target.timestamp()
    acked_before = {s for s, at in w.acked if at < sent}
    started_after = {s for s, at in original.items() if at > t}
    r = ctx.transport.run(lead, psql(ctx, f"-v ON_ERROR_STOP=1 -c 'DROP TABLE {TABLE}'"), user="postgres", timeout=60)
    if not r.ok:
        raise ProcedureFailed(f"{lead.name}: DROP TABLE failed: {r.stderr.strip()[-300:]}", 1)
    t0 = time.monotonic()
    report, op_id, _ = run_operation(ctx, "backup-restore", spare.name, restore_steps(ctx, spare, target))
    seconds = time.monotonic() - t0
    if report.failed:
        raise ProcedureFailed(f"drill.restore: the restore failed ({op_id}); see `inv runbook.history`", 1)
    res = verdict(acked_before, started_after, _rows(ctx, spare, w.run), t)
    return {"target_time": target.astimezone(dt.UTC).isoformat(), "restored_on": spare.name,
            "recovered_at": recovered_at(ctx, spare), "restore_s": round(seconds, 1),
            "rows_written": len(original), "write_errors": w.errors, **res}
