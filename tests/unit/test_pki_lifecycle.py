"""pki.status rows and findings, and the plan of pki.rotate, on the fake transport (the lab proves them live)."""
from __future__ import annotations

import datetime as dt
import re

import pytest

from runbook.credentials import pki
from runbook.credentials.purposes import ETCD_SERVER, PG_SERVER
from runbook.errors import ProcedureFailed
from runbook.procedures import pki_rotate as rot
from runbook.procedures import pki_status as st
from runbook.sections.tls_files import host_purposes, sans


def _issue_all(ctx) -> None:
    for h in ctx.inventory.hosts:
        dns, ips = sans(ctx, h)
        for p in host_purposes(h):
            ctx.pki.leaf(h.name, p, dns, ips)


def _hosts_serve_the_record(ctx, override: dict | None = None) -> None:
    """Each host answers the read command with the files of state/pki (or *override*: path -> PEM)."""
    def answer(host, cmd):
        out = []
        for _svc, path, rec in st.host_files(ctx, host):
            pem = (override or {}).get((host.name, path), rec.read_text() if rec.exists() else "MISSING")
            out += [st.MARK + path, pem.rstrip("\n")]
        return 0, "\n".join(out) + "\n"
    ctx.transport.on(re.escape(st.MARK), answer)


def test_status_rows_match_the_record_and_have_no_finding(ctx):
    _issue_all(ctx)
    _hosts_serve_the_record(ctx)
    rows = st.collect(ctx)
    # 3 etcd hosts x (3 purposes + ca + peer-ca) + 2 postgres hosts x (4 purposes + ca) + the 2 local CAs
    assert len(rows) == 3 * 5 + 2 * 5 + 2
    assert all(r.matches for r in rows), [r for r in rows if not r.matches]
    pg = next(r for r in rows if r.host == "node01" and r.service == "pg-server")
    assert pg.subject == "CN=node01" and pg.sans == "node01, 192.168.60.131" and pg.issuer == "CN=pg-ha-runbook CA"
    assert 820 <= pg.days_left <= 825 and pg.path == "/opt/patroni/.tls/pg-server.crt"
    peer = next(r for r in rows if r.host == "etcd01" and r.service == "etcd-peer")
    assert peer.issuer == "CN=pg-ha-runbook etcd peer CA"
    assert st.findings(rows, 30) == []
    assert {"host", "service", "subject", "sans", "issuer", "not_after", "days_left", "sha256", "matches"} <= \
        set(pg.as_dict())


def test_status_findings_expiring_differing_missing_and_the_ca(ctx):
    _issue_all(ctx)
    short = ctx.pki.leaf("node02", PG_SERVER, *sans(ctx, ctx.inventory.get("node02")), days=3, reissue=True)
    other = pki.Pki(ctx.state_dir / "other").leaf("etcd01", ETCD_SERVER, [], ["192.168.60.141"])
    _hosts_serve_the_record(ctx, {("etcd01", "/etc/etcd/tls/etcd-server.crt"): other.cert_pem.decode(),
                                  ("node01", "/opt/patroni/.tls/rest-client.crt"): "MISSING"})
    rows = st.collect(ctx)
    found = st.findings(rows, 30)
    text = "\n".join(f"{h}: {f}" for h, f in found)
    assert re.search(r"node02: pg-server certificate /opt/patroni/.tls/pg-server.crt expires on .* in 2 day\(s\) "
                     r"\(< 30\); renew it with `inv pki.rotate`", text), text
    assert "etcd01: etcd-server certificate /etc/etcd/tls/etcd-server.crt differs from the record" in text
    assert "node01: rest-client certificate /opt/patroni/.tls/rest-client.crt: missing on the host" in text
    assert len(found) == 3, text
    assert short.cert_pem  # the record itself is the short one: the host matches it, only expiry is found
    # the CA's own expiry: a window longer than its life names it
    ca_found = [f for h, f in st.findings(rows, 4000) if h == "local"]
    assert any(f.startswith("ca certificate") and "a new CA" in f for f in ca_found), ca_found


