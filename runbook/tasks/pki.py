"""Tasks of the PKI: `pki.status` (every certificate in use, per host and purpose)."""
from __future__ import annotations

import json as jsonlib

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


ns = Collection("pki")
ns.add_task(status, name="status")
