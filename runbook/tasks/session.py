"""Invoke glue: configuration, the run session (inventory, ledger, lock, transport) and task factories."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from invoke import task
from invoke.exceptions import Exit

from runbook import console as ui
from runbook.core.context import Options
from runbook.errors import RunbookError
from runbook.inventory import LOCAL, Host, Inventory, InventoryError, load_inventory
from runbook.inventory.settings import Settings, SettingsError, env_problems, settings_of

if TYPE_CHECKING:
    from runbook.cluster.context import Ctx

logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # its tracebacks duplicate our TransportError

Roles = set[str] | Callable[[], set[str]] | None  # a section's roles, or what returns them when asked

RUN_HELP = {
    "hosts": "comma-separated host names from the inventory (default: every host of the section)",
    "dry": "show the plan (steps x hosts) and diffs of rendered files; change nothing, create nothing",
    "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
    "verify": "probe every host (its /etc/machine-id: a re-created host's records are void; every done step's "
              "check) and re-run what drifted. Without it, a run whose every step the ledger records as done "
              "contacts no host",
}


def check_env() -> None:
    """Called while invoke loads the collection, i.e. before invoke reads (and casts) the environment."""
    found = env_problems()
    if found:
        raise Exit("error: " + "\n       ".join(found), code=2)


def settings(c) -> Settings:
    """The validated `runbook` settings of this invoke run (every problem at once, exit 2)."""
    try:
        return settings_of(c)
    except SettingsError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def inventory_of(s: Settings) -> Inventory:
    try:
        return load_inventory(s.inventory)
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def state_dir(s: Settings, *, create: bool) -> Path:
    """The state dir, checked; created (0700) only by a command that records something."""
    p = s.state_dir
    where = f"state dir {p} ({s.origin('state_dir')})"
    if p.exists() and not p.is_dir():
        raise Exit(f"error: {where} is not a directory; point runbook.state_dir / INVOKE_RUNBOOK_STATE_DIR at a "
                   "directory (it holds the ledger, the PKI and secrets.yml)", code=2)
    if not create:  # a view or a dry run creates nothing, but a path that could never be created is wrong
        above = next((d for d in p.parents if d.exists()), None)
        if above is not None and not above.is_dir():
            raise Exit(f"error: {where} cannot be created: Not a directory ({above} is a file)", code=2)
        return p
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise Exit(f"error: {where} cannot be created: {exc.strerror or exc}", code=2) from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise Exit(f"error: {where} is not writable by uid {os.getuid()}; fix its permissions or choose "
                   "another directory", code=2)
    return p


def _check_secrets(sd: Path) -> None:
    """A state/secrets.yml that is unsafe or malformed is refused before anything is recorded (the ledger
    masks every secret it stores, so it would trip over the file half-way)."""
    from runbook.credentials.secrets import load_secrets, secrets_path

    if secrets_path(sd).exists():
        load_secrets(sd)


def check_roles(inv: Inventory, selected: list[Host], section: str, roles: set[str]) -> None:
    """`inv etcd.install --hosts node01`: node01 has no etcd role - said before anything else is looked at."""
    if not roles or "all" in roles:
        return
    wrong = [h for h in selected if not roles & set(h.roles)]
    if wrong:
        want = " or ".join(sorted(roles))
        names = ", ".join(h.name for r in sorted(roles) for h in inv.role(r))
        raise Exit("error: --hosts: " + "; ".join(f"{h.name} has no {want} role (its roles: {', '.join(h.roles)})"
                                                  for h in wrong)
                   + f"; {section}.install runs on the {want} hosts of {inv.path}: {names}", code=2)


@contextmanager
def session(c, command: str, *, lock: bool = True, options: Options | None = None,
            hosts: str | None = None, roles: Roles = None) -> Iterator[Ctx]:
    """Validate the settings, the inventory and --hosts first (nothing connects, nothing is written before
    that), then open the ledger and take the run lock. ctx.selected holds the selected hosts.

    Without `lock` (a dry run, export, the status views) nothing is created: no state dir, no ledger file
    (an empty in-memory one when there is none yet), no secrets, no CA or certificate."""
    from runbook.bundle.manifest import BundleError
    from runbook.cluster.context import Ctx
    from runbook.core.engine import Quit, RunFailed
    from runbook.core.ledger import Ledger, LedgerLocked
    from runbook.core.transport import SshTransport
    from runbook.credentials.secrets import SecretsError

    s = settings(c)
    inv = inventory_of(s)
    try:
        selected = inv.select(hosts)
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    if hosts and roles is not None:
        check_roles(inv, selected, command.split(".")[0], roles() if callable(roles) else roles)
    sd = state_dir(s, create=lock)
    try:
        _check_secrets(sd)
    except SecretsError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    ctx = Ctx(inventory=inv, transport=SshTransport(), state_dir=sd, bundle_dir=s.bundle_dir,
              options=options or Options(parallel=s.parallel), selected=selected,
              observer=ui.RichObserver(), read_only=not lock, settings=s)
    db = sd / f"{inv.cluster.name}.db"
    ledger = Ledger(db if lock or db.exists() else ":memory:", redact=ctx.redact)
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
    except Quit as exc:
        outcome, summary = "quit", str(exc)
        raise Exit(str(exc), code=exc.exit_code) from None
    except RunFailed as exc:
        summary = str(exc)
        raise Exit(f"\n{ctx.redact(summary)}", code=exc.exit_code) from None
    except Exit as exc:
        summary = str(exc.message or "")
        raise
    except RunbookError as exc:
        summary = str(exc)
        hint = ""
        if isinstance(exc, BundleError) and not ctx.bundle_dir.is_dir():
            hint = f" ({s.origin('bundle_dir')})"
        raise Exit(f"error: {ctx.redact(str(exc))}{hint}", code=exc.exit_code) from None
    finally:
        ctx.transport.close()
        if lock:
            ledger.release(outcome, summary)
        ledger.conn.close()


def run_steps(c, command: str, steps, hosts: str | None, dry: bool, step: bool, verify: bool,
              roles: Roles = None) -> None:
    """Apply steps (a list, or a function that returns it) on the selected hosts with the operator modes;
    print plan or summary. `roles`: the roles the section works on (a --hosts name without one of them is
    refused up front), or a function that returns them (asked only when --hosts is given)."""
    from runbook.core.engine import apply

    opts = Options(dry=dry, step=step, verify=verify, parallel=settings(c).parallel)
    if step and not sys.stdin.isatty() and os.environ.get("RUNBOOK_STEP_ANSWERS") is None:
        raise Exit("error: --step asks before every step and needs an interactive terminal", code=2)
    if os.environ.get("RUNBOOK_STEP_ANSWERS"):
        answers = iter(os.environ["RUNBOOK_STEP_ANSWERS"].split(","))
        opts.answer = lambda _name: next(answers, "quit")
    with session(c, command, lock=not dry, options=opts, hosts=hosts, roles=roles) as ctx:
        if verify:  # every selected host is asked at once: their handshakes overlap the rest of the set-up
            ctx.transport.warm([h for h in ctx.selected if h.name != LOCAL.name])
        from runbook.procedures.pki_migrate import refusal

        steps = steps() if callable(steps) else steps
        why = refusal(ctx, command if "." in command else f"{command}.install")  # one certificate per host
        if why:
            raise Exit(f"error: {why}", code=1)
        t0 = time.monotonic()
        report = apply(ctx, steps, ctx.selected)
        if dry:
            show_plan(ctx, report)
            return
        ui.console.print(f"[bold green]✓[/] {command}: {ui.summary_line(report, time.monotonic() - t0)}")


def show_plan(ctx: Ctx, report) -> None:
    from runbook.core.export import file_diffs

    ui.console.print(ui.plan_table(report, f"Plan for {ctx.inventory.cluster.name} (dry run: nothing changes)"))
    ui.console.print(ui.plan_reasons(report))
    for d in report.plan:
        if d.run:
            for diff in file_diffs(ctx, d):
                ui.console.print(diff, markup=False)
    failed = getattr(ctx.transport, "_failed", {})
    if failed:  # the plan is shown, but it could not be compared with those hosts: say so in the exit code
        raise Exit("dry run incomplete: could not reach " + "; ".join(str(e) for e in failed.values()), code=1)


def section_install(section_name: str, steps_fn, doc: str, roles: Roles = None):
    """An `install` task for one section (or `up` for the whole runbook); `roles`: see run_steps."""

    def install(c, hosts=None, dry=False, step=False, verify=False):
        run_steps(c, f"{section_name}", steps_fn, hosts, dry, step, verify, roles)

    install.__doc__ = doc
    return task(help=RUN_HELP)(install)
