"""Membership procedures as plans: which steps, on which hosts, which irreversible; the irreversible marker in
the plan, --step, export and rollback; an operation resumed never repeats a destructive step."""
from __future__ import annotations

import pytest

from runbook import console as ui
from runbook.cluster.readers import Member
from runbook.core.engine import Report, RunFailed, apply, decide
from runbook.core.export import export_markdown
from runbook.core.rollback import rollback
from runbook.core.step import Run, Section
from runbook.errors import ProcedureFailed
from runbook.procedures.membership_ops import op_key, run_operation
from runbook.procedures.membership_patroni import precheck, reinit_steps, remove_steps, target_host


def plan(ctx, steps):
    return [(s.name, [h.name for h in s.hosts(ctx, ctx.inventory.hosts)], bool(s.irreversible)) for s in steps]


# -- the marker ---------------------------------------------------------------------------------------
@pytest.fixture
def marked():
    sec = Section("demo", 90, "demo")

    @sec.step("wipe", role="postgres", irreversible="deletes the data dir")
    def wipe(ctx, host):
        """Wipe the data dir"""
        return [Run("rm -rf /data/x")]

    @wipe.undo
    def _undo(ctx, host):  # an undo exists, yet the step stays irreversible
        return [Run("true")]

    return wipe


def test_irreversible_refused_by_rollback(ctx, marked):
    node = ctx.inventory.postgres[0]
    apply(ctx, [marked], [node])
    assert marked.undo_missing(ctx, node) == "irreversible: deletes the data dir"
    with pytest.raises(RunFailed, match="cannot be rolled back: irreversible: deletes the data dir"):
        rollback(ctx, [marked], "demo.wipe", [node], cascade=False)
    assert not [c for c in ctx.transport.commands() if c == "true"]  # the undo never ran


def test_irreversible_in_plan_step_summary_and_export(ctx, marked):
    node = ctx.inventory.postgres[0]
    d = decide(ctx, marked, node)
    report = Report(plan=[d])
    with ui.console.capture() as cap:
        ui.console.print(ui.plan_table(report))
        ui.console.print(ui.plan_reasons(report))
    out = cap.get()
    assert "(irreversible)" in out and "irreversible: deletes the data dir" in out
    assert "  IRREVERSIBLE: deletes the data dir" in ui.step_summary(marked, [d])
    assert "**Irreversible**: deletes the data dir" in export_markdown(ctx, [marked])


def test_reversible_step_has_no_marker(ctx):
    from runbook.sections import all_steps

    assert not [s.name for s in all_steps() if s.irreversible]  # the install sections undo everything


# -- patroni.remove / patroni.reinit plans ---------------------------------------------------------
def test_remove_plan(ctx):
    node02 = target_host(ctx, "node02")
    assert plan(ctx, remove_steps(ctx, node02)) == [
        ("patroni.remove.stop", ["node02"], False),
        ("patroni.remove.dcs", ["etcd01"], True),
        ("patroni.remove.slot", ["node01"], True)]  # the members that stay drop its slot
    assert plan(ctx, remove_steps(ctx, node02, destroy_data=True))[-1] == ("patroni.remove.data", ["node02"], True)
    stop = remove_steps(ctx, node02)[0]
    cmds = [a.cmd for a in stop.actions_fn(ctx, node02)]
    assert "is the leader" in cmds[0] and cmds[1] == "systemctl disable --now patroni"
    dcs = remove_steps(ctx, node02)[1]
    assert "del /patroni/patroni_cluster/members/patroni_node02" in dcs.actions_fn(ctx, ctx.inventory.etcd[0])[0].cmd


def test_reinit_plan(ctx):
    steps = reinit_steps(ctx, target_host(ctx, "patroni_node02"))
    assert plan(ctx, steps) == [("patroni.reinit.reinit", ["node02"], True)]
    cmds = " ; ".join(a.cmd for a in steps[0].actions_fn(ctx, target_host(ctx, "node02")))
    assert "reinit --force patroni_cluster patroni_node02" in cmds and "creating replica" in cmds


def test_target_must_be_a_postgres_host(ctx):
    with pytest.raises(ProcedureFailed, match="etcd01 is not a host with role postgres"):
        target_host(ctx, "etcd01")


def m(name, role, state):
    return Member(f"patroni_{name}", name, role, state, 1, 0)


LEADER1 = [m("node01", "Leader", "running"), m("node02", "Sync Standby", "streaming")]


@pytest.mark.parametrize("members,target,what,force,want", [
    (LEADER1, "node01", "patroni.remove", False, "node01 is the leader"),
    (LEADER1, "node01", "patroni.reinit", False, "node01 is the leader"),
    (LEADER1, "node02", "patroni.remove", False, "only streaming replica"),
    (LEADER1, "node02", "patroni.remove", True, None),
    (LEADER1, "node02", "patroni.reinit", False, None),
    (LEADER1 + [m("node03", "Replica", "streaming")], "node02", "patroni.remove", False, None),
    ([LEADER1[0]], "node02", "patroni.remove", False, None),  # resumed: already gone from the DCS
    ([m("node01", "Replica", "stopped"), LEADER1[1]], "node02", "patroni.reinit", False, "no running leader"),
])
def test_precheck(ctx, members, target, what, force, want):
    host = target_host(ctx, target) if target != "node03" else None
    got = precheck(members, host, what, strict=True, force=force)
    assert (want is None and got == []) or (want and any(want in p for p in got)), got


