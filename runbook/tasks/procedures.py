"""Tasks of the day-2 procedures: `patroni.switchover|restart|reload`, `cluster.audit`, `drill.*`.

The procedures themselves (runbook.procedures) take a Ctx and raise ProcedureFailed; these wrappers open
the session, print with Rich and turn the result into an exit code.
"""
from __future__ import annotations

import json
import sys
import time

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.markup import escape
from rich.prompt import Confirm
from rich.table import Table

from runbook import console as ui
from runbook.tasks.session import session


@task(help={"verbose": "list the passed checks too, not only the findings",
            "json": "print every check as JSON (host, check, findings, warnings) instead of the table"})
def audit(c, verbose=False, json_=False):
    """Read-only security audit over SSH: key and secret file modes, TLS enforced on etcd, the REST API and
    PostgreSQL (ssl; pg_hba as the server reads it: hostssl + scram-sha-256 only, every reject before the rules
    that would accept what it refuses), a login without TLS probed over the network from another PostgreSQL
    host (and PgBouncer's port with the front door), service users, no secret in the ledger, the logs or the
    journal's sudo entries; capacity: inactive slots that retain WAL, etcd alarms, a backend over 80 % of its
    quota, compaction off. Exit 1 on any finding."""
    from runbook.procedures.audit import run_audit

    with session(c, "cluster.audit", lock=False) as ctx:
        checks = run_audit(ctx)
        findings = [(ch, p) for ch in checks for p in ch.problems]
        hosts = len({ch.host for ch in checks})
        summary = f"{len(findings)} finding(s) in {len(checks)} checks on {hosts} host(s)"
        if json_:
            doc = {"cluster": ctx.inventory.cluster.name, "findings": len(findings),
                   "checks": [{"host": ch.host, "check": ch.name, "findings": [ctx.redact(p) for p in ch.problems],
                               "warnings": [ctx.redact(w) for w in ch.warnings]} for ch in checks]}
            print(json.dumps(doc, indent=2))
            if findings:
                raise Exit(f"cluster.audit: {summary}", code=1)
            return
        t = Table(title=f"cluster.audit: {ctx.inventory.cluster.name}", title_justify="left")
        for col in ("host", "check", "finding"):
            t.add_column(col)
        for ch, p in findings:
            t.add_row(ch.host, escape(ch.name), f"[red]{escape(ctx.redact(p))}[/]")
        if verbose:
            for ch in checks:
                if not ch.problems:
                    t.add_row(ch.host, escape(ch.name), "[green]ok[/]")
        for ch in checks:
            for w in ch.warnings:
                t.add_row(ch.host, escape(ch.name), f"[yellow]warning: {escape(w)}[/]")
        if findings or verbose or any(ch.warnings for ch in checks):
            ui.console.print(t)
        if findings:
            raise Exit(f"cluster.audit: {summary}", code=1)
        ui.console.print(f"[bold green]✓[/] cluster.audit: {len(checks)} checks on {hosts} host(s), no findings")


@task(help={"dry": "survey only (health, sizes, alarms) and show what it would do; change nothing",
            "disarm": "disarm active alarms after the defragmentation, once every backend is back under its "
                      "quota (never a CORRUPT alarm)",
            "no_snapshot": "skip the snapshot",
            "health_wait": "seconds to wait for every member to be healthy after each member's defrag"})
def maintain(c, dry=False, disarm=False, no_snapshot=False, health_wait=60):
    """etcd maintenance: list alarms, defragment one member at a time (followers first, the leader last) with a
    health check of every member in between, then save a snapshot to the state dir (0600) verified with
    `etcdutl snapshot status`. Refuses to start when a member is unreachable or unhealthy (an alarm alone
    does not stop it: freeing space is the fix for NOSPACE). Each phase is recorded in the ledger."""
    from runbook.core.context import Options
    from runbook.procedures.etcd_maintain import Maintenance

    with session(c, "etcd.maintain", lock=not dry, options=Options(dry=dry)) as ctx:
        res = Maintenance(ctx, disarm=disarm, snapshot=not no_snapshot, health_wait=float(health_wait)).run()
        if not dry:
            ui.console.print(f"[bold green]✓[/] etcd.maintain: {len(res['defragmented'])} member(s) defragmented"
                             + (f", snapshot {res['snapshot']['path']}" if res.get("snapshot") else ""))


