"""The read-only views on the lab's converged cluster: --json documents, log-readable tables off a terminal,
and a dry run / export against real hosts on a fresh state dir that leaves nothing behind."""
from __future__ import annotations

import json
import subprocess

import pytest
from helpers import INV, REPO, SCALE, env, inv

pytestmark = pytest.mark.e2e


def test_status_json(converged):
    inventory, state = converged
    doc = json.loads(inv(state, "cluster.status", "--json").stdout)
    assert doc["cluster"] == inventory.cluster.name and doc["error"] is None
    eps = doc["etcd"]["endpoints"]
    assert len(eps) == len(inventory.etcd) and sum(e["leader"] for e in eps) == 1, eps
    assert doc["etcd"]["unreachable"] == []
    assert len(doc["members"]) == len(inventory.postgres) and sum(m["leader"] for m in doc["members"]) == 1
    assert all(m["leader"] or m["streaming"] for m in doc["members"]), doc["members"]
    again = json.loads(inv(state, "etcd.status", "--json").stdout)["endpoints"]  # raft index moves: compare ids
    assert [(e["endpoint"], e["id"]) for e in again] == [(e["endpoint"], e["id"]) for e in eps]
    ledger = json.loads(inv(state, "runbook.status", "--json").stdout)
    install = [r for r in ledger["checkpoints"] if r["step"] in ledger["steps"]]
    assert install and all(r["status"] in ("done", "manual") for r in install), install
    # a day-2 procedure's step may stand rolled back (test_pki's pki.rollback), never running or failed
    assert all(r["status"] in ("done", "manual", "rolled_back") for r in ledger["checkpoints"]), \
        [r for r in ledger["checkpoints"] if r["status"] not in ("done", "manual", "rolled_back")]


def test_tables_in_a_log_keep_their_cells(converged):
    """Piped (not a TTY) with no COLUMNS: the etcd table is not cut to 80 columns ("endpoi…")."""
    inventory, state = converged
    e = env(state)
    e.pop("COLUMNS", None)
    p = subprocess.run([INV, "etcd.status"], cwd=REPO, env=e, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120 * SCALE)
    assert p.returncode == 0, p.stderr
    doc = json.loads(inv(state, "etcd.status", "--json").stdout)
    assert "endpoint" in p.stdout and "…" not in p.stdout, p.stdout
    assert all(ep["id"] in p.stdout and ep["endpoint"] in p.stdout for ep in doc["endpoints"]), p.stdout


def test_dry_run_and_export_on_a_fresh_state_dir_create_nothing(converged, tmp_path):
    fresh = tmp_path / "state"
    p = inv(fresh, "cluster.up", "--dry", check=False, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "will run" in p.stdout
    inv(fresh, "runbook.export", "--output", str(tmp_path / "RUNBOOK.md"))
    assert (tmp_path / "RUNBOOK.md").stat().st_size > 1000
    assert not fresh.exists(), sorted(fresh.rglob("*"))
