"""The engine through the fake transport: order, fan-out, failure, resume, fingerprints, modes."""
from __future__ import annotations

import threading
import time

import pytest

from runbook.core.engine import Quit, RunFailed, apply
from runbook.core.export import export_markdown
from runbook.core.identity import IDENTITY_CMD
from runbook.core.ledger import Ledger, LedgerLocked
from runbook.core.offline import NOT_CONTACTED
from runbook.core.rollback import mark_done, rollback
from runbook.core.step import Put, Run, Section


def make_section(content: bytes = b"v1\n"):
    sec = Section("demo", 1, "demo")

    @sec.step("first", role="etcd")
    def first(ctx, h):
        """First step"""
        return [Run(f"echo first {h.name}")]

    @first.check
    def _c1(ctx, h):
        return f"check first {h.name}"

    @first.undo
    def _u1(ctx, h):
        return [Run(f"undo first {h.name}")]

    @sec.step("second", role="etcd")
    def second(ctx, h):
        """Second step: a file"""
        return [Put("/etc/demo.conf", content, mode="0640", owner="etcd")]

    @second.undo
    def _u2(ctx, h):
        return [Run("rm -f /etc/demo.conf")]

    @sec.step("third", role="postgres", kind="serial")
    def third(ctx, h):
        """Third step"""
        return [Run(f"echo third {h.name}")]

    @third.undo
    def _u3(ctx, h):
        return [Run(f"undo third {h.name}")]

    return sec.steps


def statuses(ctx):
    return {(c.host, c.step): c.status for c in ctx.ledger.all()}


def test_steps_run_in_order_on_their_role(ctx, inv):
    steps = make_section()
    report = apply(ctx, steps, inv.hosts)
    order = [s for _, s in report.executed]
    assert order == ["demo.first"] * 3 + ["demo.second"] * 3 + ["demo.third"] * 2  # step by step, in order
    cmds = ctx.transport.commands("etcd01")
    backup = next(i for i, c in enumerate(cmds) if c.startswith("umask 077; mkdir -p /var/lib/pg-ha-runbook"))
    assert cmds.index("echo first etcd01") < backup  # first's action before second's (the file's backup)
    assert ("etcd01", "/etc/demo.conf") in ctx.transport.writes
    assert "echo third etcd01" not in cmds and "echo first node01" not in ctx.transport.commands("node01")
    assert ctx.transport.commands("node01")[-1] == "echo third node01"
    assert set(statuses(ctx).values()) == {"done"}


def test_second_run_executes_nothing(ctx, inv):
    steps = make_section()
    apply(ctx, steps, inv.hosts)
    n = len(ctx.transport.calls)
    ctx.ledger.identities.clear()  # a new run
    report = apply(ctx, steps, inv.hosts)
    assert report.executed == []
    # done + same fingerprint everywhere: no host is contacted at all (not even for its identity)
    assert ctx.transport.calls[n:] == []
    assert report.notices == [NOT_CONTACTED]


def test_parallel_fan_out(ctx, inv):
    active, peak = [0], [0]
    mu = threading.Lock()

    def slow(host, cmd):
        with mu:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with mu:
            active[0] -= 1
        return 0

    ctx.transport.on(r"^echo first", slow)
    apply(ctx, make_section(), inv.hosts)
    assert peak[0] == 3  # the three etcd hosts at once


def test_serial_step_runs_one_host_at_a_time(ctx, inv):
    order = []
    ctx.transport.on(r"^echo third", lambda h, c: order.append(h.name) or 0)
    apply(ctx, make_section(), inv.hosts)
    assert order == ["node01", "node02"]


def test_failure_is_per_host_and_stops_before_next_step(ctx, inv):
    ctx.transport.on(r"^echo first etcd02", (1, ""))
    with pytest.raises(RunFailed) as exc:
        apply(ctx, make_section(), inv.hosts)
    msg = str(exc.value)
    assert "demo.first" in msg and "etcd02" in msg and "run the same command again" in msg
    st = statuses(ctx)
    assert st[("etcd02", "demo.first")] == "failed"
    assert st[("etcd01", "demo.first")] == "done"
    assert ("etcd01", "demo.second") not in st  # nothing after the failed step started
    errs = [c.error for c in ctx.ledger.all() if c.status == "failed"]
    assert "exited 1" in errs[0]


def test_resume_after_failure_runs_only_what_is_left(ctx, inv):
    ctx.transport.on(r"^echo first etcd02", (1, ""))
    with pytest.raises(RunFailed):
        apply(ctx, make_section(), inv.hosts)
    ctx.transport.rules.clear()
    report = apply(ctx, make_section(), inv.hosts)
    assert ("etcd02", "demo.first") in report.executed
    assert ("etcd01", "demo.first") not in report.executed