@task(help={"candidate": "host or member to promote (default: the sync standby)",
            "force": "do not ask for confirmation (needed without a terminal)"})
def switchover(c, candidate=None, force=False):
    """Switch the leader over to the sync standby: pre-checks (sync standby, lag 0, etcd healthy), the
    switchover, post-checks (new leader writes, old leader streams again and is its synchronous standby, as
    its PostgreSQL says); prints the time taken. Patroni shows it as "Sync Standby" up to loop_wait later."""
    from runbook.procedures.switchover import do_switchover

    if not force:
        if not sys.stdin.isatty():
            raise Exit("error: no terminal to confirm on; pass --force", code=2)
        if not Confirm.ask("switch over the leader?"):
            raise Exit("cancelled", code=1)
    with session(c, "patroni.switchover") as ctx:
        res = do_switchover(ctx, candidate, settle=False)
        ui.console.print(f"[bold green]✓[/] switchover {res['from']} -> {res['to']}: command {res['command_s']}s, "
                         f"new leader writable after {res['writable_s']}s, old leader streaming after "
                         f"{res['old_leader_streaming_s']}s, its synchronous standby after {res['sync_s']}s "
                         "(Patroni names it Sync Standby on its next cycle)")



@task(help={"pending": "only the members Patroni marks pending restart, in the order the changed settings "
                       "require (a standby-bound setting lowered: the primary first; else the replicas first, "
                       "then a switchover instead of restarting the primary)",
            "dry": "with --pending: show the changes and the order; restart nothing"})
def restart(c, pending=False, dry=False):
    """Restart PostgreSQL through Patroni, one member at a time, each waited for until it streams (and a sync
    standby is named again). Without --pending: every member, replicas first."""
    from runbook.procedures.switchover import rolling

    if dry and not pending:
        raise Exit("error: --dry goes with --pending (a plain restart restarts every member, replicas first)",
                   code=2)
    if pending:
        from runbook.procedures.pending_restart import restart_pending

        with session(c, "patroni.restart", lock=not dry) as ctx:
            res = restart_pending(ctx, dry=dry)
            if res["done"]:
                ui.console.print(f"[bold green]✓[/] patroni.restart --pending ({res['order']}): " + ", ".join(
                    f"{a} {m} {s}s" for a, m, s in res["done"]))
        return
    with session(c, "patroni.restart") as ctx:
        rolling(ctx, "restart")


@task
def reload(c):
    """Reload the Patroni/PostgreSQL configuration on every member, replicas first."""
    from runbook.procedures.switchover import rolling

    with session(c, "patroni.reload") as ctx:
        rolling(ctx, "reload")


FAILOVER_FIGURES = [
    ("new leader", "new_leader"), ("promoted after (s)", "promoted_s"),
    ("writes acknowledged again after (s)", "writable_s"),
    ("writable before the old leader was back", "writable_before_old_leader_back"),
    ("old leader boot (s)", "boot_s"), ("old leader streaming, after its boot (s)", "rejoin_after_boot_s"),
    ("old leader streaming, after the kill (s)", "old_leader_streaming_s"), ("rewind", "rewind"),
    ("longest write gap (s)", "longest_write_gap_s"), ("rows acknowledged", "acknowledged"),
    ("rows present on the final primary", "present"), ("final primary", "final_primary"), ("lost", "lost"),
    ("write errors (retried)", "write_errors")]


