"""One definition per step: targeting, derived file checks and undos, declared dependencies, host identity.

The fake transport answers the derived file commands (check, keep the original, undo) against its
in-memory files, as sh would on a host; the e2e test (tests/e2e/test_step_model.py) runs the real ones.
"""
from __future__ import annotations

import hashlib
import re

import jinja2
import pytest

from runbook.core.engine import apply, decide
from runbook.core.export import export_markdown, file_diffs
from runbook.core.files import UNDO_DIR, files_check
from runbook.core.identity import IDENTITY_CMD
from runbook.core.offline import NOT_CONTACTED
from runbook.core.rollback import mark_done, rollback
from runbook.core.step import Put, Run, Section
from runbook.inventory import InventoryError
from runbook.sections import all_steps

MOTD = "Welcome to {{ name }}, a member of {{ cluster }}.\n"


def fake_sh(ft):
    """Teach the fake transport the derived file commands (the formats of runbook.core.files)."""

    def check(host, cmd):
        ok = True
        for sha, path in re.findall(r"'([0-9a-f]{64})  (\S+)'", cmd):
            f = ft.files.get((host.name, path))
            ok &= bool(f) and hashlib.sha256(f[0]).hexdigest() == sha
        for paths, want in re.findall(r"stat -c '%a %U %G' (.+?) 2>/dev/null\)\" = '([^']*)'", cmd):
            have = []
            for p in paths.split():
                f = ft.files.get((host.name, p))
                have.append(f"{int(f[1], 8):o} {f[2]} {f[2]}" if f else "")
            ok &= "\n".join(have) == want
        return 0 if ok else 1

    def keep(host, cmd):
        for b, p, sha in re.findall(r"if \[ ! -e (\S+) \] && .*?if \[ ! -e (\S+) \]; then .*? != ([0-9a-f]{64}) \]",
                                    cmd):
            if (host.name, b) in ft.files or (host.name, b + ".absent") in ft.files:
                continue
            cur = ft.files.get((host.name, p))
            if cur is None:
                ft.files[(host.name, b + ".absent")] = (b"", "0600", "root")
            elif hashlib.sha256(cur[0]).hexdigest() != sha:
                ft.files[(host.name, b)] = cur
        return 0

    def undo(host, cmd):
        for b, p in re.findall(r"if \[ -e (\S+) \]; then mkdir -p .*? && mv -f \S+ (\S+); else", cmd):
            kept = ft.files.pop((host.name, b), None)
            if kept is not None:
                ft.files[(host.name, p)] = kept
            else:
                ft.files.pop((host.name, p), None)
            ft.files.pop((host.name, b + ".absent"), None)
        return 0

    ft.on(r"sha256sum --quiet --status -c -", check)
    ft.on(r"^umask 077; mkdir -p " + re.escape(UNDO_DIR), keep)
    ft.on(r"^if \[ -e " + re.escape(UNDO_DIR), undo)


def motd_section() -> Section:
    """A new step that puts one templated file: one decorated function, no check and no undo by hand."""
    sec = Section("demo", 90, "demo")

    @sec.step("motd", role="postgres")
    def motd(ctx, host):
        """Message of the day: /etc/motd.d/cluster names the cluster"""
        text = jinja2.Template(MOTD, keep_trailing_newline=True).render(name=host.name,
                                                                        cluster=ctx.inventory.cluster.name)
        return [Put("/etc/motd.d/cluster", text.encode(), mode="0640", source="templates/demo/motd.j2")]

    return sec


