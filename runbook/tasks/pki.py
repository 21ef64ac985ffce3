"""Tasks of the PKI: `pki.status` (every certificate in use, per host and purpose), `pki.rotate` (new leaf
certificates rolled out host by host as ledger steps: --dry, --step, --export, resume) and `pki.rotate-ca`
(a new CA in three recorded phases)."""
from __future__ import annotations

import json as jsonlib
import time

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook import console as ui
from runbook.tasks.session import session


@task(help={"json": "print the rows as JSON (one object per certificate) instead of the table",
            "hosts": "comma-separated host names (default: every host)",
            "days": "a certificate expiring within this many days is a finding (default: runbook.pki_expiry_days)"})
def status(c, json=False, hosts=None, days=None):
    """Every certificate in use, per host and purpose, read from the hosts over SSH: subject, SANs, issuer,
    not-after, days left, and whether the file equals the record in state/pki (sha256); then the CAs. Exit 1
    when a certificate expires within the window, has expired, is missing or differs from the record."""
    from runbook.procedures.pki_status import collect, findings

    with session(c, "pki.status", lock=False) as ctx:
        selected = ctx.inventory.select(hosts)
        window = int(days) if days is not None else (ctx.settings.pki_expiry_days if ctx.settings else 30)
        rows = collect(ctx, selected)
        found = findings(rows, window)
        if json:
            print(jsonlib.dumps({"rows": [r.as_dict() for r in rows], "days": window,
                              "findings": [{"host": h, "finding": f} for h, f in found]}, indent=2))
        else:
            t = Table(title=f"pki.status: {ctx.inventory.cluster.name}", title_justify="left")
            for col in ("host", "service", "subject", "SANs", "issuer", "not after (UTC)", "days", "= state/pki"):
                t.add_column(col)
            for r in rows:
                days_txt = "-" if r.days_left is None else str(r.days_left)
                if r.days_left is not None and r.days_left < window:
                    days_txt = f"[red]{days_txt}[/]"
                same = ("[red]" + r.problem + "[/]" if r.problem else
                        "-" if r.host == "local" else "[green]yes[/]" if r.matches else "[red]no[/]")
                t.add_row(r.host, r.service, r.subject, r.sans, r.issuer, r.not_after, days_txt, same)
            ui.console.print(t)
            for h, f in found:
                ui.console.print(f"[red]✗[/] {h}: {f}")
        if found:
            raise Exit(f"pki.status: {len(found)} finding(s)", code=1)
        if not json:
            ui.console.print(f"[bold green]✓[/] pki.status: {len(rows)} certificates, none expiring within "
                             f"{window} days, every one as recorded")


@task(help={"hosts": "comma-separated host names (default: every host)",
            "service": "only these purposes, comma-separated: etcd-peer, etcd-server, etcd-root, etcd-client, "
                       "rest-server, rest-client, pg-server, haproxy-client, pgbouncer-server, pgbackrest "
                       "(default: every purpose of each host)",
            "dry": "show the plan (steps x hosts); change nothing",
            "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
            "export": "print the procedure as Markdown (exact commands and checks per host); change nothing"})
def rotate(c, hosts=None, service=None, dry=False, step=False, export=False):
    """Re-issue leaf certificates (new keys) and roll them out one host at a time, PostgreSQL replicas before the
    leader: each (host, purpose) is a ledger step that keeps the pair in place aside, writes the new one, has
    the one service take it (etcd per handshake; Patroni and PostgreSQL on `systemctl reload patroni`) and
    proves it with a fresh TLS handshake before the next host. Interrupted: run it again, it resumes; its
    undo (`inv runbook.rollback pki.rotate.<purpose>`) restores the pair kept aside."""
    from runbook.core.export import export_markdown
    from runbook.procedures.membership_ops import operation_id
    from runbook.procedures.pki_rotate import OP, rotate_steps, run_rotation, selection, target_of
    from runbook.tasks.operation import procedure_options

    options = procedure_options(c, dry, step, export)
    with session(c, "pki.rotate", lock=not (dry or export), options=options) as ctx:
        pairs = selection(ctx, hosts, service)
        if export:
            print(export_markdown(ctx, rotate_steps(ctx, pairs, operation_id(ctx, OP, target_of(pairs))[0])))
            return
        done = _run_shown(ctx, dry, lambda: run_rotation(ctx, pairs), "rotation")
        if done:
            ui.console.print(f"[bold green]✓[/] pki.rotate ({done[0]}): {len(pairs)} certificate(s) on "
                             f"{len({h.name for h, _ in pairs})} host(s); {done[1]}")