@task(help={"write_wait": "seconds to wait for writes on the new primary before booting the old leader "
                          "(with synchronous_mode_strict they only resume once it streams again)",
            "rejoin_timeout": "seconds to wait for the old leader to stream again after it boots",
            "frontdoor": "the writer connects to VIP:5000 (HAProxy -> PgBouncer) instead of the hosts (cluster.vip)"})
def drill_failover(c, write_wait=15, rejoin_timeout=240, frontdoor=False):
    """Lab drill: hard power-off of the leader under a writer; time until a new primary accepts writes,
    boot the old leader and wait until it streams again (pg_rewind), then prove no acknowledged row was lost."""
    from runbook.procedures.drill import failover_drill, require_lab

    with session(c, "drill.failover") as ctx:
        require_lab(ctx, "drill.failover")
        res = failover_drill(ctx, float(write_wait), float(rejoin_timeout), _writer_dsn(ctx, frontdoor))
        ok = res["lost"] == 0 and res.get("rejoined") and res.get("writable_s") is not None
        ctx.ledger.event(res["killed"], "drill.failover", "result", json.dumps(res), 0 if ok else 1)
        t = Table("figure", "value", title=f"drill.failover: {res['killed']} powered off", title_justify="left")
        for label, key in FAILOVER_FIGURES:
            t.add_row(label, str(res.get(key)))
        ui.console.print(t)
        for line in res.get("rewind_log", []):
            ui.console.print(f"  {line}", style="dim", markup=False)
        if not ok:
            raise Exit(f"drill.failover failed: lost {res['lost']}, rejoined {res.get('rejoined')}, "
                       f"writable {res.get('writable_s')}", code=1)
        ui.console.print(f"[bold green]✓[/] drill.failover: {res['acknowledged']} rows acknowledged, 0 lost")



@task(help={"count": "how many switchovers in a row (each back to the previous leader's standby)",
            "frontdoor": "the writer connects to VIP:5000 (HAProxy -> PgBouncer) instead of the hosts (cluster.vip)"})
def drill_switchover(c, count=2, frontdoor=False):
    """Lab drill: N switchovers in a row under a writer; per switchover the command time, until writable,
    until the old leader streams, the writer's longest gap; then proves no acknowledged row was lost."""
    from runbook.procedures.drill import require_lab, switchover_drill

    count = int(count)
    if count < 1:
        raise Exit("error: --count must be at least 1", code=2)
    with session(c, "drill.switchover") as ctx:
        require_lab(ctx, "drill.switchover")
        res = switchover_drill(ctx, count, _writer_dsn(ctx, frontdoor))
        ok = res["lost"] == 0
        ctx.ledger.event("local", "drill.switchover", "result", json.dumps(res), 0 if ok else 1)
        t = Table(title=f"drill.switchover x{count}", title_justify="left")
        for col in ("#", "from", "to", "command s", "writable s", "old leader streams s", "longest writer gap s"):
            t.add_column(col, justify="right" if col.endswith("s") else "left")
        for i, r in enumerate(res["rounds"], 1):
            t.add_row(str(i), *(r[k].removeprefix("patroni_") for k in ("from", "to")),
                      *(str(r[k]) for k in ("command_s", "writable_s", "old_leader_streaming_s", "writer_gap_s")))
        ui.console.print(t)
        ui.console.print(f"rows acknowledged {res['acknowledged']}, present on {res['final_primary']} "
                         f"{res['present']}, lost {res['lost']}; longest write gap {res['longest_write_gap_s']} s; "
                         f"write errors (retried) {res['write_errors']}")
        if not ok:
            raise Exit(f"drill.switchover: {res['lost']} acknowledged rows lost: {res['lost_seqs']}", code=1)
        ui.console.print(f"[bold green]✓[/] drill.switchover: {count} switchovers, 0 rows lost")


@task(help={"write_wait": "seconds to wait for writes through the VIP before booting the host again",
            "rejoin_timeout": "seconds to wait for the host (a PostgreSQL host) to stream again after it boots"})
