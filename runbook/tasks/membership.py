"""Membership tasks: `patroni.remove NAME`, `patroni.reinit NAME` (ledger steps: --dry, --step, --export,
resume; irreversible steps confirmed unless --yes)."""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from invoke import task
from invoke.exceptions import Exit
from rich.prompt import Confirm

from runbook import console as ui
from runbook.core.context import Options
from runbook.core.step import Step
from runbook.tasks.session import session, settings, show_plan

if TYPE_CHECKING:
    from runbook.cluster.context import Ctx

COMMON_HELP = {
    "dry": "show the plan (steps x hosts, irreversible ones marked); change nothing",
    "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
    "export": "print the procedure as Markdown (exact commands and checks per host); change nothing",
    "yes": "do not ask before the irreversible steps (needed without a terminal)",
}


def _options(c, dry: bool, step: bool, export: bool, **kw) -> Options:
    opts = Options(dry=dry or export, step=step, parallel=settings(c).parallel, **kw)
    if os.environ.get("RUNBOOK_STEP_ANSWERS"):
        answers = iter(os.environ["RUNBOOK_STEP_ANSWERS"].split(","))
        opts.answer = lambda _name: next(answers, "quit")
    elif step and not sys.stdin.isatty():
        raise Exit("error: --step asks before every step and needs an interactive terminal", code=2)
    return opts


def confirm_irreversible(steps: list[Step], yes: bool) -> None:
    marked = [s for s in steps if s.irreversible]
    if not marked or yes:
        return
    if not sys.stdin.isatty():
        raise Exit("error: irreversible steps (" + ", ".join(s.name for s in marked) + "): no terminal to "
                   "confirm on; pass --yes", code=2)
    for s in marked:
        ui.console.print(f"[bold red]irreversible[/] {s.name}: {s.irreversible}")
    if not Confirm.ask("go ahead?"):
        raise Exit("cancelled: nothing changed", code=1)


def run_membership(c, command: str, op: str, name: str, build: Callable[[Ctx], tuple[str, list[Step]]],
                   prechecks: Callable[[Ctx], list[str]] | None, *, dry: bool, step: bool, export: bool,
                   yes: bool, **opts) -> None:
    """The shared task body: build the steps for NAME, export or plan or run them as one operation."""
    from runbook.core.export import export_markdown
    from runbook.procedures.membership_ops import operation_id
    from runbook.procedures.membership_ops import run_operation

    options = _options(c, dry, step, export, **opts)
    with session(c, command, lock=not (dry or export), options=options) as ctx:
        target, steps = build(ctx)
        if export:
            print(export_markdown(ctx, steps))
            return
        _, resumed = operation_id(ctx, op, target)
        if resumed:
            ui.console.print(f"[yellow]![/] resuming the interrupted {command} {target}: done steps are skipped")
        problems = prechecks(ctx) if prechecks else []
        if problems:
            raise Exit(f"error: {command} {target} refused:\n  " + "\n  ".join(problems), code=1)
        if not dry:
            confirm_irreversible(steps, yes)
        t0 = time.monotonic()
        report, op_id, _ = run_operation(ctx, op, target, steps)
        if dry:
            show_plan(ctx, report)
            return
        ui.console.print(f"[bold green]✓[/] {command} {target} ({op_id}): "
                         f"{ui.summary_line(report, time.monotonic() - t0)}")


@task(help={"name": "the postgres host (or its member name patroni_NAME) to remove",
            "destroy_data": "also delete its PGDATA (irreversible); kept by default",
            "force": "remove the last streaming replica even with synchronous_mode_strict (writes then wait)",
            **COMMON_HELP})
def remove(c, name, destroy_data=False, force=False, yes=False, dry=False, step=False, export=False):
    """Remove a PostgreSQL member: refuses the leader (switch over first); stops and disables Patroni on it,
    deletes its member key from the DCS (irreversible), keeps PGDATA unless --destroy-data. Then take the
    host out of the inventory and run `inv cluster.up` (pg_hba and /etc/hosts no longer name it)."""
    from runbook.procedures.membership_patroni import cluster_members, precheck, remove_steps, target_host

    def build(ctx):
        h = target_host(ctx, name)
        return h.name, remove_steps(ctx, h, destroy_data)

    def checks(ctx):
        h = target_host(ctx, name)
        return precheck(cluster_members(ctx, h), h, "patroni.remove", strict=True, force=force)

    run_membership(c, "patroni.remove", "patroni-remove", name, build, checks, dry=dry, step=step, export=export,
                   yes=yes, destroy_data=destroy_data)


