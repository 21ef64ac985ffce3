"""cluster.update as ledger steps (FakeTransport): names, hosts, order and irreversible marks; the plan recorded
and resumed; a resumed run skips what is done and never stops a member twice; the resume step always runs."""
from __future__ import annotations

import pytest

from runbook.core.engine import RunFailed
from runbook.core.export import export_markdown
from runbook.procedures.membership_ops import op_key
from runbook.procedures.update import OP, TARGET, current_plan, run_update, update_steps
from runbook.procedures.update_plan import Item, Plan
from runbook.sections.bundle_files import _manifest

DEBS = {"postgresql-15": "15.20-0+deb12u1", "libpq5": "15.20-0+deb12u1"}


@pytest.fixture
def inv(tmp_path):
    """The reference topology on Debian 12: the newer bundle below is a Debian 12 one (PostgreSQL 15)."""
    from conftest import reference_on

    return reference_on("debian12", tmp_path)


@pytest.fixture
def newer(ctx):
    from runbook.bundle.manifest import make_entry, write_manifest

    root = ctx.bundle_dir
    files = {"etcd/etcd-v3.5.16-linux-amd64.tar.gz": ("etcd", ("etcd",), "etcd", "3.5.16"),
             "wheels/patroni-4.1.5-py3-none-any.whl": ("wheel", ("postgres",), "patroni", "4.1.5"),
             "wheels/requirements.txt": ("meta", ("postgres",), "", "")}
    files.update({f"debs/debian12/{n}_{v}_amd64.deb": ("deb", ("postgres",), n, v) for n, v in DEBS.items()})
    entries = []
    for rel, (kind, roles, name, version) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        entries.append(make_entry(root, rel, kind=kind, version=version, source="test", roles=roles, name=name))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    _manifest.cache_clear()
    yield root
    _manifest.cache_clear()


FULL = Plan((Item("etcd", "etcd01", "etcd 3.5.15 -> 3.5.16"), Item("pause"), Item("patroni", "node02"),
             Item("patroni", "node01"), Item("resume"),
             Item("postgres", "node02", "libpq5 ...", ("libpq5", "postgresql-15")), Item("switchover"),
             Item("postgres", "node01", "libpq5 ...", ("libpq5", "postgresql-15"))))


def layout(ctx, steps):
    return [(s.name, [h.name for h in s.hosts(ctx, ctx.inventory.hosts)], bool(s.irreversible)) for s in steps]


def test_steps_hosts_order_and_irreversible_marks(ctx, newer):
    assert layout(ctx, update_steps(ctx, FULL, "op1", False)) == [
        ("bundle.verify", ["local"], False), ("bundle.push", ["etcd01", "etcd02", "etcd03", "node01", "node02"], False),
        ("cluster.update.etcd-etcd01", ["etcd01"], False),
        ("cluster.update.pause", ["local"], False),
        ("cluster.update.patroni-node02", ["node02"], False), ("cluster.update.patroni-node01", ["node01"], False),
        ("cluster.update.resume", ["local"], False),
        ("cluster.update.postgres-node02", ["node02"], True),
        ("cluster.update.switchover", ["local"], False),
        ("cluster.update.postgres-node01", ["node01"], True),
        # recorded again with the new bundle's fingerprint: cluster.up afterwards finds them done
        ("etcd.binaries", ["etcd01", "etcd02", "etcd03"], False), ("patroni.wheels", ["node01", "node02"], False),
        ("postgres.packages", ["node01", "node02"], False)]


def test_postgres_step_guards_before_it_stops_and_installs_exact_packages(ctx, newer):
    steps = update_steps(ctx, FULL, "op1", False)
    pg = next(s for s in steps if s.name == "cluster.update.postgres-node02")
    node02 = ctx.inventory.get("node02")
    cmds = [a.cmd for a in pg.actions_fn(ctx, node02)]
    stop = cmds.index("systemctl stop patroni")
    before = " ".join(cmds[:stop])
    assert "is the leader" in before and "the other members are not all healthy" in before
    assert "the cluster is paused" in before and "CHECKPOINT" in before and "Lag in MB" in before
    dpkg = next(c for c in cmds if "dpkg -i" in c)
    assert "--skip-same-version" in dpkg and "libpq5_15.20-0+deb12u1_amd64.deb" in dpkg
    assert cmds.index("systemctl start patroni") > cmds.index(dpkg)
    assert "Sync Standby" in cmds[-1]  # synchronous mode: waits until it is the sync standby again
    assert "**Irreversible**: replaces the PostgreSQL packages on node02" in export_markdown(ctx, steps)
    reinstall = Plan((Item("postgres", "node02", "same version: reinstall libpq5", ("libpq5",)),))
    pg = update_steps(ctx, reinstall, "op1", True)[2]
    assert "--skip-same-version" not in next(a.cmd for a in pg.actions_fn(ctx, node02) if "dpkg -i" in a.cmd)


def test_patroni_and_etcd_steps_check_the_others_first(ctx, newer):
    steps = {s.name: s for s in update_steps(ctx, FULL, "op1", False)}
    cmds = [a.cmd for a in steps["cluster.update.patroni-node02"].actions_fn(ctx, ctx.inventory.get("node02"))]
    assert "pause: true" in cmds[0] and "not paused" in cmds[0]
    assert cmds.index("systemctl restart patroni") > next(i for i, c in enumerate(cmds) if "pip install" in c)
    cmds = [a.cmd for a in steps["cluster.update.etcd-etcd01"].actions_fn(ctx, ctx.inventory.get("etcd01"))]
    assert "--endpoints=https://etcd02:2379,https://etcd03:2379" in cmds[0] and "endpoint health" in cmds[0]
    assert cmds.index("systemctl restart etcd") > 0