def test_a_step_that_puts_one_file_works_in_all_six_modes(ctx, inv):
    from runbook import console as ui

    ft = ctx.transport
    fake_sh(ft)
    steps = motd_section().steps
    step = steps[0]
    assert step.check_fn is None and step.undo_fn is None
    path = "/etc/motd.d/cluster"
    ft.files[("node01", path)] = (b"the distribution's motd\n", "0644", "root")  # replaced: kept, restored

    # --dry: a plan that says what would run, and the diff of the file; nothing touched
    ctx.options.dry = True
    report = apply(ctx, steps, inv.hosts)
    assert {(d.host.name, d.label) for d in report.plan} == {("node01", "will run"), ("node02", "will run")}
    diff = "".join(file_diffs(ctx, report.plan[0]))
    assert "-the distribution's motd" in diff and "+Welcome to node01" in diff
    assert ft.writes == [] and ctx.ledger.all() == []
    ctx.options.dry = False

    # --step: the operator's answer decides; a skip runs nothing
    ctx.options.step, ctx.options.answer = True, lambda name: "skip"
    report = apply(ctx, steps, inv.hosts)
    assert report.executed == [] and ft.writes == []
    assert "1 file(s) written on node01, node02" in "\n".join(ui.step_summary(step, report.plan))
    ctx.options.step, ctx.options.answer = False, None

    # apply: the file is written, its derived check passes, the record is done
    report = apply(ctx, steps, inv.hosts)
    assert sorted(report.executed) == [("node01", "demo.motd"), ("node02", "demo.motd")]
    want = b"Welcome to node01, a member of patroni_cluster.\n"
    assert ft.files[("node01", path)] == (want, "0640", "root")
    assert ft.files[("node01", UNDO_DIR + path)][0] == b"the distribution's motd\n"  # the original, kept
    assert ("node02", UNDO_DIR + path + ".absent") in ft.files  # new there
    assert {c.status for c in ctx.ledger.all()} == {"done"}

    # export: the same hosts, the command that writes the file and its derived check
    text = export_markdown(ctx, steps)
    assert "Hosts: node01, node02 (parallel)." in text
    assert f"install -D -m 0640 -o root -g root /dev/stdin {path}" in text and "Welcome to node02" in text
    assert text.index(f"mkdir -p {UNDO_DIR}") < text.index("/dev/stdin /etc/motd.d/cluster")
    assert hashlib.sha256(want).hexdigest() in text.split("#### demo.motd on node01")[1]

    # --verify: a file edited on the host is found and put back; the untouched host is left alone
    ft.files[("node02", path)] = (b"edited by hand\n", "0640", "root")
    ctx.ledger.identities.clear()
    ctx.options.verify = True
    report = apply(ctx, steps, inv.hosts)
    ctx.options.verify = False
    assert report.executed == [("node02", "demo.motd")]
    assert {d.host.name: d.label for d in report.plan} == {"node01": "done", "node02": "drifted"}
    assert ft.files[("node02", path)][0].startswith(b"Welcome to node02")

    # rollback: node01 gets its original back, node02 loses the file it did not have
    undone = rollback(ctx, steps, "demo.motd", inv.postgres, cascade=False)
    assert sorted(undone) == [("node01", "demo.motd"), ("node02", "demo.motd")]
    assert ft.files[("node01", path)][0] == b"the distribution's motd\n"
    assert ("node02", path) not in ft.files
    assert not [k for k in ft.files if k[1].startswith(UNDO_DIR)]  # nothing left behind
    assert {c.status for c in ctx.ledger.all()} == {"rolled_back"}


def test_files_check_is_one_command_for_all_files_of_a_step():
    a = Put("/etc/a.conf", b"a\n", mode="0640", owner="etcd")
    b = Put("/etc/b.conf", b"b\n", mode="2775", owner="postgres", group="adm")
    cmd = files_check([Run("true"), a, b])
    assert cmd.count("stat -c") == 1 and cmd.count("sha256sum") == 1
    assert "'640 etcd etcd\n2775 postgres adm'" in cmd
    assert f"'{a.sha256}  /etc/a.conf'" in cmd and f"'{b.sha256}  /etc/b.conf'" in cmd
    assert files_check([Run("true")]) is None
    alt = Put("/etc/c.conf", b"new\n", accept=(hashlib.sha256(b"existing\n").hexdigest(),))
    assert hashlib.sha256(b"existing\n").hexdigest() in files_check([alt])


def test_export_runs_each_step_on_the_hosts_the_engine_plans(ctx, inv, bundle):
    ctx.options.dry = True
    plan: dict[str, list[str]] = {}
    for d in apply(ctx, all_steps(), inv.hosts).plan:
        plan.setdefault(d.step.name, []).append(d.host.name)
    text = export_markdown(ctx, all_steps())
    for s in all_steps():
        exported = re.findall(rf"^#### {re.escape(s.name)} on (\S+)$", text, re.M)
        assert exported == [h.name for h in s.hosts(ctx, inv.hosts)], s.name
        assert sorted(exported) == sorted(plan.get(s.name, [])), s.name  # front door, backup: no host without one
    assert re.findall(r"^#### patroni\.bootstrap on (\S+)$", text, re.M) == ["node01"]
    assert re.findall(r"^#### patroni\.replicas on (\S+)$", text, re.M) == ["node02"]


