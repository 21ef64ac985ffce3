"""etcd membership as plans: which steps on which hosts, which irreversible; the quorum refusals; the member
list reader on a captured `etcdctl member list -w json`."""
from __future__ import annotations

import json

import pytest

from runbook.errors import ProcedureFailed
from runbook.inventory import load_inventory
from runbook.procedures.membership_etcd import (EtcdMember, add_steps, parse_member_list, precheck, remove_steps,
                                                replace_steps)
from runbook.procedures.membership_ops import with_operation

# etcd 3.5.16, three members and a learner that has not started yet (no name, no client URLs)
MEMBER_LIST = json.dumps({"header": {"cluster_id": 1, "member_id": 2, "raft_term": 4}, "members": [
    {"ID": 14911137398367526764, "name": "etcd01", "peerURLs": ["https://etcd01:2380"],
     "clientURLs": ["https://etcd01:2379"]},
    {"ID": 17352839930446099605, "name": "etcd02", "peerURLs": ["https://etcd02:2380"],
     "clientURLs": ["https://etcd02:2379"]},
    {"ID": 15887839412539039070, "name": "etcd03", "peerURLs": ["https://etcd03:2380"],
     "clientURLs": ["https://etcd03:2379"]},
    {"ID": 1234567, "peerURLs": ["https://etcd04:2380"], "isLearner": True}]})


def test_parse_member_list():
    ms = parse_member_list(MEMBER_LIST)
    assert [(m.id, m.name, m.learner) for m in ms] == [
        ("ceef007612bd1f6c", "etcd01", False), (format(17352839930446099605, "x"), "etcd02", False),
        (format(15887839412539039070, "x"), "etcd03", False), ("12d687", "", True)]
    assert ms[3].peer_urls == ("https://etcd04:2380",) and ms[3].client_urls == ()


def M(name, learner=False):
    return EtcdMember(name, name, (f"https://{name}:2380",), (f"https://{name}:2379",), learner)


THREE = [M("etcd01"), M("etcd02"), M("etcd03")]
HEALTHY = {"etcd01": True, "etcd02": True, "etcd03": True}


@pytest.mark.parametrize("members,health,add,remove,force,want", [
    (THREE, HEALTHY, "etcd04", None, False, "4 voting members, an even count"),
    (THREE, HEALTHY, "etcd04", None, True, None),
    (THREE, HEALTHY, None, "etcd03", False, "2 voting member(s): fewer than three"),
    (THREE, {**HEALTHY, "etcd01": False}, "etcd04", "etcd01", False, None),  # replace the dead one
    (THREE, {**HEALTHY, "etcd02": False}, "etcd04", "etcd01", False, "etcd02 is not healthy"),
    (THREE[1:], HEALTHY, "etcd04", "etcd01", False, None),  # resumed: etcd01 already removed
    (THREE[1:] + [M("etcd04")], {**HEALTHY, "etcd04": True}, "etcd04", "etcd01", False, None),  # resumed: done
    (THREE + [M("etcd05", learner=True)], HEALTHY, "etcd04", None, True, "one learner at a time"),
    (THREE + [M("etcd04"), M("etcd05")], {**HEALTHY, "etcd04": True, "etcd05": True}, None, "etcd05", False,
     "4 voting members"),
])
def test_precheck(members, health, add, remove, force, want):
    got = precheck(members, health, add=add, remove=remove, force=force)
    assert (want is None and got == []) or (want and any(want in p for p in got)), got


def swap(ctx, tmp_path):
    text = ctx.inventory.path.read_text().replace("  etcd01: {address: 192.168.60.141, roles: [etcd]}\n", "")
    text = text.replace("  node01:", "  etcd04: {address: 192.168.60.144, roles: [etcd]}\n  node01:")
    (tmp_path / "hosts.yml").write_text(text)
    ctx.inventory = load_inventory(tmp_path / "hosts.yml")
    return ctx


@pytest.fixture
def swapped(ctx, tmp_path):
    """The inventory after the edit an operator makes for a replace: etcd01 out, etcd04 in."""
    return swap(ctx, tmp_path)