class FakePatroni:
    """patronictl pause / resume / show-config of a fake cluster; pip fails on the hosts in `broken`."""

    def __init__(self, ft, broken=()):
        self.paused, self.broken = False, set(broken)
        ft.on(r"show-config", lambda h, c: (0, "pause: true\n" if self.paused else "ttl: 30\n"))
        ft.on(r"pause --wait", self._pause)
        ft.on(r"resume --wait", self._resume)
        ft.on(r"pip install", lambda h, c: 1 if h.name in self.broken else 0)
        ft.on(r"grep -qx 'pause: true'", lambda h, c: 0 if self.paused else 1)

    def _pause(self, h, c):
        self.paused = True
        return 0

    def _resume(self, h, c):
        self.paused = False
        return 0


PATRONI = Plan((Item("pause"), Item("patroni", "node02"), Item("patroni", "node01"), Item("resume")))


def test_killed_update_resumes_its_recorded_plan_and_always_resumes_patroni(ctx, newer, monkeypatch):
    import runbook.procedures.update as upd

    ft = ctx.transport
    fake = FakePatroni(ft, broken={"node01"})
    monkeypatch.setattr(upd, "make_plan", lambda ctx, reinstall: PATRONI)
    plan, op_id, resumed = current_plan(ctx, False)
    assert not resumed
    with pytest.raises(RunFailed):
        run_update(ctx, plan, op_id, resumed, update_steps(ctx, plan, op_id, False))
    assert fake.paused  # stopped before the resume step: left paused
    assert ctx.ledger.get("local", op_key(OP, TARGET)).status == "failed"
    # the next run: the recorded plan, even though a survey would now plan something else
    monkeypatch.setattr(upd, "make_plan", lambda ctx, reinstall: Plan(()))
    fake.broken.clear()
    ft.calls.clear()
    plan2, op2, resumed = current_plan(ctx, False)
    assert resumed and op2 == op_id and plan2 == PATRONI
    run_update(ctx, plan2, op2, resumed, update_steps(ctx, plan2, op2, False))
    assert not fake.paused  # the resume step ran
    cmds = ft.commands()
    assert not [c for c in cmds if "pause --wait" in c]  # the done pause is not repeated
    assert not [c for c in ft.commands("node02") if "restart patroni" in c]  # node02 was done
    assert len([c for c in ft.commands("node02") if "pip install" in c]) == 1  # only patroni.wheels, recorded
    assert len([c for c in ft.commands("node01") if "systemctl restart patroni" in c]) == 1
    assert len([c for c in cmds if "resume --wait" in c]) == 1
    assert ctx.ledger.get("local", op_key(OP, TARGET)).status == "done"
    # finished: the next update is a new operation with a fresh survey
    _, op3, resumed = current_plan(ctx, False)
    assert not resumed and op3 != op_id


def test_interrupted_member_step_is_decided_by_its_check_never_stopped_twice(ctx, newer, monkeypatch):
    import runbook.procedures.update as upd

    ft = ctx.transport
    plan = Plan((Item("postgres", "node02", "libpq5 ...", ("libpq5",)),))
    monkeypatch.setattr(upd, "make_plan", lambda ctx, reinstall: plan)
    _, op_id, _ = current_plan(ctx, False)
    # killed while the step ran: the op and the step are left `running`
    ctx.ledger.set("local", op_key(OP, TARGET), "running", note=op_id)
    ctx.ledger.set("local", upd.PLAN_KEY, "done", note=plan.to_json())
    steps = update_steps(ctx, plan, op_id, False)
    ctx.ledger.set("node02", "cluster.update.postgres-node02", "running")
    ft.calls.clear()
    p2, op2, resumed = current_plan(ctx, False)
    assert resumed and op2 == op_id
    run_update(ctx, p2, op2, resumed, update_steps(ctx, p2, op2, False))  # the fake's check passes: found done
    assert not [c for c in ft.commands("node02") if c == "systemctl stop patroni"]
    assert ctx.ledger.get("node02", "cluster.update.postgres-node02").status == "done"
    assert steps[2].check_fn(ctx, ctx.inventory.get("node02")).startswith(f"[ \"$(cat /var/lib/pg-ha-runbook/"
                                                                          f"update-postgres 2>/dev/null)\" = {op_id}")


def test_a_resumed_update_refuses_another_bundle_unless_replanned(ctx, newer, monkeypatch):
    import runbook.procedures.update as upd

    from dataclasses import replace

    from runbook.bundle.manifest import manifest_sha256
    from runbook.errors import ProcedureFailed
    from runbook.procedures.update import PLAN_KEY

    op_id = "cluster-update-cluster-x"
    ctx.ledger.set("local", op_key(OP, TARGET), "failed", note=op_id)
    planned = replace(PATRONI, bundle="0" * 64, bundle_dir="/srv/bundle-new")
    ctx.ledger.set("local", PLAN_KEY, "done", note=planned.to_json())
    with pytest.raises(ProcedureFailed, match="--bundle /srv/bundle-new"):
        current_plan(ctx, False)
    same = replace(PATRONI, bundle=manifest_sha256(ctx.bundle_dir), bundle_dir=str(ctx.bundle_dir))
    ctx.ledger.set("local", PLAN_KEY, "done", note=same.to_json())
    assert current_plan(ctx, False) == (same, op_id, True)
    # --replan: the interrupted one is closed, a new survey plans (here: nothing differs)
    monkeypatch.setattr(upd, "make_plan", lambda ctx, reinstall: Plan(()))
    plan, op2, resumed = current_plan(ctx, False, replan=True)
    assert not resumed and op2 != op_id and plan == Plan(())
    assert ctx.ledger.get("local", op_key(OP, TARGET)).note == f"abandoned {op_id}"
