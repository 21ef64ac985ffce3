"""The no-op from the ledger alone (runbook.core.offline): no host contacted when every (host, step) is done
with today's fingerprint; anything else takes the normal path, which reads every host's identity first."""
from __future__ import annotations

import shlex
from pathlib import Path

from runbook.core.engine import apply
from runbook.core.identity import IDENTITY_CMD
from runbook.core.offline import NOT_CONTACTED
from runbook.core.step import Run, Section


def _steps(tag: str = "v1", *, leader_asked: list | None = None, always: bool = False):
    sec = Section("noop", 3, "")

    @sec.step("a", role="etcd", always_check=always)
    def a(ctx, h):
        return [Run(f"echo a {tag} {h.name}")]

    @a.check
    def _a(ctx, h):
        return f"check a {h.name}"

    def leader(ctx, hosts):  # like patroni.roles: the cluster says which member (asks a host)
        if leader_asked is not None:
            leader_asked.append(1)
        r = ctx.transport.run(hosts[0], "who is the leader")
        want = r.stdout.strip() or hosts[0].name
        return [h for h in hosts if h.name == want]

    @sec.step("once", role="postgres", only=leader)
    def once(ctx, h):
        return [Run("create roles")]

    return sec.steps


def _fresh_run(ctx):
    ctx.ledger.identities.clear()
    return len(ctx.transport.calls)


def test_all_done_contacts_no_host_even_for_a_step_the_cluster_places(ctx, inv):
    ctx.transport.on(r"^who is the leader$", (0, "node02"))
    apply(ctx, _steps(), inv.hosts)
    assert ctx.ledger.get("node02", "noop.once").status == "done" and ctx.ledger.get("node01", "noop.once") is None
    n = _fresh_run(ctx)
    asked: list = []
    report = apply(ctx, _steps(leader_asked=asked), inv.hosts)
    assert ctx.transport.calls[n:] == [] and asked  # `only` was asked, and refused offline
    assert report.executed == [] and report.notices == [NOT_CONTACTED]
    assert ("node02", "noop.once", "done once for the cluster (host not contacted)") in report.skipped


def test_a_changed_step_takes_the_normal_path_with_identities(ctx, inv):
    apply(ctx, _steps(), inv.hosts)
    n = _fresh_run(ctx)
    report = apply(ctx, _steps("v2"), inv.hosts)
    assert sorted(report.executed)[:3] == [("etcd01", "noop.a"), ("etcd02", "noop.a"), ("etcd03", "noop.a")]
    assert NOT_CONTACTED not in report.notices
    want = {"etcd01", "etcd02", "etcd03", "node01"}  # the hosts its steps reach (the fake leader: node01)
    assert {h for h, _, c in ctx.transport.calls[n:] if c == IDENTITY_CMD} == want


def test_unfinished_records_are_not_a_noop(ctx, inv):
    ctx.transport.on(r"^who is the leader$", (0, "node02"))
    apply(ctx, _steps(), inv.hosts)
    for status in ("running", "failed", "pending", "rolled_back"):
        ctx.ledger.set("etcd02", "noop.a", status)
        n = _fresh_run(ctx)
        report = apply(ctx, _steps(), inv.hosts)
        assert NOT_CONTACTED not in report.notices, status
        assert ("etcd02", IDENTITY_CMD) in [(h, c) for h, _, c in ctx.transport.calls[n:]], status
        assert ctx.ledger.get("etcd02", "noop.a").status == "done", status
    # the leader's step left unfinished on the old leader: the cluster is asked again
    ctx.transport.on(r"^who is the leader$", (0, "node01"))
    ctx.ledger.set("node02", "noop.once", "failed")
    n = _fresh_run(ctx)
    report = apply(ctx, _steps(), inv.hosts)
    assert ("node01", "noop.once") in report.executed


