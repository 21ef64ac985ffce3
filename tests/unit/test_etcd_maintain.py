"""etcd.maintain and cluster.audit's capacity checks: pure parts on output captured from the h4 lab (2026-11)
and constructed bad cases (a NOSPACE alarm cannot be provoked cheaply in the lab); the procedure wired on the
fake transport (order, refusal, dry run, disarm guard, snapshot file mode and hash)."""
from __future__ import annotations

import base64
import hashlib
import json
import stat

import pytest

from runbook.errors import ProcedureFailed
from runbook.procedures import audit_health as ah
from runbook.procedures import etcd_maintain as em

STATUS = ('[{"Endpoint":"https://etcd01:2379","Status":{"header":{"cluster_id":13306334954415920419,'
          '"member_id":6835713326001559419,"revision":30,"raft_term":7},"version":"3.5.16","dbSize":40960,'
          '"leader":6835713326001559419,"raftIndex":95,"raftTerm":7,"raftAppliedIndex":95,"dbSizeInUse":40960}},'
          '{"Endpoint":"https://etcd02:2379","Status":{"header":{"cluster_id":13306334954415920419,'
          '"member_id":4753697737816096084,"revision":30,"raft_term":7},"version":"3.5.16","dbSize":40960,'
          '"leader":6835713326001559419,"raftIndex":95,"raftTerm":7,"raftAppliedIndex":95,"dbSizeInUse":40960}},'
          '{"Endpoint":"https://etcd03:2379","Status":{"header":{"cluster_id":13306334954415920419,'
          '"member_id":13346551578697308901,"revision":30,"raft_term":7},"version":"3.5.16","dbSize":40960,'
          '"leader":6835713326001559419,"raftIndex":95,"raftTerm":7,"raftAppliedIndex":95,"dbSizeInUse":40960}}]')
HEALTHY = ('[{"endpoint":"https://etcd01:2379","health":true,"took":"22.2ms"},{"endpoint":"https://etcd02:2379",'
           '"health":true,"took":"22.1ms"},{"endpoint":"https://etcd03:2379","health":true,"took":"25.2ms"}]')
ONE_DOWN = HEALTHY.replace('"health":true,"took":"25.2ms"}',
                           '"health":false,"took":"5.0s","error":"context deadline exceeded"}')
NOSPACE_HEALTH = HEALTHY.replace('"health":true,"took":"22.2ms"}',
                                 '"health":false,"took":"22.2ms","error":"Active Alarm(s): NOSPACE "}')
ALARM = "memberID:6835713326001559419 alarm:NOSPACE\n"
SNAP_STATUS = '{"hash":2076516762,"revision":33,"totalKey":42,"totalSize":40960}'
CONF = 'auto-compaction-mode: periodic\nauto-compaction-retention: "1h"\nquota-backend-bytes: 2147483648\n'
SLOTS_REPLICA = "patroni_node01|f|0|reserved\n"  # the replica's copy of the leader's member slot (lab)


# -- audit: pure checks --------------------------------------------------------------------------
def test_slots_clean_and_inactive_retaining():
    assert ah.check_slots(SLOTS_REPLICA, "8GB\n") == []
    rows = "patroni_node02|t|900000000|reserved\nprod_replica1|f|52428800|extended\n"
    assert ah.check_slots(rows, "-1\n") == [
        "slot prod_replica1 is inactive and retains 50 MB of WAL (extended): start its consumer, or drop it "
        "(remove it from cluster.permanent_slots, or select pg_drop_replication_slot('prod_replica1'))",
        "max_slot_wal_keep_size is -1: a slot may retain WAL until the disk is full; set "
        "cluster.max_slot_wal_keep_size and run cluster.up"]


def test_etcd_alarms_each_member_its_own():
    assert ah.check_etcd_alarms("", "6835713326001559419") == []
    assert len(ah.check_etcd_alarms(ALARM, "6835713326001559419")) == 1
    assert ah.check_etcd_alarms(ALARM, "4753697737816096084") == []
    assert ah.member_id(STATUS) == "6835713326001559419"


def test_etcd_quota_and_compaction():
    assert ah.check_etcd_quota(STATUS, ah.quota_of(CONF)) == []
    big = STATUS.replace('"dbSize":40960', '"dbSize":1800000000', 1)
    assert ah.check_etcd_quota(big, 2 * 1024**3) == [
        "backend 1717 MB is 84% of its quota 2048 MB: defragment with `inv etcd.maintain` (and check that "
        "compaction runs)"]
    assert ah.quota_of("") == ah.ETCD_DEFAULT_QUOTA  # etcd's own default when the key is absent
    assert ah.check_etcd_quota("", 1) == ["etcd did not report its status (endpoint status)"]
    assert ah.check_etcd_compaction(CONF) == []
    for off in ("", "auto-compaction-retention: \"0\"\n", "auto-compaction-retention: 0\n"):
        assert ah.check_etcd_compaction(off), off


# -- etcd.maintain: pure parts -------------------------------------------------------------------
def test_status_sizes_leader_and_order():
    sizes, leader = em.parse_status_sizes(STATUS)
    assert leader == "https://etcd01:2379" and sizes["https://etcd02:2379"] == (40960, 40960)
    assert em.defrag_order(sorted(sizes), leader) == ["https://etcd02:2379", "https://etcd03:2379",
                                                       "https://etcd01:2379"]


