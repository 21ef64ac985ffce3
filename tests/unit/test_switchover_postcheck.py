"""The switchover post-check on the fake transport: a local-commit write on the new leader (no object in a
user database), then the old leader's stream with its own bound, then a sync standby again (the new leader's
pg_stat_replication; with `settle`, until Patroni names it too)."""
from __future__ import annotations

import json

import pytest

from runbook.errors import ProcedureFailed
from runbook.procedures import switchover as so
from runbook.procedures.switchover import Bounds, committed_locally, do_switchover

FAST = Bounds(leader=1, writable=1, try_s=0.5, old_leader=1, sync=1, interval=0.05, stream_interval=0.05)


def member(name: str, role: str, state: str) -> dict:
    return {"Cluster": "patroni_cluster", "Member": f"patroni_{name}", "Host": name, "Role": role, "State": state,
            "TL": 2, "Receive Lag": 0, "Replay Lag": 0}


class Cluster:
    """patronictl list answers from a script of states: each call moves one state further (the last stays)."""

    def __init__(self, *states: list[dict]):
        self.states, self.i = list(states), 0

    def __call__(self, host, cmd):
        st = self.states[min(self.i, len(self.states) - 1)]
        self.i += 1
        return 0, json.dumps(st)


class Stream(Cluster):
    """The old leader's row of pg_stat_replication on the new leader, 'state|sync_state', from a script."""

    def __call__(self, host, cmd):
        assert host.name == "node02" and "application_name = " in cmd and "patroni_node01" in cmd, cmd
        st = self.states[min(self.i, len(self.states) - 1)]
        self.i += 1
        return 0, st


BEFORE = [member("node01", "Leader", "running"), member("node02", "Sync Standby", "streaming")]
SWITCHED = [member("node02", "Leader", "running"), member("node01", "Replica", "stopped")]
REJOINED = [member("node02", "Leader", "running"), member("node01", "Sync Standby", "streaming")]


@pytest.fixture
def fake(ctx):
    t = ctx.transport
    t.on(r"endpoint health", (0, json.dumps([{"endpoint": f"https://etcd0{i}:2379", "health": True}
                                             for i in (1, 2, 3)])))
    t.on(r"patronictl .* switchover", 0)
    t.on(r"pg_current_xact_id", (0, "f|7421\n"))
    return t


def test_committed_locally_reads_psql_output():
    assert committed_locally("f|7421\n")
    assert not committed_locally("t|7421\n")  # in recovery
    assert not committed_locally("")  # nothing answered
    assert not committed_locally("f|\n")  # no transaction id


def test_switchover_passes_while_the_old_leader_is_still_restarting(ctx, fake):
    fake.on(r"list -f json", Cluster(BEFORE, SWITCHED, SWITCHED, SWITCHED, REJOINED))
    fake.on(r"pg_stat_replication", Stream("", "", "startup|async", "streaming|sync"))
    res = do_switchover(ctx, None, FAST)
    assert (res["from"], res["to"]) == ("patroni_node01", "patroni_node02")
    assert res["writable_s"] <= res["old_leader_streaming_s"] <= res["sync_s"]
    writes = [c for c in fake.commands("node02") if "pg_current_xact_id" in c]
    assert writes and all("synchronous_commit TO local" in c for c in writes)  # never waits on the old leader
    sent = "\n".join(fake.commands())
    for ddl in ("CREATE", "INSERT", "runbook_verify"):  # nothing left in a user database
        assert ddl not in sent


def test_new_leader_still_in_recovery_fails_the_write_check(ctx, fake):
    fake.on(r"list -f json", Cluster(BEFORE, SWITCHED))
    fake.on(r"pg_current_xact_id", (1, ""))
    with pytest.raises(ProcedureFailed, match="did not commit a local write transaction within 1 s"):
        do_switchover(ctx, None, FAST)


def test_old_leader_not_streaming_is_its_own_failure(ctx, fake):
    fake.on(r"list -f json", Cluster(BEFORE, SWITCHED))
    fake.on(r"pg_stat_replication", Stream("", "startup|async"))
    with pytest.raises(ProcedureFailed) as e:
        do_switchover(ctx, None, FAST)
    msg = str(e.value)
    assert "succeeded (it leads and writes)" in msg and "patroni_node01 is not streaming after 1 s" in msg


def test_no_sync_standby_after_the_switchover(ctx, fake):
    rejoined_async = [member("node02", "Leader", "running"), member("node01", "Replica", "streaming")]
    fake.on(r"list -f json", Cluster(BEFORE, rejoined_async))
    fake.on(r"pg_stat_replication", Stream("streaming|async"))
    with pytest.raises(ProcedureFailed, match="no sync standby 1 s later"):
        do_switchover(ctx, None, FAST, settle=False)


