"""Certificates for the life of the cluster, on real hosts: `pki.status` shows every certificate in use and
that it is the recorded one; a short-lived certificate on a host is a `cluster.audit` finding until the
runbook replaces it.

The cluster: the session's (conftest `converged`). Host names come from the e2e inventory.
"""
from __future__ import annotations

import json

import pytest
from helpers import inv

from runbook.credentials.pki import Pki

pytestmark = pytest.mark.e2e


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
    audit = inv(state, "cluster.audit", check=False, timeout=600)
    assert audit.returncode == 1, audit.stdout
    out = " ".join(audit.stdout.split())  # the table wraps long findings
    assert "pg-server certificate /opt/patroni/.tls/pg-server.crt expires on" in out and "(< 30)" in out, out
    assert "pki.rotate" in out
    assert any(f["host"] == node.name and "in 1 day(s)" in f["finding"] for f in _status(state)["findings"])
    # repaired by the runbook: cluster.up re-issues a certificate with fewer than 30 days left and puts it back
    inv(state, "cluster.up", timeout=900)
    doc = _status(state)
    assert doc["findings"] == [], doc["findings"]
    row = next(r for r in doc["rows"] if r["host"] == node.name and r["service"] == "pg-server")
    assert row["days_left"] > 800 and row["matches"]
    assert inv(state, "cluster.audit", timeout=600).returncode == 0