def test_health_problems_alarm_is_not_a_refusal():
    eps = ["https://etcd01:2379", "https://etcd02:2379", "https://etcd03:2379"]
    from runbook.cluster.readers import parse_endpoint_health as p

    assert em.health_problems(p(HEALTHY), eps) == []
    assert em.health_problems(p(NOSPACE_HEALTH), eps) == []
    assert em.health_problems(p(ONE_DOWN), eps) == ["https://etcd03:2379: unhealthy (context deadline exceeded)"]
    assert em.health_problems(p(HEALTHY), eps + ["https://etcd04:2379"]) == ["https://etcd04:2379: no answer"]


def test_snapshot_status_and_disarm_guard():
    assert em.parse_snapshot_status(SNAP_STATUS)["revision"] == 33
    assert em.parse_snapshot_status("Error: invalid database") == {}
    assert em.parse_snapshot_status("") == {}
    sizes = {"https://etcd01:2379": (1800 * 1024**2, 10)}
    assert em.disarm_refusals([("1", "NOSPACE")], {"e": (10, 10)}, 2 * 1024**3) == []
    refusals = em.disarm_refusals([("1", "NOSPACE"), ("2", "CORRUPT")], sizes, 2 * 1024**3)
    assert [r.split(":")[0] for r in refusals] == ["member 2 raised CORRUPT", "https"]


# -- etcd.maintain on the fake transport ---------------------------------------------------------
SNAPSHOT = b"etcd-snapshot-bytes" * 100


def _answers(ctx, health: str = HEALTHY, alarms: str = "") -> None:
    t = ctx.transport
    t.on(r"", (0, ""))
    t.on(r"endpoint health -w json", (0 if health == HEALTHY else 1, health))
    t.on(r"endpoint status -w json", (0, STATUS))
    t.on(r"alarm list", (0, alarms))
    sha = hashlib.sha256(SNAPSHOT).hexdigest()
    t.on(r"snapshot save", (0, f"{SNAP_STATUS}\n{len(SNAPSHOT)}\n{sha}\n"))
    t.on(r"^base64 -w0", (0, base64.b64encode(SNAPSHOT).decode()))


def test_maintain_defrags_one_at_a_time_leader_last_and_saves_a_private_snapshot(ctx):
    _answers(ctx)
    res = em.Maintenance(ctx, health_wait=2).run()
    assert res["defragmented"] == ["etcd02", "etcd03", "etcd01"]
    cmds = ctx.transport.calls
    defrags = [i for i, (_, _, c) in enumerate(cmds) if c.endswith(" defrag")]
    assert [cmds[i][0] for i in defrags] == ["etcd02", "etcd03", "etcd01"]
    for a, b in zip(defrags, defrags[1:], strict=False):  # a health check of the cluster between two members
        assert any("endpoint health" in c for _, _, c in cmds[a:b])
    snap = res["snapshot"]
    path = ctx.state_dir / "etcd-snapshots" / snap["path"].rsplit("/", 1)[1]
    assert path.read_bytes() == SNAPSHOT and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert snap["revision"] == 33 and snap["from"] == "etcd02"
    assert any(c.startswith("rm -f ") and "runbook-snapshot-" in c for _, _, c in cmds)  # no copy left there
    kinds = [e["kind"] for e in ctx.ledger.events() if e["step"] == "etcd.maintain"]
    assert {"survey", "defrag", "health", "snapshot"} <= set(kinds)


def test_maintain_refuses_an_unhealthy_cluster_and_touches_nothing(ctx):
    _answers(ctx, health=ONE_DOWN)
    with pytest.raises(ProcedureFailed, match="etcd03:2379: unhealthy"):
        em.Maintenance(ctx).run()
    assert not [c for c in ctx.transport.commands() if "defrag" in c or "snapshot" in c]


def test_maintain_dry_changes_nothing(ctx):
    _answers(ctx, health=NOSPACE_HEALTH, alarms=ALARM)
    ctx.options.dry = True
    res = em.Maintenance(ctx, disarm=True).run()
    assert res["dry"] and res["alarms"] == ["6835713326001559419:NOSPACE"]
    assert not [c for c in ctx.transport.commands() if c.endswith((" defrag", "alarm disarm")) or "snapshot" in c]
    assert not (ctx.state_dir / "etcd-snapshots").exists()


def test_maintain_disarms_only_when_asked_and_under_quota(ctx):
    _answers(ctx, health=NOSPACE_HEALTH, alarms=ALARM)
    res = em.Maintenance(ctx, snapshot=False, health_wait=1).run()  # an alarm alone does not refuse
    assert len(res["defragmented"]) == 3 and not res["disarmed"]
    assert not [c for c in ctx.transport.commands() if c.endswith("alarm disarm")]
    res = em.Maintenance(ctx, disarm=True, snapshot=False, health_wait=1).run()
    assert res["disarmed"] and [c for c in ctx.transport.commands() if c.endswith("alarm disarm")]
    full = json.loads(STATUS)
    full[0]["Status"]["dbSize"] = 2 * 1024**3
    ctx.transport.on(r"endpoint status -w json", (0, json.dumps(full)))
    with pytest.raises(ProcedureFailed, match="alarms left armed"):
        em.Maintenance(ctx, disarm=True, snapshot=False, health_wait=1).run()


def test_maintain_refuses_a_snapshot_whose_hash_differs(ctx):
    _answers(ctx)
    ctx.transport.on(r"^base64 -w0", (0, base64.b64encode(b"damaged").decode()))
    with pytest.raises(ProcedureFailed, match="does not match its sha256"):
        em.Maintenance(ctx, health_wait=1).run()
    assert not list(ctx.state_dir.glob("etcd-snapshots/*.db"))
