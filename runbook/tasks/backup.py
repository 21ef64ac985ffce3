"""Backup tasks: `backup.install` (the section), `backup.run|check|restore` (ledger steps: --dry, --step, --export,
resume; the irreversible wipe confirmed unless --yes) and `backup.list` (pgbackrest info as a table)."""
from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook import console as ui
from runbook.errors import RunbookError
from runbook.sections import section_steps
from runbook.tasks.operation import COMMON_HELP, run_procedure
from runbook.tasks.sections import JSON_HELP, print_json
from runbook.tasks.session import section_install, session


def _list_table(doc: dict) -> Table:
    t = Table(title=f"pgBackRest stanza {doc['stanza']}: {doc['status']}; archived WAL {doc['wal']['min'] or '-'} .. "
                    f"{doc['wal']['max'] or '-'}", title_justify="left")
    for col in ("label", "type", "start (UTC)", "seconds", "size", "in repository", "WAL start", "WAL stop"):
        t.add_column(col)
    for b in doc["backups"]:
        t.add_row(b["label"], b["type"], b["start"][:19].replace("T", " "), str(b["seconds"]),
                  f"{b['size_bytes'] / 2**20:.1f} MiB", f"{b['repo_bytes'] / 2**20:.1f} MiB", b["wal_start"],
                  b["wal_stop"] + (" [red]error[/]" if b["error"] else ""))
    return t


@task(help={"json": JSON_HELP})
def list_(c, json=False):
    """List the backups in the pgBackRest repository (pgbackrest info --output=json): label, type, times,
    sizes, WAL range; the stanza's status and the archived WAL."""
    from runbook.procedures.backup_ops import info_doc, read_info

    with session(c, "backup.list", lock=False) as ctx:
        try:
            doc = info_doc(read_info(ctx))
        except RunbookError as exc:
            raise Exit(f"error: backup.list: {exc}", code=getattr(exc, "code", 1) or 1) from None
        if json:
            print_json(doc)
        else:
            ui.console.print(_list_table(doc))


@task(help={"type": "full, diff (changes since the last full) or incr (since the last backup); default full",
            **COMMON_HELP})
def run(c, type="full", yes=False, dry=False, step=False, export=False):
    """Take a backup now on the repository host (from the current primary, over TLS), then list the backups."""
    from runbook.procedures.backup_ops import info_doc, read_info, require_repo, run_steps

    def build(ctx):
        return require_repo(ctx).name, run_steps(ctx, type)

    def after(ctx, target, seconds):
        ui.console.print(_list_table(info_doc(read_info(ctx))))

    run_procedure(c, "backup.run", build, dry=dry, step=step, export=export, yes=yes, after=after)


@task(help=COMMON_HELP)
def check(c, yes=False, dry=False, step=False, export=False):
    """pgbackrest check on the repository host and on the current leader: TLS between them, WAL archived
    from wherever the primary runs now."""
    from runbook.procedures.backup_ops import check_steps, require_repo

    run_procedure(c, "backup.check", lambda ctx: (require_repo(ctx).name, check_steps(ctx)), dry=dry, step=step,
                  export=export, yes=yes)


@task(help={"target_time": "recover up to this time: ISO 8601 with its zone, e.g. 2026-11-29T23:01:02+00:00",
            "on": "the restore host (role restore) to restore onto; default: the first one", **COMMON_HELP})
def restore(c, target_time, on=None, yes=False, dry=False, step=False, export=False):
    """Point-in-time restore onto a spare host (role restore), started standalone outside the cluster
    (localhost only, archiving off); prints the time of the last recovered transaction and the time taken.
    Wipes the previous restored copy on that host (irreversible, asked unless --yes)."""
    from runbook.procedures.restore import parse_target_time, recovered_at, restore_host, restore_steps

    def build(ctx):
        h = restore_host(ctx, on)
        return h.name, restore_steps(ctx, h, parse_target_time(target_time))

    def after(ctx, target, seconds):
        at = recovered_at(ctx, ctx.inventory.get(target))
        ui.console.print(f"restored on {target} in {seconds:.1f} s; last recovered transaction at {at or '-'} "
                         f"(target {target_time}); connect there: sudo -u postgres psql -h /var/run/postgresql")

    run_procedure(c, "backup.restore", build, dry=dry, step=step, export=export, yes=yes, after=after)


ns = Collection("backup")
ns.add_task(section_install("backup", lambda: section_steps("bundle") + section_steps("backup"),
                            "Install the backup section (pgBackRest packages, TLS, config, servers, archiving, "
                            "stanza, check, first full backup, timers); resumable.", {"backup", "postgres", "restore"}),
            name="install")
ns.add_task(run)
ns.add_task(list_, name="list")
ns.add_task(check)
ns.add_task(restore)


@task(help={"before": "seconds of writes before T", "after": "seconds of writes after T (then DROP TABLE)",
            "on": "the restore host (role restore); default: the first one"})
def drill_restore(c, before=5, after=5, on=None):
    """Lab drill: rows under the writer, a time T, more rows, DROP TABLE, then backup.restore to T on a restore
    host: every row acknowledged before T present, none written after T; prints the time to restore."""
    import json as jsonlib

    from runbook.procedures.restore_drill import restore_drill

    with session(c, "drill.restore") as ctx:
        try:
            res = restore_drill(ctx, float(before), float(after), on)
        except RunbookError as exc:
            raise Exit(f"error: drill.restore: {exc}", code=getattr(exc, "code", 1) or 1) from None
        ok = res["missing"] == 0 and res["restored_after_t"] == 0
        ctx.ledger.event(res["restored_on"], "drill.restore", "result", jsonlib.dumps(res), 0 if ok else 1)
        t = Table("figure", "value", title=f"drill.restore: to T on {res['restored_on']}", title_justify="left")
        for k in ("target_time", "recovered_at", "restore_s", "rows_written", "acknowledged_before_t",
                  "present_before_t", "written_after_t", "restored_after_t", "restored_rows", "write_errors"):
            t.add_row(k, str(res[k]))
        ui.console.print(t)
        if not ok:
            raise Exit(f"drill.restore failed: {res['missing']} acknowledged rows missing {res['missing_seqs']}, "
                       f"{res['restored_after_t']} rows from after T restored {res['leaked_seqs']}", code=1)
        ui.console.print(f"[bold green]✓[/] drill.restore: {res['present_before_t']} rows acknowledged before T "
                         f"present, none after; restored in {res['restore_s']} s")
