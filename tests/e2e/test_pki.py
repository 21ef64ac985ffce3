"""Certificates for the life of the cluster, on real hosts: `pki.status` shows every certificate in use and
that it is the recorded one; a short-lived certificate on a host is a `cluster.audit` finding until
`pki.rotate` replaces it; `pki.drill` rotates every leaf certificate under a writer: 0 acknowledged rows
lost, no service restarted, the longest write gap printed; `runbook.rollback` of a rotation step puts the
previous pair back and it is served again (`pki.rollback`).

The cluster: the session's (conftest `converged`). Host names come from the e2e inventory.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from helpers import inv, ledger

from runbook.credentials.pki import Pki

pytestmark = pytest.mark.e2e
# CI rotates the server certificates under the writer (the handshake proofs and Patroni's reload); `make soak`
# (RUNBOOK_SOAK=1) rotates every certificate of every purpose.
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"
SERVERS = ("etcd-server", "rest-server", "pg-server")
DRILL_ARGS = () if SOAK else ("--service", ",".join(SERVERS))


@pytest.fixture(scope="module")
def tr(converged):
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


def _status(state) -> dict:
    p = inv(state, "pki.status", "--json", check=False, timeout=300)
    assert p.returncode in (0, 1), p.stderr
    return json.loads(p.stdout)


def test_status_lists_every_certificate_as_recorded(converged):
    inventory, state = converged
    doc = _status(state)
    rows = doc["rows"]
    on_hosts = [r for r in rows if r["host"] != "local"]
    assert len(on_hosts) == len(inventory.etcd) * 5 + len(inventory.postgres) * 5, [r["path"] for r in on_hosts]
    assert all(r["matches"] for r in on_hosts), [r for r in on_hosts if not r["matches"]]
    assert doc["findings"] == []
    pg = next(r for r in rows if r["host"] == inventory.postgres[0].name and r["service"] == "pg-server")
    assert pg["subject"] == f"CN={inventory.postgres[0].name}" and inventory.postgres[0].address in pg["sans"]
    assert "localhost" not in pg["sans"] and pg["days_left"] > 30
    peer = next(r for r in rows if r["service"] == "etcd-peer")
    assert peer["issuer"] == "CN=pg-ha-runbook etcd peer CA"
    table = inv(state, "pki.status").stdout
    assert "pki.status" in table and "none expiring within 30 days" in table


def test_a_short_lived_certificate_is_an_audit_finding_until_rotated(converged, tr):
    inventory, state = converged
    node = inventory.postgres[-1]
    pki = Pki(state / "pki")
    lf = pki.leaf(node.name, "pg-server", [], [node.address], days=2, reissue=True)  # the record, 2 days
    tls = "/opt/patroni/.tls"
    for path, data, mode in ((f"{tls}/pg-server.crt", lf.cert_pem, "0644"), (f"{tls}/pg-server.key", lf.key_pem,
                                                                             "0600")):
        tr.put(node, path, data, mode=mode, owner="postgres")
    assert tr.run(node, "systemctl reload patroni", timeout=60).ok
    audit = inv(state, "cluster.audit", "--json", check=False, timeout=600)  # JSON: a table wraps its cells
    assert audit.returncode == 1, audit.stdout
    found = [f for ch in json.loads(audit.stdout)["checks"] if ch["host"] == node.name for f in ch["findings"]]
    assert any("pg-server certificate /opt/patroni/.tls/pg-server.crt expires on" in f and "(< 30)" in f
               and "pki.rotate" in f for f in found), found
    assert any(f["host"] == node.name and "in 1 day(s)" in f["finding"] for f in _status(state)["findings"])
    t0 = time.monotonic()
    rot = inv(state, "pki.rotate", "--hosts", node.name, "--service", "pg-server", timeout=600).stdout
    print(f"\npki.rotate {node.name}/pg-server: {time.monotonic() - t0:.1f} s")
    assert "✓ pki.rotate" in rot
    doc = _status(state)
    assert doc["findings"] == [], doc["findings"]
    row = next(r for r in doc["rows"] if r["host"] == node.name and r["service"] == "pg-server")
    assert row["days_left"] > 800 and row["matches"]
    assert inv(state, "cluster.audit", timeout=600).returncode == 0


def test_rotation_drill_under_a_writer_loses_nothing_and_restarts_nothing(converged):
    inventory, state = converged
    before = {r["path"] + r["host"]: r["sha256"] for r in _status(state)["rows"] if r["host"] != "local"}
    t0 = time.monotonic()
    out = inv(state, "pki.drill", *DRILL_ARGS, timeout=900).stdout
    took = time.monotonic() - t0
    with ledger(state, inventory.cluster.name) as db:
        row = db.execute("select action from events where step = 'pki.drill' and kind = 'result' "
                         "order by id desc limit 1").fetchone()
    res = json.loads(row[0])
    print(f"\npki.drill: {res['certificates']} certificates in {res['rotation_s']} s (task {took:.1f} s), "
          f"longest write gap {res['longest_write_gap_s']} s, {res['acknowledged']} acknowledged, "
          f"{res['lost']} lost, restarted: {res['restarted'] or 'none'}")
    assert "✓ pki.drill" in out
    assert res["lost"] == 0 and res["acknowledged"] > 20 and res["restarted"] == []
    per_host = {"etcd": 3, "postgres": 4} if SOAK else {"etcd": 1, "postgres": 2}
    assert res["certificates"] == (len(inventory.etcd) * per_host["etcd"]
                                   + len(inventory.postgres) * per_host["postgres"])
    doc = _status(state)
    after = {r["path"] + r["host"]: r["sha256"] for r in doc["rows"] if r["host"] != "local"}
    rotated = SERVERS if not SOAK else ("etcd-peer", "etcd-server", "etcd-root", "etcd-client", "rest-server",
                                        "rest-client", "pg-server")
    leaves = [k for k in after if k.split("/")[-1].split(".crt")[0] in rotated]
    assert all(after[k] != before[k] for k in leaves), [k for k in leaves if after[k] == before[k]]
    assert all(after[k] == before[k] for k in after if k not in leaves)  # the CAs and what was not selected
    assert doc["findings"] == []
    st = inv(state, "cluster.status").stdout
    assert "Leader" in st and "streaming" in st


def test_rollback_of_a_rotation_step_serves_the_previous_certificate_again(converged, tr):
    inventory, state = converged
    e = inventory.etcd[0]
    before = next(r for r in _status(state)["rows"] if r["host"] == e.name and r["service"] == "etcd-server")
    inv(state, "pki.rotate", "--hosts", e.name, "--service", "etcd-server", timeout=300)
    mid = next(r for r in _status(state)["rows"] if r["host"] == e.name and r["service"] == "etcd-server")
    assert mid["sha256"] != before["sha256"]
    out = inv(state, "pki.rollback", "--hosts", e.name, "--service", "etcd-server", timeout=300).stdout
    assert "rolled back pki.rotate.etcd-server" in " ".join(out.split())
    got = tr.run(e, "sha256sum < /etc/etcd/tls/etcd-server.crt | cut -c1-64", timeout=30).stdout.strip()
    assert got == before["sha256"]
    served = tr.run(e, f"timeout 5 openssl s_client -connect {e.address}:2379 </dev/null 2>/dev/null | "
                       "openssl x509 -outform DER | sha256sum | cut -c1-64", timeout=30).stdout.strip()
    der = tr.run(e, "openssl x509 -in /etc/etcd/tls/etcd-server.crt -outform DER | sha256sum | cut -c1-64",
                 timeout=30).stdout.strip()
    assert served == der  # a fresh handshake serves the restored certificate
    after = next(r for r in _status(state)["rows"] if r["host"] == e.name and r["service"] == "etcd-server")
    assert after["sha256"] == before["sha256"] and after["matches"]  # state/pki took the previous pair back too
    assert inv(state, "cluster.up", timeout=900).returncode == 0 and _status(state)["findings"] == []
