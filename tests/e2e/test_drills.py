"""Drills and the audit on real hosts: a hard power-off of the leader and two switchovers, each under a
writer that must lose no acknowledged row; the security audit passes, catches a broken mode, and passes
again once the runbook repaired it.

The cluster: the session's (conftest `converged`), built from bare hosts by test_cluster or here.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import INV, REPO, SCALE, env, ledger

pytestmark = pytest.mark.e2e


def run(state: Path, inventory, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    p = subprocess.run([INV, *args], cwd=REPO, env=env(state, inventory.path), capture_output=True, text=True,
                       timeout=timeout * SCALE, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def drills(converged):
    """(inventory, state dir): the session's converged cluster (tests/e2e/conftest.py)."""
    return converged


def _result(inventory, state: Path, step: str) -> dict:
    with ledger(state, inventory.cluster.name) as db:
        row = db.execute("select action, rc from events where step = ? and kind = 'result' order by id desc limit 1",
                         (step,)).fetchone()
    assert row, f"no {step} result in the ledger"
    return {**json.loads(row[0]), "rc": row[1]}


def test_drills_refuse_hosts_that_are_not_lab_hosts(drills, tmp_path):
    inventory, _ = drills
    other = tmp_path / "hosts.yml"  # the same hosts seen from another directory: their lab record is not its
    other.write_text(inventory.path.read_text())
    from runbook.inventory import load_inventory

    p = run(tmp_path / "state", load_inventory(other), "drill.failover", check=False, timeout=60)
    assert p.returncode == 2 and "only runs against the lab" in p.stderr, p.stderr
    assert "belongs to another address or inventory" in p.stderr, p.stderr  # one lab dir, another inventory


def test_failover_drill_loses_nothing_and_the_old_leader_rejoins(drills):
    inventory, state = drills
    out = run(state, inventory, "drill.failover", "--write-wait", "5", timeout=600).stdout
    assert "✓ drill.failover" in out
    res = _result(inventory, state, "drill.failover")
    assert res["rc"] == 0 and res["lost"] == 0 and res["acknowledged"] == res["present"] > 0
    assert res["rejoined"] and res["new_leader"] != f"patroni_{res['killed']}"
    assert res["timelines"]["old_leader"] == res["timelines"]["leader"]
    assert res["writable_s"] is not None and res["promoted_s"] <= res["writable_s"]


def test_switchover_drill_twice_loses_nothing(drills):
    inventory, state = drills
    run(state, inventory, "drill.switchover", "--count", "2", timeout=600)
    res = _result(inventory, state, "drill.switchover")
    assert res["rc"] == 0 and res["lost"] == 0 and res["acknowledged"] == res["present"] > 0
    first, second = res["rounds"]
    assert (first["from"], first["to"]) == (second["to"], second["from"])
    assert all(r["writable_s"] <= r["old_leader_streaming_s"] for r in res["rounds"])


def test_audit_passes(drills):
    inventory, state = drills
    out = run(state, inventory, "cluster.audit", timeout=300).stdout
    assert "no findings" in out


def test_audit_finds_a_world_readable_config_then_the_runbook_repairs_it(drills):
    inventory, state = drills
    from runbook.core.transport import SshTransport

    node = inventory.postgres[0]
    t = SshTransport()
    try:
        assert t.run(node, "chmod 0644 /etc/patroni/config.yml").ok
        p = run(state, inventory, "cluster.audit", check=False, timeout=300)
        assert p.returncode == 1, p.stdout
        assert "/etc/patroni/config.yml is 0644 postgres, want 0600 postgres" in p.stdout, p.stdout
        assert "1 finding(s)" in p.stderr, p.stderr
        run(state, inventory, "patroni.install", "--hosts", node.name, "--verify", timeout=600)
        assert t.run(node, "stat -c '%a %U' /etc/patroni/config.yml").stdout.strip() == "600 postgres"
    finally:
        t.run(node, "chmod 0600 /etc/patroni/config.yml")
        t.close()
    assert "no findings" in run(state, inventory, "cluster.audit", timeout=300).stdout