def plan(ctx, steps):
    return [(s.name, [h.name for h in s.hosts(ctx, ctx.inventory.hosts)], bool(s.irreversible)) for s in steps]


def test_replace_plan(swapped):
    got = plan(swapped, replace_steps(swapped, "etcd01", "etcd04"))
    assert got == [
        ("etcd.remove.member", ["etcd02"], True),
        ("etcd.remove.pki", ["local"], False),
        ("bundle.verify", ["local"], False),
        ("bundle.push", ["etcd04"], False),
        ("etcd.names", ["etcd02", "etcd03", "etcd04", "node01", "node02"], False),
        ("etcd.binaries", ["etcd04"], False),
        ("etcd.user", ["etcd04"], False),
        ("etcd.pki", ["local"], False),
        ("etcd.tls", ["etcd04"], False),
        ("etcd.add.member", ["etcd02"], False),
        ("etcd.add.config", ["etcd04"], False),
        ("etcd.unit", ["etcd04"], False),
        ("etcd.add.start", ["etcd04"], False),
        ("etcd.add.promote", ["etcd02"], False),
        ("etcd.start", ["etcd04"], False),
        ("etcd.ectl", ["etcd04"], False),
        ("etcd.existing", ["etcd04"], False),
        ("etcd.config", ["etcd02", "etcd03", "etcd04"], False),
        ("etcd.ectl", ["etcd02", "etcd03", "etcd04"], False),
        ("patroni.config", ["node01", "node02"], False),
        ("patroni.validate", ["node01", "node02"], False)]


def test_joining_config_names_the_current_members(swapped):
    steps = {s.name: s for s in add_steps(swapped, "etcd04")}
    text = steps["etcd.add.config"].actions_fn(swapped, swapped.inventory.get("etcd04"))[0].content.decode()
    assert "initial-cluster-state: existing" in text
    assert ("initial-cluster: etcd02=https://etcd02:2380,etcd03=https://etcd03:2380,etcd04=https://etcd04:2380"
            in text)
    add = steps["etcd.add.member"].actions_fn(swapped, swapped.inventory.get("etcd02"))[0].cmd
    assert "member add etcd04 --learner --peer-urls=https://etcd04:2380" in add
    promote = steps["etcd.add.promote"].actions_fn(swapped, swapped.inventory.get("etcd02"))[0].cmd
    assert "member promote" in promote and "seq 60" in promote  # bounded retries


def test_remove_refuses_a_host_still_in_the_inventory(ctx):
    with pytest.raises(ProcedureFailed, match="etcd01 is still in .*take it out or mark it .retired: true. first"):
        remove_steps(ctx, "etcd01")


def test_operation_id_only_in_the_procedure_own_steps(swapped, bundle):
    """Reused install steps keep their fingerprint (cluster.up afterwards skips them); the procedure's own
    steps get the operation id (the next operation runs them again)."""
    steps = replace_steps(swapped, "etcd01", "etcd04")
    a, b = with_operation(steps, "op-a"), with_operation(steps, "op-b")
    h = swapped.inventory.get("etcd04")
    for s0, sa, sb in zip(steps, a, b, strict=True):
        if h not in s0.hosts(swapped, [h]) or s0.role == "local":
            continue
        fa, fb = (s.fingerprint(swapped, h, s.actions_fn(swapped, h)) for s in (sa, sb))
        own = "." in s0.section
        assert (fa != fb) == own, s0.name
        if not own:
            assert fa == s0.fingerprint(swapped, h, s0.actions_fn(swapped, h))


def test_membership_change_does_not_restart_old_members(ctx, tmp_path):
    """etcd.existing (the restart) does not depend on initial-cluster: a member added elsewhere leaves the
    old members' restart step as it was, while their config step re-renders."""
    from runbook.sections.etcd import config, existing

    def fps():
        h = ctx.inventory.get("etcd02")
        return [s.fingerprint(ctx, h, s.actions_fn(ctx, h)) for s in (existing, config)]

    before = fps()
    swap(ctx, tmp_path)
    after = fps()
    assert after[0] == before[0] and after[1] != before[1]
