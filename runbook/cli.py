"""Invoke glue: configuration, the run session (inventory, ledger, lock, transport) and task factories."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from invoke import task
from invoke.exceptions import Exit

from . import console as ui
from .context import Ctx, Options
from .engine import Quit, RunFailed, apply
from .inventory import Inventory, InventoryError, load_inventory
from .ledger import Ledger, LedgerLocked
from .transport import SshTransport, TransportError

logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # its tracebacks duplicate our TransportError

DEFAULTS = {"inventory": "hosts.yml", "state_dir": "state", "bundle_dir": "bundle", "parallel": 16}

RUN_HELP = {
    "hosts": "comma-separated host names from the inventory (default: every host of the section)",
    "dry": "show the plan (steps x hosts) and diffs of rendered files; change nothing",
    "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
    "verify": "re-check done steps against reality and re-run what drifted",
}


def setting(c, key: str):
    cfg = c.config.get("runbook", {}) if hasattr(c, "config") else {}
    return cfg.get(key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]


def inventory_of(c) -> Inventory:
    try:
        return load_inventory(setting(c, "inventory"))
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def state_dir(c, inv: Inventory) -> Path:
    p = Path(setting(c, "state_dir"))
    p = p if p.is_absolute() else Path.cwd() / p
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


@contextmanager
def session(c, command: str, *, lock: bool = True, options: Options | None = None,
            hosts: str | None = None) -> Iterator[Ctx]:
    """Validate the inventory and --hosts first (nothing connects, nothing is recorded before that),
    then open the ledger and take the run lock. ctx.selected holds the selected hosts."""
    inv = inventory_of(c)
    try:
        selected = inv.select(hosts)
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    sd = state_dir(c, inv)
    bundle = Path(setting(c, "bundle_dir"))
    ctx = Ctx(inventory=inv, transport=SshTransport(), state_dir=sd,
              bundle_dir=bundle if bundle.is_absolute() else Path.cwd() / bundle,
              options=options or Options(parallel=int(setting(c, "parallel"))), selected=selected)
    ledger = Ledger(sd / f"{inv.cluster.name}.db", redact=ctx.redact)
    ctx.ledger = ledger
    if lock:
        try:
            ledger.acquire(command, sys.argv[1:])
        except LedgerLocked as exc:
            raise Exit(f"error: {exc}", code=3) from None
        if ledger.stale_lock:
            ui.console.print(f"[yellow]took over a run lock left by a dead process ({ledger.stale_lock})[/]")
    outcome, summary = "failed", ""
    try:
        yield ctx
        outcome = "ok"
    except RunFailed as exc:
        summary = str(exc)
        raise Exit(f"\n{ctx.redact(summary)}", code=1) from None
    except Exit as exc:
        summary = str(exc.message or "")
        raise
    except Quit as exc:
        outcome, summary = "quit", str(exc)
        raise Exit(str(exc), code=4) from None
    except (InventoryError, TransportError) as exc:
        summary = str(exc)
        raise Exit(f"error: {exc}", code=2) from None
    finally:
        ctx.transport.close()
        if lock:
            ledger.release(outcome, summary)
        ledger.db.conn.close()


def run_steps(c, command: str, steps, hosts: str | None, dry: bool, step: bool, verify: bool) -> None:
    """Apply steps on the selected hosts with the operator modes; print plan or summary."""
    opts = Options(dry=dry, step=step, verify=verify, parallel=int(setting(c, "parallel")))
    if step and not sys.stdin.isatty() and os.environ.get("RUNBOOK_STEP_ANSWERS") is None:
        raise Exit("error: --step asks before every step and needs an interactive terminal", code=2)
    if os.environ.get("RUNBOOK_STEP_ANSWERS"):
        answers = iter(os.environ["RUNBOOK_STEP_ANSWERS"].split(","))
        opts.answer = lambda _name: next(answers, "quit")
    with session(c, command, lock=not dry, options=opts, hosts=hosts) as ctx:
        t0 = time.monotonic()
        report = apply(ctx, steps, ctx.selected)
        if dry:
            show_plan(ctx, report)
            return
        ui.console.print(f"[bold green]✓[/] {command}: {ui.summary_line(report, time.monotonic() - t0)}")


def show_plan(ctx: Ctx, report) -> None:
    from .ops import file_diffs

    ui.console.print(ui.plan_table(report, f"Plan for {ctx.inventory.cluster.name} (dry run: nothing changes)"))
    ui.console.print(ui.plan_reasons(report))
    for d in report.plan:
        if d.run:
            for diff in file_diffs(ctx, d):
                ui.console.print(diff, markup=False)


def section_install(section_name: str, steps_fn, doc: str):
    """An `install` task for one section (or `up` for the whole runbook)."""

    def install(c, hosts=None, dry=False, step=False, verify=False):
        run_steps(c, f"{section_name}", steps_fn(), hosts, dry, step, verify)

    install.__doc__ = doc
    return task(help=RUN_HELP)(install)