def test_step_left_running_is_decided_by_its_check(ctx, inv):
    steps = make_section()
    ctx.ledger.set("etcd01", "demo.first", "running", fingerprint="x")
    ctx.ledger.set("etcd02", "demo.first", "running", fingerprint="x")
    # etcd02's effect is absent until its action runs
    ctx.transport.on(r"^check first etcd02",
                     lambda h, c: 0 if "echo first etcd02" in ctx.transport.commands("etcd02") else 1)
    ctx.transport.on(r"^check first etcd01", 0)
    report = apply(ctx, steps, inv.hosts)
    ran = {h for h, s in report.executed if s == "demo.first"}
    assert "etcd02" in ran and "etcd01" not in ran
    assert statuses(ctx)[("etcd01", "demo.first")] == "done"


def test_changed_fingerprint_reruns_and_shows_changed(ctx, inv):
    apply(ctx, make_section(b"v1\n"), inv.hosts)
    ctx.options.dry = True
    plan = apply(ctx, make_section(b"v2\n"), inv.hosts).plan
    labels = {(d.host.name, d.step.name): d.label for d in plan}
    assert labels[("etcd01", "demo.second")] == "changed"
    assert labels[("etcd01", "demo.first")] == "done"
    ctx.options.dry = False
    report = apply(ctx, make_section(b"v2\n"), inv.hosts)
    assert {s for _, s in report.executed} == {"demo.second"}
    assert ctx.transport.files[("etcd01", "/etc/demo.conf")][0] == b"v2\n"


def test_dry_verify_asks_checks_but_writes_nothing(ctx, inv):
    apply(ctx, make_section(), inv.hosts)
    n_writes, n_rows, n_calls = len(ctx.transport.writes), len(ctx.ledger.all()), len(ctx.transport.calls)
    ctx.options.dry = ctx.options.verify = True
    ctx.transport.on(r"^check first etcd02", 1)
    plan = apply(ctx, make_section(), inv.hosts).plan
    labels = {(d.host.name, d.step.name): d.label for d in plan}
    assert labels[("etcd02", "demo.first")] == "drifted" and labels[("etcd01", "demo.first")] == "done"
    assert len(ctx.transport.writes) == n_writes and len(ctx.ledger.all()) == n_rows
    new = [c for c in ctx.transport.commands()[n_calls:] if c != IDENTITY_CMD]
    assert len([c for c in new if c.startswith("check ")]) == 3  # first's hand-written check
    assert len([c for c in new if c.startswith("test \"$(stat")]) == 3  # second's derived file check
    assert len(new) == 6  # only probes, no actions


def test_dry_run_writes_nothing(ctx, inv):
    ctx.options.dry = True
    report = apply(ctx, make_section(), inv.hosts)
    assert ctx.transport.writes == [] and ctx.transport.calls == []
    assert statuses(ctx) == {}
    assert {d.label for d in report.plan} == {"will run"}


def test_verify_reruns_drifted_steps(ctx, inv):
    apply(ctx, make_section(), inv.hosts)
    ctx.options.verify = True
    before = len(ctx.transport.commands("etcd03"))
    ctx.transport.on(r"^check first etcd03",
                     lambda h, c: 0 if "echo first etcd03" in ctx.transport.commands("etcd03")[before:] else 1)
    report = apply(ctx, make_section(), inv.hosts)
    assert report.executed == [("etcd03", "demo.first")]


def test_step_mode_answers_are_recorded(ctx, inv):
    answers = iter(["yes", "skip", "quit"])
    ctx.options.step = True
    ctx.options.answer = lambda name: next(answers)
    with pytest.raises(Quit):
        apply(ctx, make_section(), inv.hosts)
    st = statuses(ctx)
    assert st[("etcd01", "demo.first")] == "done"
    assert ("etcd01", "demo.second") not in st
    kinds = [e["action"] for e in ctx.ledger.events() if e["kind"] == "answer"]
    assert "--step answer: skip" in kinds and "--step answer: quit" in kinds


def test_mark_done_then_automation_skips_it(ctx, inv):
    steps = make_section()
    mark_done(ctx, steps, "demo.first", [inv.get("etcd01")], "did it by hand")
    report = apply(ctx, steps, inv.hosts)
    assert ("etcd01", "demo.first") not in report.executed
    assert "echo first etcd01" not in ctx.transport.commands("etcd01")
    rec = ctx.ledger.get("etcd01", "demo.first")
    assert rec.status == "manual" and rec.note == "did it by hand"


def test_rollback_refused_while_later_steps_done_then_cascade(ctx, inv):
    steps = make_section()
    apply(ctx, steps, inv.hosts)
    with pytest.raises(RunFailed, match="later steps are done.*demo.second"):
        rollback(ctx, steps, "demo.first", [inv.get("etcd01")], cascade=False)
    assert "undo first etcd01" not in ctx.transport.commands("etcd01")
    undone = rollback(ctx, steps, "demo.first", [inv.get("etcd01")], cascade=True)
    assert undone == [("etcd01", "demo.second"), ("etcd01", "demo.first")]  # newest first
    cmds = ctx.transport.commands("etcd01")
    assert cmds.index("rm -f /etc/demo.conf") < cmds.index("undo first etcd01")
    st = statuses(ctx)
    assert st[("etcd01", "demo.first")] == st[("etcd01", "demo.second")] == "rolled_back"
    assert st[("etcd02", "demo.first")] == "done"
    report = apply(ctx, steps, inv.hosts)  # re-apply restores exactly those
    assert sorted(report.executed) == [("etcd01", "demo.first"), ("etcd01", "demo.second")]