def test_remote_always_checked_steps_are_checked_by_verify_not_by_the_noop(ctx, inv):
    apply(ctx, _steps(always=True), inv.hosts)
    n = _fresh_run(ctx)
    report = apply(ctx, _steps(always=True), inv.hosts)
    assert ctx.transport.calls[n:] == []
    why = "done; checked by --verify and before anything is sent (not checked now)"
    assert ("etcd01", "noop.a", why) in report.skipped
    drift = iter([1])  # drifted once; the re-run repairs it
    ctx.transport.on(r"check a etcd03", lambda h, c: next(drift, 0))
    ctx.options.verify = True
    n = _fresh_run(ctx)
    report = apply(ctx, _steps(always=True), inv.hosts)
    assert report.executed == [("etcd03", "noop.a")]


def test_a_dry_run_of_a_done_cluster_contacts_no_host_and_says_so(ctx, inv):
    apply(ctx, _steps(), inv.hosts)
    n = _fresh_run(ctx)
    ctx.options.dry = True
    notes: list[str] = []
    ctx.observer = type("O", (), {"notice": lambda self, t: notes.append(t),
                                  "step_progress": ctx.observer.step_progress})()
    plan = apply(ctx, _steps(), inv.hosts).plan
    assert ctx.transport.calls[n:] == [] and notes == [NOT_CONTACTED]
    assert {d.label for d in plan} == {"done"} and len(plan) == 4


# -- --verify: one remote execution per host (runbook.core.batch) -------------------------------------------
def _three(state: dict):
    """vb.first and vb.second on the etcd hosts, vb.third on the postgres hosts, each with a hand check."""
    sec = Section("vb", 4, "")
    for name, role in (("first", "etcd"), ("second", "etcd"), ("third", "postgres")):
        st = sec.step(name, role=role)(lambda ctx, h, n=name: [Run(f"echo {n} {h.name}")])
        st.check(lambda ctx, h, n=name: f"check {n} {h.name}")
    return sec.steps


def test_verify_asks_every_check_of_a_host_in_one_execution(ctx, inv):
    apply(ctx, _three({}), inv.hosts)
    n = _fresh_run(ctx)
    ctx.options.verify = True
    report = apply(ctx, _three({}), inv.hosts)
    assert report.executed == []
    assert sorted(ctx.transport.batches) == [("etcd01", 2), ("etcd02", 2), ("etcd03", 2), ("node01", 1),
                                             ("node02", 1)]
    # the identity and the checks were all inside those batches: nothing was sent on its own
    assert len(ctx.transport.calls[n:]) == 5 + 8
    assert {d.reason for d in report.plan} == {"done and verified"}


def test_verify_renders_each_step_once_for_its_batch_and_its_decision(ctx, inv):
    """The (actions, fingerprint) rendered for a host's batch are the ones its decision takes (nothing ran in
    between); after a step ran, the steps ahead are rendered again for the new batch."""
    from collections import Counter

    def counted(rendered: Counter):
        sec = Section("vr", 3, "")
        for name, role in (("first", "etcd"), ("second", "etcd")):
            def act(ctx, h, n=name):
                rendered[(h.name, n)] += 1
                return [Run(f"echo {n} {h.name}")]
            sec.step(name, role=role)(act).check(lambda ctx, h, n=name: f"check {n} {h.name}")
        return sec.steps

    apply(ctx, counted(Counter()), inv.hosts)
    _fresh_run(ctx)
    ctx.options.verify = True
    once: Counter = Counter()
    assert apply(ctx, counted(once), inv.hosts).executed == []
    assert set(once.values()) == {1} and len(once) == 6
    fixed = {"first": False}  # drifted: first runs there (which repairs it), then second is asked again
    ctx.transport.on(r"^check first etcd02$", lambda h, c: 0 if fixed["first"] else 1)
    ctx.transport.on(r"^echo first etcd02$", lambda h, c: fixed.update(first=True) or 0)
    again: Counter = Counter()
    report = apply(ctx, counted(again), inv.hosts)
    assert report.executed == [("etcd02", "vr.first")]
    assert again[("etcd02", "first")] == 1 and again[("etcd02", "second")] == 2  # before and after the change
    assert again[("etcd01", "second")] == 2  # every host's steps ahead: the new batch renders them again


