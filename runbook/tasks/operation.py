"""The shared body of a day-2 procedure task run as one ledger operation (membership, backup, restore, update):
build the steps, then --export them, show the --dry plan, or run them (--step asks before each; irreversible
steps are confirmed unless --yes); a run interrupted earlier resumes where it stopped."""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from invoke.exceptions import Exit
from rich.prompt import Confirm

from runbook import console as ui
from runbook.core.context import Options
from runbook.core.step import Step
from runbook.errors import RunbookError
from runbook.tasks.session import session, settings, show_plan

if TYPE_CHECKING:
    from runbook.cluster.context import Ctx

COMMON_HELP = {
    "dry": "show the plan (steps x hosts, irreversible ones marked); change nothing",
    "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
    "export": "print the procedure as Markdown (exact commands and checks per host); change nothing",
    "yes": "do not ask before the irreversible steps (needed without a terminal)",
}


def procedure_options(c, dry: bool, step: bool, export: bool, **kw) -> Options:
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


def run_procedure(c, command: str, build: Callable[[Ctx], tuple[str, list[Step]]],
                  prechecks: Callable[[Ctx], list[str]] | None = None, *, dry: bool, step: bool, export: bool,
                  yes: bool, after: Callable[[Ctx, str, float], None] | None = None, **opts) -> None:
    """Build the steps (a RunbookError: exit 2 with its message), then export, plan or run them as the ledger
    operation `command` on the build's target; *prechecks* refuse before anything runs, *after(ctx, target,
    seconds)* reports on a real run. *opts* go to the run's Options."""
    from runbook.core.export import export_markdown
    from runbook.procedures.membership_ops import operation_id, run_operation

    op = command.replace(".", "-")
    with session(c, command, lock=not (dry or export), options=procedure_options(c, dry, step, export, **opts)) as ctx:
        from runbook.procedures.pki_migrate import refusal

        why = None if command == "pki.migrate" else refusal(ctx, command)
        if why:  # a cluster of one certificate per host: its procedures would issue the new model's certificates
            raise Exit(f"error: {why}", code=1)
        try:
            target, steps = build(ctx)
        except RunbookError as exc:
            raise Exit(f"error: {command}: {exc}", code=2) from None
        if export:
            print(export_markdown(ctx, steps))
            return
        if operation_id(ctx, op, target)[1]:
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
        seconds = time.monotonic() - t0
        ui.console.print(f"[bold green]✓[/] {command} {target} ({op_id}): {ui.summary_line(report, seconds)}")
        if after:
            after(ctx, target, seconds)
