"""patroni.restart --pending: the order follows the changed settings (pure functions), the plan the members."""
from __future__ import annotations

import json

import pytest

from runbook.errors import ProcedureFailed
from runbook.procedures.pending_restart import PRIMARY_FIRST, REPLICAS_FIRST, as_number, parse_extended, \
    parse_reasons, plan, restart_order


@pytest.mark.parametrize("changes, order", [
    ([("max_connections", "100", "150")], REPLICAS_FIRST),  # raised: a standby needs at least the primary's
    ([("max_connections", "150", "100")], PRIMARY_FIRST),  # lowered: the primary first
    ([("max_locks_per_transaction", 64, 128), ("max_wal_senders", "5", "10")], REPLICAS_FIRST),
    ([("max_worker_processes", "8", "4"), ("shared_buffers", "512MB", "1GB")], PRIMARY_FIRST),
    ([("shared_buffers", "512MB", "256MB")], REPLICAS_FIRST),  # not standby-bound: a pure restart
    ([("wal_level", "replica", "logical")], REPLICAS_FIRST),
    ([], REPLICAS_FIRST),  # pending without a reason (e.g. a binary update): a pure restart
    ([("max_prepared_transactions", "0", "0")], REPLICAS_FIRST),
])
def test_restart_order(changes, order) -> None:
    assert restart_order(changes) == order


def test_raised_and_lowered_at_once_is_refused() -> None:
    with pytest.raises(ValueError, match="no order fits both.*two steps"):
        restart_order([("max_connections", "100", "200"), ("max_wal_senders", "10", "5")])


@pytest.mark.parametrize("text, value", [
    ("512MB", 512 * 1024**2), ("8kB", 8192), ("1GB", 1024**3), ("100", 100), (150, 150), ("1.5s", 1500),
    ("on", None), (True, None), ("12 parsecs", None)])
def test_as_number(text, value) -> None:
    assert as_number(text) == value


def test_parse_reasons() -> None:
    assert parse_reasons("max_connections: 100->150\nshared_buffers: 128MB->512MB\n") == [
        ("max_connections", "100", "150"), ("shared_buffers", "128MB", "512MB")]
    assert parse_reasons("") == []


def _list(*rows) -> list:
    return parse_extended(json.dumps([
        {"Member": n, "Role": r, "State": s, "Pending restart": "*" if reason is not None else "",
         "Pending restart reason": reason or ""} for n, r, s, reason in rows]))


def test_plan_raised_replicas_then_a_switchover() -> None:
    ms = _list(("p1", "Leader", "running", "max_connections: 100->150"),
               ("p2", "Sync Standby", "streaming", "max_connections: 100->150"),
               ("p3", "Replica", "streaming", "max_connections: 100->150"))
    p = plan(ms)
    assert p.order == REPLICAS_FIRST
    assert p.steps == (("restart", "p2"), ("restart", "p3"), ("switchover", "p1"))


def test_plan_lowered_primary_in_place_first() -> None:
    ms = _list(("p1", "Leader", "running", "max_connections: 150->100"),
               ("p2", "Sync Standby", "streaming", "max_connections: 150->100"))
    assert plan(ms).steps == (("restart", "p1"), ("restart", "p2"))


def test_plan_resumes_with_what_is_left() -> None:
    # the replicas were restarted before an interruption: only the switchover is left
    ms = _list(("p1", "Leader", "running", "max_connections: 100->150"), ("p2", "Sync Standby", "streaming", None))
    assert plan(ms).steps == (("switchover", "p1"),)
    # nobody pending: nothing to do
    assert plan(_list(("p1", "Leader", "running", None), ("p2", "Replica", "streaming", None))).steps == ()


def test_plan_no_replica_to_take_over_restarts_the_primary() -> None:
    ms = _list(("p1", "Leader", "running", "work_mem: 4MB->8MB"), ("p2", "Replica", "stopped", None))
    assert plan(ms).steps == (("restart", "p1"),)


def test_plan_refuses_mixed_directions() -> None:
    ms = _list(("p1", "Leader", "running", "max_connections: 100->150\nmax_wal_senders: 10->5"))
    with pytest.raises(ProcedureFailed, match="refused"):
        plan(ms)