def test_rollback_mark_done_and_forget_refuse_a_host_the_step_never_runs_on(ctx, inv, bundle):
    with pytest.raises(InventoryError, match="patroni.bootstrap does not run on node02"):
        mark_done(ctx, all_steps(), "patroni.bootstrap", [inv.get("node02")], "x")
    with pytest.raises(InventoryError, match="patroni.replicas does not run on node01"):
        rollback(ctx, all_steps(), "patroni.replicas", [inv.get("node01")], cascade=False)
    assert ctx.ledger.all() == []


def test_every_step_that_puts_files_gets_a_check_and_an_undo_from_them(ctx, inv, bundle):
    seen = 0
    for s in all_steps():
        for h in s.hosts(ctx, inv.hosts):
            puts = [a for a in s.actions_fn(ctx, h) if isinstance(a, Put)]
            if not puts:
                continue
            seen += 1
            probe = s.probe(ctx, h)
            undo = "\n".join(a.cmd for a in s.undo_actions(ctx, h) if isinstance(a, Run))
            for p in puts:
                assert p.path in probe and p.path in undo, (s.name, h.name, p.path)
    assert seen >= 10
    for s in all_steps():  # and every step can be rolled back, or says why
        for h in s.hosts(ctx, inv.hosts):
            assert s.undo_missing(ctx, h) is None, s.name


def test_depends_on_feeds_the_fingerprint_without_comments(ctx, inv, bundle):
    from runbook.sections import patroni

    node = inv.get("node01")
    before = patroni.validate.fingerprint(ctx, node, patroni.validate.actions_fn(ctx, node))
    assert not any("#" in a.cmd for a in patroni.validate.actions_fn(ctx, node))
    ctx.secrets["replication"]["password"] = "changed-changed-changed"  # the config Put renders differently
    after = patroni.validate.fingerprint(ctx, node, patroni.validate.actions_fn(ctx, node))
    assert before != after


def test_a_rebuilt_host_is_a_new_machine_and_its_records_are_void(ctx, inv):
    ft = ctx.transport
    mid = {"etcd01": "aaa"}
    ft.on(r"^cat /etc/machine-id$", lambda h, c: (0, mid.get(h.name, f"id-{h.name}") + "\n"))
    sec = Section("id", 5, "")

    @sec.step("one", role="etcd")
    def one(c, h):
        return [Run(f"echo one {h.name}")]

    @sec.step("two", role="etcd")
    def two(c, h):
        return [Run(f"echo two {h.name}")]

    apply(ctx, sec.steps, inv.hosts)
    assert {c.machine for c in ctx.ledger.all() if c.host == "etcd01"} == {"aaa"}
    mid["etcd01"] = "bbb"  # re-imaged under the same name
    ctx.ledger.identities.clear()  # a new run
    notes = []
    ctx.observer = type("O", (), {"notice": lambda self, t: notes.append(t),
                                  "step_progress": ctx.observer.step_progress})()
    ctx.options.dry = True
    # plain: the ledger says all done, so no host is contacted (and the run says so); --verify probes them
    assert not [d for d in apply(ctx, sec.steps, inv.hosts).plan if d.run]
    assert notes == [NOT_CONTACTED] and ft.commands("etcd01").count(IDENTITY_CMD) == 1
    ctx.options.verify = True
    ctx.ledger.identities.clear()
    plan = apply(ctx, sec.steps, inv.hosts)
    assert [(d.host.name, d.step.name, d.label) for d in plan.plan if d.run] == [
        ("etcd01", "id.one", "new machine"), ("etcd01", "id.two", "new machine")]
    assert "etcd01 is a new machine: its 2 recorded steps will run again" in notes
    ctx.options.dry = False
    ctx.ledger.identities.clear()
    report = apply(ctx, sec.steps, inv.hosts)
    assert sorted(report.executed) == [("etcd01", "id.one"), ("etcd01", "id.two")]
    assert {c.machine for c in ctx.ledger.all() if c.host == "etcd01"} == {"bbb"}
    ctx.options.verify = False
    ctx.ledger.identities.clear()
    assert apply(ctx, sec.steps, inv.hosts).executed == []
    assert ft.commands("etcd02").count(IDENTITY_CMD) == 3  # once per run that contacts hosts, not per step