def _run_shown(ctx, dry: bool, run, what: str) -> tuple[str, str] | None:
    """Run an operation (*run*: () -> (report, id, resumed)); --dry: show its plan, None; else (id, summary)."""
    from runbook.tasks.session import show_plan

    t0 = time.monotonic()
    report, op_id, resumed = run()
    if dry:
        show_plan(ctx, report)
        return None
    if resumed:
        ui.console.print(f"[yellow]![/] resumed the interrupted {what} {op_id}")
    return op_id, ui.summary_line(report, time.monotonic() - t0)


@task(help={"ca": "which CA: main (every client-facing certificate), peer (etcd peer certificates) or all (default)",
            "dry": "show the plan (steps x hosts, the irreversible step marked); change nothing",
            "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
            "export": "print the procedure as Markdown (exact commands and checks per host); change nothing",
            "yes": "do not ask before the irreversible step (needed without a terminal)"})
def rotate_ca(c, ca="all", dry=False, step=False, export=False, yes=False):
    """A new CA without downtime, in three recorded phases: (1) every CA file on every host holds old + new CA,
    etcd restarted member by member, Patroni (paused) replicas first, the leader last; (2) every leaf of that CA
    re-issued from the new one and rolled out as `pki.rotate` does; (3) the new CA alone, the same restarts,
    then the old CA's key (kept aside in state/pki until then) is deleted: irreversible. Interrupted: run it
    again, it resumes; done steps are skipped."""
    from runbook.core.export import export_markdown
    from runbook.procedures.membership_ops import operation_id
    from runbook.procedures.pki_rotate_ca import OP, cas_of, rotate_ca_steps, run_rotate_ca, target
    from runbook.tasks.operation import confirm_irreversible, procedure_options

    options = procedure_options(c, dry, step, export)
    with session(c, "pki.rotate-ca", lock=not (dry or export), options=options) as ctx:
        cas = cas_of(ca)
        op_id, resumed = operation_id(ctx, OP, target(ctx, cas))
        if export:
            print(export_markdown(ctx, rotate_ca_steps(ctx, cas, op_id)))
            return
        if not dry:
            confirm_irreversible(rotate_ca_steps(ctx, cas, op_id), yes)
        done = _run_shown(ctx, dry, lambda: run_rotate_ca(ctx, cas), "CA rotation")
        if done:
            ui.console.print(f"[bold green]✓[/] pki.rotate-ca ({done[0]}): {', '.join(cas)} replaced; {done[1]}")


@task(help={"hosts": "the hosts of the rotation to undo, as given to pki.rotate (default: every host)",
            "service": "its purposes, as given to pki.rotate (default: every purpose)"})
def rollback(c, hosts=None, service=None):
    """Undo the last `pki.rotate` of these (host, purpose) pairs: on each host, newest step first, the pair kept
    aside is put back and proven served again (undo of pki.rotate.<purpose>); then state/pki takes the
    previous pairs back (undo of pki.rotate.issue)."""
    from runbook.core.rollback import rollback as undo
    from runbook.procedures.membership_ops import OP_HOST, op_key, with_operation
    from runbook.procedures.pki_rotate import OP, rotate_steps, selection, target_of

    with session(c, "pki.rollback") as ctx:
        pairs = selection(ctx, hosts, service)
        rec = ctx.ledger.get(OP_HOST, op_key(OP, target_of(pairs)))
        if rec is None or not rec.note:
            raise Exit(f"pki.rollback: no pki.rotate of {target_of(pairs)} is recorded; give --hosts and --service "
                       "exactly as the rotation had them (`inv runbook.history` shows it)", code=2)
        steps = with_operation(rotate_steps(ctx, pairs, rec.note), rec.note)
        undone = []
        for s in reversed(steps[1:]):
            hs = [h for h in s.hosts(ctx, ctx.inventory.hosts)
                  if (r := ctx.ledger.get(h.name, s.name)) is not None and r.status in ("done", "manual")]
            if hs:
                undone += undo(ctx, steps, s.name, hs, cascade=False)
        undone += undo(ctx, steps, "pki.rotate.issue", [], cascade=False)
        for h, name in undone:
            ui.console.print(f"[blue]rolled back[/] {name} on {h}")
        ui.console.print(f"[bold green]✓[/] pki.rollback of {rec.note}: {len(undone)} step(s) undone")


@task(help={"hosts": "comma-separated host names (default: every host)",
            "service": "only these purposes (default: every purpose)",
            "ca": "drill `pki.rotate-ca --ca CA` instead (main, peer or all): per phase its time, the starts of "
                  "etcd and Patroni per member and the cluster's health"})