def test_status_row_of_an_expired_and_a_garbage_certificate(tmp_path):
    p = pki.Pki(tmp_path)
    lf = p.leaf("node01", PG_SERVER, [], ["192.168.60.131"], days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    r = st.row_of("node01", "pg-server", "/x.crt", lf.cert_pem.decode(), lf.cert_path, now=later)
    assert r.seconds_left < 0 and "expired on" in st.findings([r], 30)[0][1]
    bad = st.row_of("node01", "pg-server", "/x.crt", "garbage", lf.cert_path)
    assert bad.problem.startswith("not a PEM certificate")


def test_rotate_selection_and_refusals(ctx):
    pairs = rot.selection(ctx, None, None)
    assert len(pairs) == 3 * 3 + 2 * 4
    only = rot.selection(ctx, "node01,etcd02", "pg-server,etcd-peer")
    assert [(h.name, p.name) for h, p in only] == [("etcd02", "etcd-peer"), ("node01", "pg-server")]
    with pytest.raises(ProcedureFailed, match="unknown purpose.*nope"):
        rot.selection(ctx, None, "nope")
    with pytest.raises(ProcedureFailed, match="nothing to rotate"):
        rot.selection(ctx, "etcd01", "pg-server")


def test_rotate_steps_issue_once_then_roll_out_with_proof_and_a_masked_key(ctx):
    _issue_all(ctx)
    pairs = rot.selection(ctx, "node01,node02", "pg-server,rest-client")
    steps = rot.rotate_steps(ctx, pairs, "op-1")
    assert [s.name for s in steps] == ["pki.rotate.issue", "pki.rotate.rest-client", "pki.rotate.pg-server"]
    before = ctx.pki.leaf("node01", "pg-server", *sans(ctx, ctx.inventory.get("node01")))
    steps[0].actions_fn(ctx, None)[0].fn()
    after = ctx.pki.leaf("node01", "pg-server", *sans(ctx, ctx.inventory.get("node01")))
    assert after.key_pem != before.key_pem and after.cert_pem != before.cert_pem
    assert (ctx.pki_dir / "node01" / "pg-server.key.prev").read_bytes() == before.key_pem
    assert oct((ctx.pki_dir / "node01" / "pg-server.key.prev").stat().st_mode & 0o777) == "0o600"
    assert steps[0].check_fn(ctx, None) is True
    steps[0].actions_fn(ctx, None)[0].fn()  # a resumed run: issues nothing again
    assert ctx.pki.leaf("node01", "pg-server", *sans(ctx, ctx.inventory.get("node01"))) == after
    acts = steps[2].actions_fn(ctx, ctx.inventory.get("node01"))
    assert "cp -a /opt/patroni/.tls/pg-server.crt /opt/patroni/.tls/pg-server.crt.prev" in acts[0].cmd
    assert acts[1].stdin == after.cert_pem and acts[2].stdin == after.key_pem
    assert "PRIVATE KEY" not in acts[2].shell(lambda t: t) and "pg-server.key" in acts[2].describe()
    assert "systemctl reload patroni" in acts[3].cmd and "5432:postgres" in acts[3].cmd
    client = steps[1].actions_fn(ctx, ctx.inventory.get("node01"))[-1].cmd
    assert "https://node01:8008/patroni" in client and "rest-client.crt" in client
    undo = steps[2].undo_fn(ctx, ctx.inventory.get("node01"))
    assert "mv -f /opt/patroni/.tls/pg-server.crt.prev /opt/patroni/.tls/pg-server.crt" in undo[0].cmd
    assert "systemctl reload patroni" in undo[1].cmd
    assert steps[2].undo_actions(ctx, ctx.inventory.get("node01")) == undo  # no derived undo deletes the file
    assert after.cert_path.name in steps[2].check_fn(ctx, ctx.inventory.get("node01"))


def test_rotate_orders_the_leader_last(ctx):
    ctx.transport.on(r"(?s)python3 -I -S -c .* /cluster$",  # the REST API's GET /cluster (readers.leader)
                     (0, '{"members": [{"name": "patroni_node01", "host": "node01", "role": "leader", '
                         '"state": "running"}, {"name": "patroni_node02", "host": "node02", '
                         '"role": "sync_standby", "state": "streaming"}]}'))
    pg = ctx.inventory.postgres
    assert [h.name for h in rot.leader_last(ctx, pg)] == ["node02", "node01"]


def test_rotate_run_on_the_fake_hosts_records_one_operation(ctx):
    _issue_all(ctx)
    pairs = rot.selection(ctx, "etcd01", "etcd-server")
    report, op_id, resumed = rot.run_rotation(ctx, pairs)
    assert not resumed and ("etcd01", "pki.rotate.etcd-server") in report.executed
    rec = ctx.ledger.get("local", "membership:pki-rotate:etcd01/etcd-server")
    assert rec.status == "done" and rec.note == op_id
    sent = [c for c in ctx.transport.commands("etcd01") if "etcd-server.crt" in c]
    assert any("openssl s_client" in c and "2379" in c for c in sent)
    _, op2, _ = rot.run_rotation(ctx, pairs)
    assert op2 != op_id  # a finished rotation: the next one is a new operation


def test_a_registered_purpose_with_its_own_directory_is_listed_and_rotatable(ctx):
    from runbook.credentials import purposes

    p = purposes.register(purposes.Purpose("test-balancer-client", "postgres", (purposes.CLIENT,), "postgres",
                                           cn="haproxy", tls_dir="/etc/haproxy/tls"))
    try:
        files = st.host_files(ctx, ctx.inventory.get("node01"))
        assert ("test-balancer-client", "/etc/haproxy/tls/test-balancer-client.crt",
                ctx.pki_dir / "node01" / "test-balancer-client.crt") in files
        assert ("ca", "/etc/haproxy/tls/ca.crt", ctx.pki_dir / "ca.crt") in files
        assert (ctx.inventory.get("node01"), p) in rot.selection(ctx, "node01", "test-balancer-client")
    finally:
        purposes.PURPOSES.pop("test-balancer-client", None)


def test_haproxy_client_rotation_is_proven_by_its_checks_passing_not_by_haproxy_running(ctx):
    """HAProxy shows its client pair to the REST APIs only in its health checks: after the reload the proof
    waits past `fall` and then wants the read-write listener's one backend UP (a refused pair: all DOWN)."""
    from runbook.credentials.purposes import HAPROXY_CLIENT
    from runbook.sections.balancer import RW, rw_routes

    proof = rot._proof(ctx, ctx.inventory.postgres[0], HAPROXY_CLIENT, "/etc/haproxy/tls/client.pem",
                       "/etc/haproxy/tls/client.pem.key")
    reload, _, rest = proof.partition(" && sleep 3 && ")
    assert reload == "systemctl reload-or-restart haproxy" and rw_routes() in rest and RW in rest