def test_rollback_guards_non_empty_data_dir(ctx, inv):
    sec = Section("data", 2, "")

    @sec.step("dir", role="etcd", guards_data=lambda c, h: "/var/lib/etcd")
    def d(c, h):
        return [Run("install -d /var/lib/etcd")]

    @d.undo
    def _u(c, h):
        return [Run("rm -rf /var/lib/etcd")]

    apply(ctx, sec.steps, inv.hosts)
    ctx.transport.on(r"refusing: /var/lib/etcd is not empty", 3)
    with pytest.raises(RunFailed, match="destroy-data"):
        rollback(ctx, sec.steps, "data.dir", [inv.get("etcd01")], cascade=False)
    assert "rm -rf /var/lib/etcd" not in ctx.transport.commands("etcd01")
    ctx.options.destroy_data = True
    rollback(ctx, sec.steps, "data.dir", [inv.get("etcd01")], cascade=False)
    assert "rm -rf /var/lib/etcd" in ctx.transport.commands("etcd01")


def test_export_has_commands_files_and_masks_secrets(ctx, inv):
    secret = ctx.secrets["replication"]["password"]
    sec = Section("exp", 3, "")

    @sec.step("conf", role="postgres")
    def conf(c, h):
        """Write the config"""
        return [Put("/etc/x.yml", f"password: {secret}\n".encode(), mode="0600", owner="postgres", secret=True),
                Run("systemctl reload x")]

    text = export_markdown(ctx, make_section() + sec.steps)
    assert "### demo.first: First step" in text
    assert "echo first etcd02" in text and "#### exp.conf on node02" in text
    assert "install -D -m 0600 -o postgres -g postgres /dev/stdin /etc/x.yml" in text
    assert secret not in text and "password: ***" in text


def test_secrets_never_reach_the_ledger(ctx, inv):
    secret = ctx.secrets["superuser"]["password"]
    ctx.transport.on(r"leaky", (1, f"oops {secret}"))
    sec = Section("leak", 4, "")

    @sec.step("x", role="etcd")
    def x(c, h):
        return [Run(f"leaky --password={secret}", stdin=secret.encode())]

    with pytest.raises(RunFailed) as exc:
        apply(ctx, sec.steps, inv.hosts)
    assert secret not in str(exc.value)
    dump = "\n".join(ctx.ledger.db.conn.iterdump())
    assert secret not in dump and "***" in dump


def test_run_lock_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path):
    a = Ledger(tmp_path / "c.db")
    a.acquire("first", [])
    b = Ledger(tmp_path / "c.db")
    with pytest.raises(LedgerLocked, match="another runbook run holds the lock"):
        b.acquire("second", [])
    a._lock_fd and __import__("os").close(a._lock_fd)  # the holder dies without releasing
    a._lock_fd = None
    b.acquire("second", [])
    assert b.stale_lock and "first" in b.stale_lock
    assert [r["outcome"] for r in b.runs()] == ["running", "interrupted"]
    b.release("ok")
    assert b.integrity() == "ok"


def test_ledger_settings_are_durable(tmp_path):
    led = Ledger(tmp_path / "c.db")
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert {"runs", "checkpoints", "events"} <= set(led.db.table_names())
    assert oct((tmp_path / "c.db").stat().st_mode & 0o777) == "0o600"


def test_a_step_that_moves_drops_the_unfinished_record_it_left_behind(ctx, inv):
    """A step narrowed to one host that can change (patroni.roles follows the leader): once it is done on its new
    host, the rolled-back record on the old one is dropped (with an event), not left as work forever."""
    sec = Section("moving", 1, "moving")
    leader = {"name": "node01"}

    @sec.step("on-leader", role="postgres", only=lambda ctx, hosts: [h for h in hosts if h.name == leader["name"]])
    def on_leader(ctx, h):
        """On the leader"""
        return [Run("echo on the leader")]

    apply(ctx, sec.steps, inv.hosts)
    assert statuses(ctx) == {("node01", "moving.on-leader"): "done"}
    ctx.ledger.set("node01", "moving.on-leader", "rolled_back", mode="rollback")
    leader["name"] = "node02"  # a switchover
    apply(ctx, sec.steps, inv.hosts)
    assert statuses(ctx) == {("node02", "moving.on-leader"): "done"}
    assert any(e["kind"] == "superseded" and e["host"] == "node01" for e in ctx.ledger.events())
    ctx.options.dry = True  # a dry run drops nothing
    ctx.ledger.set("node01", "moving.on-leader", "failed")
    apply(ctx, sec.steps, inv.hosts)
    assert statuses(ctx)[("node01", "moving.on-leader")] == "failed"