def drill(c, hosts=None, service=None, ca=None):
    """Lab drill: `pki.rotate` (every certificate by default) under a writer; prints the rotation time, the
    writer's longest gap, services restarted (none expected) and proves no acknowledged row was lost.
    With --ca: `pki.rotate-ca` under the writer instead, phase by phase."""
    from runbook.procedures.pki_drill import rotation_drill

    if ca is not None:
        return _drill_ca(c, ca)
    with session(c, "pki.drill") as ctx:
        res = rotation_drill(ctx, hosts, service)
        ctx.ledger.event("local", "pki.drill", "result", jsonlib.dumps(res), 0 if res["lost"] == 0 else 1)
        t = Table(title="pki.drill: pki.rotate under a writer", title_justify="left")
        for col in ("certificates", "rotation s", "longest write gap s", "acknowledged", "lost", "restarted"):
            t.add_column(col)
        t.add_row(str(res["certificates"]), str(res["rotation_s"]), str(res["longest_write_gap_s"]),
                  str(res["acknowledged"]), str(res["lost"]), ", ".join(res["restarted"]) or "none")
        ui.console.print(t)
        if res["lost"] or res["restarted"]:
            raise Exit(f"pki.drill: {res['lost']} acknowledged row(s) lost, restarted: "
                       f"{', '.join(res['restarted']) or 'none'}", code=1)
        ui.console.print(f"[bold green]✓[/] pki.drill: {res['certificates']} certificates rotated in "
                         f"{res['rotation_s']} s, longest write gap {res['longest_write_gap_s']} s, 0 lost")


def _drill_ca(c, ca: str) -> None:
    from runbook.procedures.pki_drill import rotate_ca_drill
    from runbook.procedures.pki_rotate_ca import cas_of

    with session(c, "pki.drill") as ctx:
        res = rotate_ca_drill(ctx, cas_of(ca))
        ctx.ledger.event("local", "pki.drill", "result", jsonlib.dumps(res), 0 if res["lost"] == 0 else 1)
        t = Table(title=f"pki.drill: pki.rotate-ca --ca {ca} under a writer", title_justify="left")
        for col in ("phase", "s", "steps", "starts per member (etcd / Patroni)", "healthy after"):
            t.add_column(col)
        bad = []
        for ph in res["phases"]:
            starts = ", ".join(f"{h} {n}" for h, n in ph["starts"].items())
            if any(n > 1 for n in ph["starts"].values()) or ph["unhealthy"]:
                bad.append(ph["phase"])
            t.add_row(ph["phase"], str(ph["seconds"]), str(ph["steps_executed"]), starts,
                      "[green]yes[/]" if not ph["unhealthy"] else "[red]" + "; ".join(ph["unhealthy"]) + "[/]")
        ui.console.print(t)
        ui.console.print(f"acknowledged {res['acknowledged']}, present {res['present']}, lost {res['lost']}; "
                         f"longest write gap {res['longest_write_gap_s']} s; {res['rotation_s']} s in all")
        print("DRILL-JSON " + jsonlib.dumps(res))
        if res["lost"] or bad:
            raise Exit(f"pki.drill --ca: {res['lost']} acknowledged row(s) lost; phases with more than one start "
                       f"per member or unhealthy after: {', '.join(bad) or 'none'}", code=1)
        ui.console.print(f"[bold green]✓[/] pki.drill --ca {ca}: rotated in {res['rotation_s']} s, longest write gap "
                         f"{res['longest_write_gap_s']} s, 0 lost")


@task(help={"dry": "show the plan (steps x hosts); change nothing",
            "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
            "export": "print the procedure as Markdown (exact commands and checks per host); change nothing",
            "yes": "do not ask before the irreversible steps (needed without a terminal)"})
def migrate(c, dry=False, step=False, export=False, yes=False):
    """Move a cluster installed with one certificate per host (no peer CA, no etcd auth) to certificates by
    purpose, the etcd peer CA and etcd RBAC, keeping etcd's quorum and Patroni's leader: etcd peers trust both
    CAs first (rolling restarts), take their peer-CA certificates, then trust only the peer CA; Patroni, paused,
    is restarted with its new certificates and etcd credentials, replicas first; then etcd auth goes on.
    `cluster.up` refuses such a cluster until this has run. Resumable; --dry shows the plan."""
    from runbook.procedures.pki_migrate import legacy_hosts, migrate_steps
    from runbook.tasks.operation import run_procedure

    def build(ctx):
        return ctx.inventory.cluster.name, migrate_steps(ctx)

    def checks(ctx):
        if not legacy_hosts(ctx):
            return [f"nothing to migrate: {ctx.pki_dir} holds no one-per-host certificate (<host>.crt); "
                    "certificates by purpose are in place"]
        return []

    run_procedure(c, "pki.migrate", build, checks, dry=dry, step=step, export=export, yes=yes)


ns = Collection("pki")
ns.add_task(migrate, name="migrate")
ns.add_task(drill, name="drill")
ns.add_task(status, name="status")
ns.add_task(rotate, name="rotate")
ns.add_task(rotate_ca, name="rotate-ca")
ns.add_task(rollback, name="rollback")