def drill_vip(c, write_wait=15, rejoin_timeout=240):
    """Lab drill: hard power-off of the balancer holding the VIP under a writer on VIP:5000 (cluster.vip); time
    until another balancer holds the VIP and writes resume; boot it again, wait until the front door settled;
    then prove no acknowledged row was lost."""
    from runbook.procedures.drill import require_lab
    from runbook.procedures.frontdoor_drill import vip_drill

    with session(c, "drill.vip") as ctx:
        require_lab(ctx, "drill.vip")
        _writer_dsn(ctx, True)  # refuses an inventory without cluster.vip
        res = vip_drill(ctx, float(write_wait), float(rejoin_timeout))
        ok = res["lost"] == 0 and res.get("settled") and res.get("writable_s") is not None
        ctx.ledger.event(res["killed"], "drill.vip", "result", json.dumps(res), 0 if ok else 1)
        t = Table("figure", "value", title=f"drill.vip: {res['killed']} (VIP holder) powered off", title_justify="left")
        for label, key in (("VIP moved to", "vip_moved_to"), ("VIP moved after s", "vip_moved_s"),
                           ("the host was the leader", "was_leader"), ("writes resumed after s", "writable_s"),
                           ("longest write gap s", "longest_write_gap_s"), ("rows acknowledged", "acknowledged"),
                           ("rows present on the primary", "present"), ("lost", "lost"),
                           ("write errors (retried)", "write_errors"), ("settled after the boot", "settled"),
                           ("VIP holder at the end", "vip_holder_after")):
            t.add_row(label, str(res.get(key)))
        ui.console.print(t)
        if not ok:
            raise Exit(f"drill.vip failed: lost {res['lost']}, settled {res.get('settled')}, "
                       f"writable {res.get('writable_s')}", code=1)
        ui.console.print(f"[bold green]✓[/] drill.vip: {res['acknowledged']} rows acknowledged, 0 lost")


def _writer_dsn(ctx, frontdoor: bool) -> str | None:
    """--frontdoor: the writer's DSN through the VIP; refused when the inventory has no cluster.vip."""
    if not frontdoor:
        return None
    if ctx.inventory.cluster.vip is None:
        raise Exit(f"error: --frontdoor needs cluster.vip in {ctx.inventory.path} (the front door is off)", code=2)
    from runbook.procedures.frontdoor import frontdoor_dsn

    return frontdoor_dsn(ctx)


drill = Collection("drill")
drill.add_task(drill_failover, name="failover")
drill.add_task(drill_switchover, name="switchover")
drill.add_task(drill_vip, name="vip")


# -- secrets.rotate (password rotation) ---------------------------------------------------------
@task(help={"role": "rotate only this one: superuser, replication, rewind, admin or restapi (default: all)",
            "dry": "say what would be done (leader, roles, phases already done); change and generate nothing"})
def rotate(c, role=None, dry=False):
    """Rotate passwords: new ones changed on the current leader first (superuser included), then the Patroni
    configs re-rendered and reloaded on every host, then a TLS login proves each new password (and that the
    old one is refused). Resumable: a run after a failure finishes the same rotation with the same passwords."""
    from runbook.procedures.secrets_rotate import plan
    from runbook.procedures.secrets_rotate import rotate as do_rotate

    with session(c, "secrets.rotate", lock=not dry) as ctx:
        if dry:
            for line in plan(ctx, role):
                ui.console.print(f"  {line}")
            ui.console.print("dry run: nothing changed, nothing generated")
            return
        t0 = time.monotonic()
        res = do_rotate(ctx, role)
        ui.console.print(f"[bold green]✓[/] secrets.rotate {res['rotation']}: {', '.join(res['roles'])} rotated on "
                         f"the leader {res['leader']} in {time.monotonic() - t0:.1f}s")


secrets = Collection("secrets")
secrets.add_task(rotate)