def test_settle_waits_for_patroni_to_name_the_sync_standby(ctx, fake):
    """PostgreSQL waits for the old leader on commit (sync) but Patroni has not named it yet: without settle
    the switchover is done; with settle it waits for the name (a procedure's next step needs it)."""
    rejoined_unnamed = [member("node02", "Leader", "running"), member("node01", "Replica", "streaming")]
    fake.on(r"pg_stat_replication", Stream("streaming|sync"))
    fake.on(r"list -f json", Cluster(BEFORE, SWITCHED, rejoined_unnamed))
    res = do_switchover(ctx, None, FAST, settle=False)
    assert res["sync_s"] >= res["old_leader_streaming_s"]
    lists = Cluster(BEFORE, SWITCHED, rejoined_unnamed)
    fake.on(r"list -f json", lists)
    with pytest.raises(ProcedureFailed, match=r"no sync standby 1 s later \(Patroni names none\)"):
        do_switchover(ctx, None, FAST)
    fake.on(r"list -f json", Cluster(BEFORE, SWITCHED, rejoined_unnamed, rejoined_unnamed, REJOINED))
    assert do_switchover(ctx, None, FAST)["to"] == "patroni_node02"


def test_the_next_switchover_waits_until_patroni_names_the_sync_standby(ctx, fake):
    """Right after a switchover that did not settle, the replica streams but Patroni names no sync standby
    yet (and switches over only to one it names): the pre-checks wait for it, bounded, instead of refusing."""
    unnamed = [member("node01", "Leader", "running"), member("node02", "Replica", "streaming")]
    fake.on(r"pg_stat_replication", lambda h, c: (0, "streaming|sync"))
    fake.on(r"list -f json", Cluster(unnamed, unnamed, BEFORE, SWITCHED, REJOINED))
    assert do_switchover(ctx, None, FAST, settle=False)["to"] == "patroni_node02"
    fake.on(r"list -f json", Cluster(unnamed))  # never named within the bound: refused, clearly
    with pytest.raises(ProcedureFailed, match="no sync standby to switch over to"):
        do_switchover(ctx, None, FAST, settle=False)


def test_the_next_switchover_waits_while_patronis_record_of_the_old_leader_lags(ctx, fake):
    """Right after a switchover the old leader's PostgreSQL streams (the new leader's pg_stat_replication says
    so) while its own Patroni record still says "stopped" or "running" (rewritten on its next HA cycle): the
    pre-checks wait, bounded, for Patroni to name it. A replica that streams in neither view: refused at once."""
    lagging = [member("node01", "Leader", "running"), member("node02", "Replica", "stopped")]
    running = [member("node01", "Leader", "running"), member("node02", "Replica", "running")]
    asked = []

    def stream(host, cmd):
        asked.append(host.name)
        return 0, "streaming|sync"

    fake.on(r"pg_stat_replication", stream)
    lists = Cluster(lagging, running, BEFORE, SWITCHED, REJOINED)
    fake.on(r"list -f json", lists)
    assert do_switchover(ctx, None, FAST, settle=False)["to"] == "patroni_node02"
    assert asked[0] == "node01"  # asked on the leader of the moment
    fake.on(r"pg_stat_replication", (0, ""))  # no walsender for it: not streaming
    lists = Cluster(lagging)
    fake.on(r"list -f json", lists)
    with pytest.raises(ProcedureFailed, match="no sync standby to switch over to"):
        do_switchover(ctx, None, FAST, settle=False)
    assert lists.i == 1  # refused without waiting


def test_each_try_is_bounded_well_inside_its_wait(ctx, fake, monkeypatch):
    seen = []
    orig = fake.run

    def run(host, cmd, **kw):
        if "pg_current_xact_id" in cmd:
            seen.append(kw.get("timeout"))
        return orig(host, cmd, **kw)

    monkeypatch.setattr(fake, "run", run)
    fake.on(r"list -f json", Cluster(BEFORE, REJOINED))
    fake.on(r"pg_stat_replication", Stream("streaming|sync"))
    do_switchover(ctx, None)
    assert seen == [Bounds().try_s] and Bounds().try_s * 3 <= Bounds().writable
    assert so.WRITABLE_SQL.count("statement_timeout") == 1


def test_without_synchronous_mode_nothing_is_waited_for(ctx, fake, monkeypatch):
    inv = ctx.inventory
    patroni = inv.cluster.patroni.model_copy(update={"synchronous_mode": False})
    monkeypatch.setattr(ctx, "inventory", inv.model_copy(update={"cluster": inv.cluster.model_copy(
        update={"patroni": patroni})}))
    unnamed = [member("node01", "Leader", "running"), member("node02", "Replica", "streaming")]
    lists = Cluster(unnamed)
    fake.on(r"list -f json", lists)
    with pytest.raises(ProcedureFailed, match="no sync standby to switch over to"):
        do_switchover(ctx, None, FAST, settle=False)
    assert lists.i == 1  # asked once: no wait for a name Patroni never gives without synchronous_mode
