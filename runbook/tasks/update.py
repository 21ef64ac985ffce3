"""`inv cluster.update`: a rolling update from a newer bundle (ledger steps: --dry, --step, --export, resume)."""
from __future__ import annotations

import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from runbook import console as ui
from runbook.tasks.operation import COMMON_HELP, confirm_irreversible, procedure_options
from runbook.tasks.session import session, show_plan


def _print_plan(plan, resumed: bool) -> None:
    if resumed:
        ui.console.print("[yellow]![/] resuming the interrupted cluster.update with the plan it recorded: done "
                         "steps are skipped")
    if not plan.items:
        return
    ui.console.print("[bold]update plan[/] (in this order):")
    for n, item in enumerate(plan.items, 1):
        ui.console.print(f"  {n}. {item.kind:<10} {item.host or '-':<12} {item.what}", markup=False)


@task(help={"bundle": "the newer bundle directory (default runbook.bundle_dir)",
            "reinstall": "reinstall the PostgreSQL packages even where the versions already match (the plan "
                         "then says 'same version: reinstall'): a drill of the procedure",
            "replan": "close an interrupted update instead of resuming it and plan again from what the hosts "
                      "run now (e.g. after a failed install, with another bundle)",
            **COMMON_HELP})
def update(c, bundle=None, reinstall=False, replan=False, yes=False, dry=False, step=False, export=False):
    """Rolling update of the running cluster to the bundle's versions: compares what each host runs (dpkg
    packages, the Patroni venv, etcd) with the bundle and updates only what differs. etcd one member at a
    time (the leader last); Patroni under `patronictl pause`, then `resume`; PostgreSQL packages replicas
    first, a switchover, then the old leader. Each host's update is a ledger step: a killed run resumes the
    recorded plan, and a member is stopped only while the others are healthy."""
    from runbook.core.export import export_markdown
    from runbook.procedures.update import current_plan, paused, run_update, update_steps

    options = procedure_options(c, dry, step, export)
    with session(c, "cluster.update", lock=not (dry or export), options=options) as ctx:
        if bundle:
            ctx.bundle_dir = Path(bundle).expanduser().resolve()
        plan, op_id, resumed = current_plan(ctx, reinstall, replan)
        _print_plan(plan, resumed)
        if plan.problems and not resumed:
            raise Exit("error: cluster.update refused:\n  " + "\n  ".join(plan.problems), code=1)
        if not plan.items:
            ui.console.print(f"[bold green]✓[/] nothing to update: every host runs the versions of {ctx.bundle_dir}")
            return
        if not resumed and not (dry or export) and any(i.kind == "pause" for i in plan.items) and paused(ctx):
            raise Exit("error: cluster.update refused: the Patroni cluster is paused (maintenance mode) by someone "
                       "else; resume it first (patronictl resume), the update pauses and resumes it itself",
                       code=1)
        steps = update_steps(ctx, plan, op_id, reinstall)
        if export:
            print(export_markdown(ctx, steps))
            return
        if not dry:
            confirm_irreversible(steps, yes)
        t0 = time.monotonic()
        report = run_update(ctx, plan, op_id, resumed, steps)
        if dry:
            show_plan(ctx, report)
            return
        ui.console.print(f"[bold green]✓[/] cluster.update ({op_id}): {ui.summary_line(report, time.monotonic() - t0)}")