# -- operations: resume, never twice --------------------------------------------------------------
def test_remove_resumes_without_repeating_the_delete(ctx):
    node02 = target_host(ctx, "node02")
    ft = ctx.transport
    ft.on(r"get --keys-only", 1)  # the key is still there until deleted
    ft.on(r"etcdctl .* del ", 1)  # the first delete fails: the run stops after the stop step
    with pytest.raises(RunFailed):
        run_operation(ctx, "patroni-remove", "node02", remove_steps(ctx, node02))
    assert ctx.ledger.get("local", op_key("patroni-remove", "node02")).status == "failed"
    ft.rules = [r for r in ft.rules if "del " not in r[0].pattern]
    ft.on(r"get --keys-only", 0)
    ft.calls.clear()
    _, op1, resumed = run_operation(ctx, "patroni-remove", "node02", remove_steps(ctx, node02))
    assert resumed
    assert not [c for c in ft.commands("node02") if "disable --now" in c]  # the done stop is not repeated
    assert len([c for c in ft.commands("etcd01") if " del " in c]) == 1
    # killed in the middle of the delete: the next run asks the check, which finds the key gone: no 2nd delete
    ctx.ledger.set("local", op_key("patroni-remove", "node02"), "running", note=op1)
    ctx.ledger.set("etcd01", "patroni.remove.dcs", "running")
    ft.calls.clear()
    _, op2, resumed = run_operation(ctx, "patroni-remove", "node02", remove_steps(ctx, node02))
    assert resumed and op2 == op1
    assert not [c for c in ft.commands() if " del " in c or "disable --now" in c]
    # a finished operation: the next remove is a new one and runs its steps again
    ft.calls.clear()
    _, op3, resumed = run_operation(ctx, "patroni-remove", "node02", remove_steps(ctx, node02))
    assert not resumed and op3 != op1
    assert [c for c in ft.commands("node02") if "disable --now" in c]


def test_dry_run_writes_nothing(ctx):
    ctx.options.dry = True
    node02 = target_host(ctx, "node02")
    report, _, _ = run_operation(ctx, "patroni-reinit", "node02", reinit_steps(ctx, node02))
    assert [(d.host.name, d.step.name, d.run) for d in report.plan] == [("node02", "patroni.reinit.reinit", True)]
    assert ctx.ledger.get("local", op_key("patroni-reinit", "node02")) is None
    assert not [c for c in ctx.transport.commands() if "reinit --force" in c]


def test_replace_plan(ctx, tmp_path):
    """node02 gone for good, node03 in: node03 installed, every host's pg_hba re-rendered before node03
    starts, node02's key deleted (irreversible), then the wait for a sync standby on node03."""
    from runbook.inventory import load_inventory
    from runbook.procedures.membership_patroni import replace_precheck, replace_steps

    text = ctx.inventory.path.read_text().replace("node02: {address: 192.168.60.132",
                                                  "node03: {address: 192.168.60.133")
    (tmp_path / "hosts.yml").write_text(text)
    ctx.inventory = load_inventory(tmp_path / "hosts.yml")
    got = plan(ctx, replace_steps(ctx, "node02", "node03"))
    names = [n for n, _, _ in got]
    assert names.index("patroni.config") < names.index("patroni.replicas") < names.index("patroni.replace.dcs")
    assert not {"patroni.bootstrap", "patroni.roles", "patroni.dynamic", "etcd.config"} & set(names)
    by = {n: (hosts, irr) for n, hosts, irr in got}
    assert by["patroni.config"] == (["node01", "node03"], False)
    assert by["postgres.packages"] == (["node03"], False) and by["patroni.replicas"] == (["node03"], False)
    assert by["patroni.replace.dcs"] == (["etcd01"], True)
    assert by["patroni.replace.sync"] == (["node03"], False)
    assert by["patroni.replace.slot"] == (["node01", "node03"], True)  # node03 may hold a copy of it too
    assert [n for n, _, irr in got if irr] == ["patroni.replace.dcs", "patroni.replace.slot"]
    assert names[-1] == "patroni.replace.slot"
    assert "192.168.60.132" not in replace_steps(ctx, "node02", "node03")[
        names.index("patroni.config")].actions_fn(ctx, ctx.inventory.get("node01"))[1].content.decode()
    with pytest.raises(ProcedureFailed, match="node01 is still in"):
        replace_steps(ctx, "node01", "node03")
    assert replace_precheck(LEADER1, "node02") == []
    assert "still the leader" in replace_precheck(LEADER1, "node01")[0]


def test_runbook_status_lists_operations_and_day2_steps():
    """The install table has no row for a procedure's steps: runbook.status shows them in two more tables."""
    from rich.console import Console

    from runbook.tasks.records import _procedure_tables

    doc = {"steps": ["etcd.packages"], "checkpoints": [
        {"host": "etcd01", "step": "etcd.packages", "status": "done", "note": None, "finished": 1},
        {"host": "local", "step": "membership:patroni-remove:node02", "status": "running",
         "note": "patroni-remove-node02-20261129T000000-abcdef", "finished": None},
        {"host": "etcd01", "step": "patroni.remove.dcs", "status": "done", "note": None, "finished": 2}]}
    ops, steps = _procedure_tables(doc)
    assert (ops.row_count, steps.row_count) == (1, 1)
    con = Console(width=200, record=True)
    con.print(ops)
    con.print(steps)
    text = con.export_text()
    assert "patroni-remove" in text and "node02" in text and "running" in text and "abcdef" in text
    assert "patroni.remove.dcs" in text and "etcd.packages" not in text
