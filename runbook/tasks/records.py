"""`inv runbook.*`: status, history, export, mark-done, rollback, forget."""
from __future__ import annotations

import datetime as dt
import json as jsonlib

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook import console as ui
from runbook.core.context import Options
from runbook.inventory import InventoryError
from runbook.sections import all_steps
from runbook.tasks.session import session

HOSTS = "comma-separated host names (required; `local` steps ignore it)"


def _need_hosts(step, hosts):
    if not hosts and step.role != "local":
        raise Exit(f"error: --hosts is required for {step.name} (e.g. --hosts etcd01)", code=2)


def _step(name):
    from runbook.core.rollback import find_step

    try:
        return find_step(all_steps(), name)
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def ledger_doc(ctx) -> dict:
    """The ledger as data: the --json document of runbook.status (steps in run order, one record each)."""
    steps = [s.name for s in all_steps()]
    order = {name: i for i, name in enumerate(steps)}
    recs = sorted(ctx.ledger.all(), key=lambda r: (order.get(r.step, len(order)), r.host))
    return {"cluster": ctx.inventory.cluster.name, "hosts": ["local"] + ctx.inventory.names(), "steps": steps,
            "checkpoints": [{"host": r.host, "step": r.step, "status": r.status, "mode": r.mode,
                             "started": r.started, "finished": r.finished, "note": r.note} for r in recs]}


@task(help={"json": "print JSON (stable keys: cluster, hosts, steps, checkpoints) instead of the table"})
def status(c, json=False):
    """Show the ledger as a steps x hosts table (done, manual, failed, running, rolled_back)."""
    with session(c, "runbook.status", lock=False) as ctx:
        doc = ledger_doc(ctx)
        if json:
            print(jsonlib.dumps(doc, indent=2, sort_keys=True))
            return
        recs = {(r["host"], r["step"]): r["status"] for r in doc["checkpoints"]}
        ui.console.print(ui.status_table(all_steps(), doc["hosts"], recs))
        ops, day2 = _procedure_tables(doc)
        for t in (ops, day2):
            if t.row_count:
                ui.console.print(t)


def _procedure_tables(doc: dict) -> tuple[Table, Table]:
    """The day-2 procedures' records, which the install table has no row for: one row per operation
    (`membership:<op>:<target>` on the control machine: its id and outcome), and the procedures' own steps
    (patroni.remove.dcs, etcd.add.promote, ...) per host."""
    from runbook.procedures.membership_ops import OP_HOST

    known = set(doc["steps"])
    ops = Table(title="Operations (day-2 procedures)")
    for col in ("operation", "target", "status", "id", "finished"):
        ops.add_column(col)
    steps = Table(title="Day-2 steps")
    for col in ("step", "host", "status", "finished"):
        steps.add_column(col)
    for r in doc["checkpoints"]:
        if r["step"] in known:
            continue
        style = ui.STYLE.get(r["status"], "white")
        status = f"[{style}]{r['status']}[/]"
        if r["host"] == OP_HOST and r["step"].startswith("membership:"):
            _, op, target = r["step"].split(":", 2)
            ops.add_row(op, target, status, r["note"] or "", _t(r["finished"]) if r["finished"] else "")
        else:
            steps.add_row(r["step"], r["host"], status, _t(r["finished"]) if r["finished"] else "")
    return ops, steps


@task(help={"limit": "how many runs to show (default 10)", "run": "show the events of this run id"})
def history(c, limit=10, run=None):
    """Show recent runs (command, operator, outcome) or the events (actions, exit codes) of one run."""
    with session(c, "runbook.history", lock=False) as ctx:
        if run:
            t = Table(title=f"Events of run {run}")
            for col in ("time", "host", "step", "kind", "action", "rc", "output"):
                t.add_column(col)
            for e in reversed(list(ctx.ledger.events(int(run), limit=500))):
                out = (e["stderr"] or e["stdout"] or "").strip().splitlines()
                t.add_row(_t(e["at"]), e["host"], e["step"], e["kind"], e["action"][:80], str(e["rc"]),
                          out[-1][:60] if out else "")
            ui.console.print(t)
            return
        t = Table(title="Runs")
        for col in ("id", "started", "command", "operator", "outcome", "summary"):
            t.add_column(col)
        for r in ctx.ledger.runs(int(limit)):
            t.add_row(str(r["id"]), _t(r["started"]), r["command"], r["operator"], r["outcome"] or "",
                      (r["summary"] or "").splitlines()[0][:70] if r["summary"] else "")
        ui.console.print(t)


def _t(ts):
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@task(help={"output": "write to this file instead of stdout"})
def export(c, output=None):
    """Export the whole runbook as Markdown: per section, step and host, the exact commands and files
    (secrets masked) for a person to run by hand."""
    from runbook.core.export import export_markdown

    with session(c, "runbook.export", lock=False) as ctx:
        text = export_markdown(ctx, all_steps())
    if output:
        with open(output, "w") as f:
            f.write(text)
        ui.console.print(f"wrote {output}")
    else:
        print(text)


@task(help={"name": "the step, e.g. etcd.config", "hosts": HOSTS, "note": "why / what was done by hand"})
def mark_done(c, name, hosts=None, note=None):
    """Record STEP as done by hand on the hosts (mode manual); automation resumes after it."""
    from runbook.core.rollback import mark_done as _mark_done, step_hosts

    step = _step(name)
    _need_hosts(step, hosts)
    with session(c, "runbook.mark-done", hosts=hosts) as ctx:
        selected = step_hosts(ctx, step, ctx.selected)
        _mark_done(ctx, all_steps(), name, selected, note)
        ui.console.print(f"[cyan]{name}[/] recorded as done by hand on {', '.join(h.name for h in selected)}")


@task(help={"name": "the step to undo, e.g. etcd.config", "hosts": HOSTS,
            "cascade": "first undo every later step that is done on those hosts, newest first",
            "destroy_data": "allow deleting a non-empty etcd data dir or PGDATA"})
def rollback(c, name, hosts=None, cascade=False, destroy_data=False):
    """Run a step's undo on the hosts; refused while later steps are done there unless --cascade."""
    from runbook.core.rollback import rollback as _rollback

    step = _step(name)
    _need_hosts(step, hosts)
    with session(c, "runbook.rollback", options=Options(destroy_data=destroy_data), hosts=hosts) as ctx:
        undone = _rollback(ctx, all_steps(), name, ctx.selected, cascade)
        for h, s in undone:
            ui.console.print(f"[blue]rolled back[/] {s} on {h}")


@task(help={"name": "the step whose record to drop", "hosts": HOSTS})
def forget(c, name, hosts=None):
    """Drop the ledger record of STEP on the hosts; nothing on the hosts is touched."""
    from runbook.core.rollback import step_hosts

    step = _step(name)
    _need_hosts(step, hosts)
    with session(c, "runbook.forget", hosts=hosts) as ctx:
        for h in step_hosts(ctx, step, ctx.selected):
            gone = ctx.ledger.forget(h.name, name)
            ui.console.print(f"{name} on {h.name}: {'forgotten' if gone else 'no record'}")


ns = Collection("runbook", status, history, export, mark_done, rollback, forget)