@task(help={"name": "the replica (host or member name) to rebuild from the leader", **COMMON_HELP})
def reinit(c, name, yes=False, dry=False, step=False, export=False):
    """Rebuild a broken replica from the leader: refuses the leader; Patroni wipes its PGDATA and copies it
    again (irreversible), then a bounded wait until it streams. A resumed run waits for a copy under way."""
    from runbook.procedures.membership_patroni import cluster_members, precheck, reinit_steps, target_host

    def build(ctx):
        h = target_host(ctx, name)
        return h.name, reinit_steps(ctx, h)

    def checks(ctx):
        h = target_host(ctx, name)
        return precheck(cluster_members(ctx, h), h, "patroni.reinit", strict=True)

    run_membership(c, "patroni.reinit", "patroni-reinit", name, build, checks, dry=dry, step=step, export=export,
                   yes=yes)


ETCD_HELP = {"force": "allow an even count of voting members, or fewer than three", **COMMON_HELP}


def _etcd_checks(add: str | None, remove: str | None, force: bool):
    def checks(ctx):
        from runbook.procedures.membership_etcd import precheck, survey

        ms, health = survey(ctx, exclude=add)
        return precheck(ms, health, add=add, remove=remove, force=force)

    return checks


@task(help={"new": "the new etcd host (listed in the inventory with roles: [etcd])", **ETCD_HELP})
def etcd_add(c, new, force=False, yes=False, dry=False, step=False, export=False):
    """Add an etcd member: NEW prepared by the etcd section's steps, `member add --learner`, first start with
    initial-cluster-state existing and the current members, promoted once caught up (bounded retries); then
    every host's endpoint lists (/etc/hosts, etcd config, ectl, Patroni's etcd3 hosts, reloaded). Refuses an
    unhealthy cluster, a second learner, and an even count of voting members unless --force."""
    from runbook.procedures.membership_etcd import add_steps

    run_membership(c, "etcd.add", "etcd-add", new, lambda ctx: (new, add_steps(ctx, new)),
                   _etcd_checks(new, None, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the etcd member to remove (already taken out of the inventory)", **ETCD_HELP})
def etcd_remove(c, old, force=False, yes=False, dry=False, step=False, export=False):
    """Remove an etcd member (take it out of the inventory first): `member remove` through a remaining member
    (irreversible; its ID goes to the ledger, a resumed run never removes twice), its certificate dropped from
    state/pki, every host's endpoint lists updated. Refuses fewer than three or an even count unless --force."""
    from runbook.procedures.membership_etcd import remove_steps

    run_membership(c, "etcd.remove", "etcd-remove", old, lambda ctx: (old, remove_steps(ctx, old)),
                   _etcd_checks(None, old, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the etcd member to replace (taken out of the inventory; may be dead)",
            "with_": "the new etcd host (in the inventory with roles: [etcd], a bare host)", **ETCD_HELP})
def etcd_replace(c, old, with_, force=False, yes=False, dry=False, step=False, export=False):
    """Replace an etcd member, e.g. a dead host, by a new one: etcd.remove OLD then etcd.add NEW in one
    resumable operation (quorum checked first; the old member removed exactly once), then every host's
    endpoint lists. Edit the inventory first: OLD out, NEW in with roles: [etcd]."""
    from runbook.procedures.membership_etcd import replace_steps

    run_membership(c, "etcd.replace", "etcd-replace", f"{old}-{with_}",
                   lambda ctx: (f"{old}-{with_}", replace_steps(ctx, old, with_)),
                   _etcd_checks(with_, old, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the PostgreSQL host that is gone (already taken out of the inventory)",
            "with_": "the new host (in the inventory with roles: [postgres], a bare host)", **COMMON_HELP})
def replace(c, old, with_, yes=False, dry=False, step=False, export=False):
    """Replace a PostgreSQL host that is gone for good: the new host installed by the install sections' steps
    and started as a replica once every host's pg_hba names it (OLD's address dropped), OLD's member key
    deleted from the DCS (irreversible), then a bounded wait until the new host is the sync standby.
    Edit the inventory first: OLD out, NEW in with roles: [postgres]."""
    from runbook.cluster.readers import members
    from runbook.procedures.membership_patroni import replace_precheck, replace_steps

    def checks(ctx):
        return replace_precheck(members(ctx), old)

    run_membership(c, "patroni.replace", "patroni-replace", f"{old}-{with_}",
                   lambda ctx: (f"{old}-{with_}", replace_steps(ctx, old, with_)), checks, dry=dry, step=step,
                   export=export, yes=yes)
