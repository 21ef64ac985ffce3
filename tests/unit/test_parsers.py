"""Parsers of etcdctl and patronictl JSON, on output captured from the lab (tests/data/captured)."""
from __future__ import annotations

from pathlib import Path

from runbook.cluster.readers import parse_endpoint_health, parse_endpoint_status, parse_members
from runbook.core.transport import parse_stat

DATA = Path(__file__).resolve().parents[1] / "data" / "captured"


def test_endpoint_status_three_members_one_leader():
    eps = parse_endpoint_status((DATA / "etcdctl-endpoint-status.json").read_text())
    assert [e.endpoint for e in eps] == ["https://etcd01:2379", "https://etcd02:2379", "https://etcd03:2379"]
    assert sum(e.leader for e in eps) == 1
    assert all(e.version.startswith("3.5.") and e.raft_term >= 1 and e.raft_index > 0 for e in eps)
    assert all(len(e.id) >= 8 and int(e.id, 16) for e in eps)
    assert all(e.db_size > 0 and e.errors == [] for e in eps)


def test_endpoint_status_empty_and_errors():
    assert parse_endpoint_status("") == []
    eps = parse_endpoint_status('[{"Endpoint":"https://e:2379","Status":{"header":{"member_id":10,"raft_term":2},'
                                '"version":"3.5.16","dbSize":1,"leader":11,"raftIndex":5,"errors":["NOSPACE"]}}]')
    assert eps[0].id == "a" and not eps[0].leader and eps[0].errors == ["NOSPACE"]


def test_endpoint_health():
    h = parse_endpoint_health((DATA / "etcdctl-endpoint-health.json").read_text())
    assert len(h) == 3 and all(ok for ok, _ in h.values())
    bad = parse_endpoint_health('[{"endpoint":"https://etcd03:2379","health":false,"error":"context deadline"}]')
    assert bad == {"https://etcd03:2379": (False, "context deadline")}


def test_patronictl_list_leader_and_sync_standby():
    ms = parse_members((DATA / "patronictl-list.json").read_text())
    assert [m.name for m in ms] == ["patroni_node01", "patroni_node02"]
    lead = [m for m in ms if m.is_leader]
    assert len(lead) == 1 and lead[0].timeline >= 1
    sync = [m for m in ms if m.role == "Sync Standby"]
    assert len(sync) == 1 and sync[0].streaming and sync[0].lag in (0, "0", 0.0)


def test_patronictl_list_member_down():
    ms = parse_members('[{"Cluster":"c","Member":"patroni_node02","Host":"node02","Role":"Replica",'
                       '"State":"stopped","TL":null,"Lag in MB":"unknown"}]')
    assert not ms[0].is_leader and not ms[0].streaming and ms[0].lag == "unknown"
    assert parse_members("[]") == []


def test_stat_parser():
    assert parse_stat("640 etcd etcd\nabc123\n") == ("0640", "etcd", "etcd", "abc123")
    assert parse_stat("missing\n") is None
    assert parse_stat("") is None