def test_an_old_ledger_keeps_working_and_gets_identities(tmp_path, ctx, inv):
    import sqlite3

    from runbook.core.ledger import Ledger

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE checkpoints (host TEXT, step TEXT, status TEXT, fingerprint TEXT, run_id INTEGER, "
                "mode TEXT, started FLOAT, finished FLOAT, duration FLOAT, note TEXT, error TEXT, "
                "PRIMARY KEY (host, step))")
    con.execute("INSERT INTO checkpoints (host, step, status, fingerprint) VALUES ('etcd01', 'a.b', 'done', 'f')")
    con.commit()
    con.close()
    led = Ledger(db)
    rec = led.get("etcd01", "a.b")
    assert rec.status == "done" and rec.machine is None
    assert led.adopt_identity("etcd01", "m1") == 1
    assert led.get("etcd01", "a.b").machine == "m1"
    cols = [r[1] for r in led.db.execute("PRAGMA table_info(checkpoints)").fetchall()]
    assert "machine" not in cols  # an older runbook can still read this ledger


def test_stored_output_is_redacted_before_it_is_cut(ctx):
    from runbook.core.ledger import TAIL

    secret = ctx.secrets["superuser"]["password"]
    half = len(secret) // 2
    out = "x" * 50 + secret + "y" * (TAIL - (len(secret) - half))  # the last TAIL chars start mid-secret
    ctx.ledger.event("etcd01", "s", "run", "cmd", 0, out, out)
    ctx.ledger.set("etcd01", "s", "failed", error=out)
    dump = "\n".join(ctx.ledger.db.conn.iterdump())
    assert secret[half:] not in dump and secret[-6:] not in dump


def test_step_mode_summary_and_prompt_letters(ctx, inv, bundle, monkeypatch):
    from runbook import console as ui
    from runbook.sections import push

    decs = [decide(ctx, push.push, h) for h in push.push.hosts(ctx, inv.hosts)]
    lines = ui.step_summary(push.push, decs)
    assert lines[0].startswith("parallel step on 5 host(s): etcd01 (will run)")
    assert any("file(s) uploaded" in ln and "command(s)" in ln for ln in lines)
    assert len(lines) <= 6  # a summary, not every host's command list
    with ui.console.capture() as cap:
        ui.console.print(ui.escape(f"run bundle.push? {ui.PROMPT}"))
    assert "[y]es / [s]kip / [c]ontinue all / [q]uit / [d]etails" in cap.get()


def test_step_prompt_shows_the_summary_then_details_on_d(ctx, inv, bundle, monkeypatch):
    from runbook import console as ui
    from runbook.sections import push

    decs = [decide(ctx, push.push, h) for h in push.push.hosts(ctx, inv.hosts)]
    monkeypatch.setattr(ui.sys.stdin, "isatty", lambda: True)

    def ask(keys: list[str]) -> tuple[str, str]:
        it = iter(keys)
        monkeypatch.setattr(ui.Prompt, "ask", lambda *a, **k: next(it))
        with ui.console.capture() as cap:
            answer = ui.RichObserver().ask_step(push.push, decs, ctx.redact)
        return answer, cap.get()

    answer, out = ask(["s"])
    assert answer == "skip" and "file(s) uploaded" in out and "sha256sum --quiet -c" not in out
    answer, out = ask(["d", "y"])
    assert answer == "yes"
    assert out.index("file(s) uploaded") < out.index("sha256sum --quiet -c")  # summary first, commands on d


def test_cascade_ignores_a_stray_record_of_a_step_that_never_runs_on_the_host(ctx, inv, bundle):
    from runbook.core.rollback import later_done
    from runbook.sections import patroni

    node2 = inv.get("node02")
    for name in ("patroni.unit", "patroni.bootstrap", "patroni.replicas"):
        ctx.ledger.set("node02", name, "done", fingerprint="x")  # bootstrap: left by an old mark-done
    later = [s.name for s in later_done(ctx, all_steps(), patroni.unit, node2)]
    assert later == ["patroni.replicas"]