def test_a_step_that_ran_makes_the_checks_ahead_be_taken_again(ctx, inv):
    """A check is never answered by a state an earlier step of this run has since changed: first drifted on
    etcd02 and its re-run breaks second's effect there; second is checked again and re-runs too."""
    apply(ctx, _three({}), inv.hosts)
    _fresh_run(ctx)
    rerun = {"first": False, "second": False}

    def first_check(h, c):
        return 0 if rerun["first"] else 1

    def first_runs(h, c):
        rerun["first"] = True
        return 0

    ctx.transport.on(r"^check first etcd02$", first_check)
    ctx.transport.on(r"^echo first etcd02$", first_runs)
    ctx.transport.on(r"^check second etcd02$", lambda h, c: 1 if rerun["first"] and not rerun["second"] else 0)
    ctx.transport.on(r"^echo second etcd02$", lambda h, c: rerun.update(second=True) or 0)
    ctx.options.verify = True
    report = apply(ctx, _three({}), inv.hosts)
    assert [e for e in report.executed if e[0] == "etcd02"] == [("etcd02", "vb.first"), ("etcd02", "vb.second")]
    assert {e[0] for e in report.executed} == {"etcd02"}
    # after each change one new batch per host for the steps still ahead, never a check per step and host
    assert len(ctx.transport.batches) == 5 + 5 + 2


def test_a_check_missing_from_the_answer_is_asked_on_its_own(ctx, inv):
    apply(ctx, _three({}), inv.hosts)
    _fresh_run(ctx)
    ctx.options.verify = True
    real = ctx.transport._batch

    def cut(host, script, parts):  # the script died after its first check
        r = real(host, script, parts)
        return type(r)(0, "\n".join(r.stdout.splitlines()[:2]) + "\n", "")

    ctx.transport._batch = cut
    ctx.transport.on(r"^check second etcd03$", 1)
    ctx.transport.on(r"^echo second etcd03$", lambda h, c: ctx.transport.on(r"^check second etcd03$", 0) or 0)
    report = apply(ctx, _three({}), inv.hosts)
    assert report.executed == [("etcd03", "vb.second")]


def test_the_batch_script_runs_in_a_real_shell(tmp_path):
    from runbook.core.batch import batch_script, parse_batch
    from runbook.core.transport import LocalTransport
    from runbook.inventory import LOCAL

    marker = tmp_path / "it's here"
    marker.write_text("x")
    checks = ["true", "false", "exit 3", f"test -f {shlex.quote(str(marker))}", "echo noise; echo err >&2; true",
              "for i in 1 2; do\n  [ $i = 2 ] && exit 0\ndone\nexit 1", "cat >/dev/null; exit 0"]
    r = LocalTransport().run(LOCAL, batch_script(checks, identity=True), timeout=60)
    mid, rcs = parse_batch(r.stdout)
    assert rcs == {0: 0, 1: 1, 2: 3, 3: 0, 4: 0, 5: 0, 6: 0}
    want = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else None
    assert mid == (want or None)


def test_a_check_that_does_not_parse_fails_alone(tmp_path):
    from runbook.core.batch import batch_script, parse_batch
    from runbook.core.transport import LocalTransport
    from runbook.inventory import LOCAL

    checks = ["true", "if then fi (", "x=1; [ \"$x\" = 1 ]", "false"]
    r = LocalTransport().run(LOCAL, batch_script(checks, identity=False), timeout=60)
    rcs = parse_batch(r.stdout, len(checks))[1]
    assert rcs[0] == 0 and rcs[1] != 0 and rcs[2] == 0 and rcs[3] == 1


def test_a_batch_that_outlives_its_budget_fails_the_checks_still_running(tmp_path, monkeypatch):
    """The batch's one `timeout` ends the checks still running (its process group): those answer 124, as
    a check that outlives its budget on its own does; the ones that ended keep their answer."""
    import time

    import runbook.core.batch as batch
    from runbook.core.transport import LocalTransport
    from runbook.inventory import LOCAL

    monkeypatch.setattr(batch, "BATCH_TIMEOUT", 1)
    pidf = tmp_path / "pid"
    checks = ["true", f"sh -c 'echo $$ > {pidf}; exec sleep 30'", "exit 4"]
    t0 = time.monotonic()
    r = LocalTransport().run(LOCAL, batch.batch_script(checks, identity=False), timeout=60)
    assert time.monotonic() - t0 < 10
    assert batch.parse_batch(r.stdout, len(checks))[1] == {0: 0, 1: 124, 2: 4}
    assert batch.parse_batch(r.stdout)[1] == {0: 0, 2: 4}  # count unknown: only what answered
    pid = int(pidf.read_text())
    for _ in range(50):  # bounded: 5 s
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the check's sleep (pid {pid}) outlived the batch")


def _placed(asked: list):
    """`a` on the etcd hosts; `once` on the member the cluster names (asks a host), with its own check."""
    sec = Section("pl", 3, "")

    @sec.step("a", role="etcd")
    def a(ctx, h):
        return [Run(f"echo a {h.name}")]

    @a.check
    def _a(ctx, h):
        return f"check a {h.name}"

    def leader(ctx, hosts):
        asked.append(1)
        r = ctx.transport.run(hosts[0], "who is the leader")
        return [h for h in hosts if h.name == (r.stdout.strip() or hosts[0].name)]

    @sec.step("once", role="postgres", only=leader)
    def once(ctx, h):
        return [Run("create roles")]

    @once.check
    def _once(ctx, h):
        return f"check once {h.name}"

    return sec.steps


def test_verify_asks_the_cluster_once_and_alongside_the_batches(ctx, inv):
    """A step placed by the cluster (patroni.roles on the leader): --verify asks patronictl once (not for the
    batch and again at the step's turn), while the batches run; the step's check rides in the batch of every
    host of its role it is recorded on, and only the chosen host's answer is taken."""
    ctx.transport.on(r"^who is the leader$", (0, "node02"))
    apply(ctx, _placed([]), inv.hosts)
    n = _fresh_run(ctx)
    asked: list = []
    ctx.options.verify = True
    report = apply(ctx, _placed(asked), inv.hosts)
    assert report.executed == [] and asked  # asked offline first (refused), then once for real
    leader_calls = [h for h, _, c in ctx.transport.calls[n:] if c == "who is the leader"]
    assert len(leader_calls) == 1
    assert sorted(ctx.transport.batches) == [("etcd01", 1), ("etcd02", 1), ("etcd03", 1), ("node02", 1)]
    assert [(d.host.name, d.reason) for d in report.plan if d.step.name == "pl.once"] == \
        [("node02", "done and verified")]
    # the leader moved to node01 since: its check there is its own (node01 has no record of it), the step runs
    ctx.transport.on(r"^who is the leader$", (0, "node01"))
    _fresh_run(ctx)
    report = apply(ctx, _placed(asked), inv.hosts)
    assert report.executed == [("node01", "pl.once")]


def test_an_older_application_on_another_member_is_history(ctx, inv):
    """A step the cluster places, applied again on the new leader after a switchover with other input (a
    rotated password): the old leader's record keeps the old fingerprint, and the no-op still contacts no one
    (the CI saw every later run take the normal path). A stale LATEST application is not a no-op."""
    import time

    ctx.transport.on(r"^who is the leader$", (0, "node01"))
    apply(ctx, _steps(), inv.hosts)
    ctx.ledger.set("node01", "noop.once", "done", fingerprint="the old passwords")
    time.sleep(0.01)
    ctx.transport.on(r"^who is the leader$", (0, "node02"))
    apply(ctx, _steps(), inv.hosts)  # the roles on the new leader, as secrets.rotate does
    assert ctx.ledger.get("node02", "noop.once").status == "done"
    n = _fresh_run(ctx)
    report = apply(ctx, _steps(), inv.hosts)
    assert ctx.transport.calls[n:] == [] and report.notices == [NOT_CONTACTED]
    assert ("node02", "noop.once", "done once for the cluster (host not contacted)") in report.skipped
    ctx.ledger.set("node02", "noop.once", "done", fingerprint="stale")  # now the latest is stale
    n = _fresh_run(ctx)
    report = apply(ctx, _steps(), inv.hosts)
    assert NOT_CONTACTED not in report.notices
