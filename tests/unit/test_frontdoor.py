"""The front door (cluster.vip): inventory roles, the rendered HAProxy / keepalived / PgBouncer configurations,
pg_hba, the SCRAM secret of the lookup role, the stats parser and the steps through the fake transport.
The configurations are also validated by the tools themselves on a lab host (haproxy -c, keepalived -t, a
PgBouncer login): tests/e2e/test_frontdoor.py."""
from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
from pathlib import Path

import pytest
import yaml

from runbook.cluster.context import Ctx
from runbook.cluster.render import pg_hba
from runbook.core.context import Options
from runbook.core.engine import apply
from runbook.core.ledger import Ledger
from runbook.core.testing import FakeTransport
from runbook.inventory import load_inventory
from runbook.sections import section_steps
from runbook.sections.balancer import RO, RW, haproxy_context, keepalived_context, rw_routes
from runbook.sections.frontdoor import parse_show_stat, router_id, scram_verifier, up
from runbook.sections.pooler import FUNCTION_SQL, pgbouncer_context, role_sql
from runbook.sections.units import template

ROOT = Path(__file__).resolve().parents[2]
CAPTURED = ROOT / "tests" / "data" / "captured"


def _inventory(tmp_path: Path, vip: str | None = "192.168.60.100", balancers: bool = False) -> Path:
    doc = yaml.safe_load((ROOT / "hosts.yml").read_text())
    if vip:
        doc["cluster"]["vip"] = vip
    if balancers:
        doc["hosts"]["lb01"] = {"address": "192.168.60.151", "roles": ["balancer"]}
        doc["hosts"]["lb02"] = {"address": "192.168.60.152", "roles": ["balancer"]}
    p = tmp_path / "hosts.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture
def fctx(tmp_path):
    inv = load_inventory(_inventory(tmp_path))
    c = Ctx(inventory=inv, transport=FakeTransport(), state_dir=tmp_path / "fstate", bundle_dir=tmp_path / "bundle",
            options=Options())
    c.local = c.transport
    c.ledger = Ledger(c.state_dir / "test.db", redact=c.redact)
    c.ledger.acquire("test", [])
    yield c
    c.ledger.release("ok")


# -- inventory -------------------------------------------------------------------------------------
def test_no_vip_no_front_door(tmp_path):
    inv = load_inventory(_inventory(tmp_path, vip=None))
    assert inv.balancers == [] and all("balancer" not in h.roles for h in inv.hosts)
    assert "local all all peer" in pg_hba(inv, "replicator")


def test_vip_without_balancer_hosts_puts_them_on_postgres(tmp_path):
    inv = load_inventory(_inventory(tmp_path))
    assert [h.name for h in inv.balancers] == ["node01", "node02"]
    assert inv.get("etcd01").roles == ("etcd",)
    c = inv.cluster
    assert (c.ports.rw, c.ports.ro, c.ports.pgbouncer, c.vip_prefix, c.vip_interface) == (5000, 5001, 6432, 24, "eth0")


def test_named_balancer_hosts_are_the_balancers(tmp_path):
    inv = load_inventory(_inventory(tmp_path, balancers=True))
    assert [h.name for h in inv.balancers] == ["lb01", "lb02"]
    assert inv.get("node01").roles == ("postgres",)


# -- pg_hba ----------------------------------------------------------------------------------------
def test_pg_hba_socket_asks_scram_of_all_but_the_superuser(fctx):
    hba = pg_hba(fctx.inventory, "replicator")
    assert hba[:2] == ["local all postgres peer", "local all all scram-sha-256"]
    assert "local all all peer" not in hba
    assert not [r for r in hba if r.split()[-1] in ("md5", "trust", "password")]


# -- PgBouncer -------------------------------------------------------------------------------------
def test_pgbouncer_ini(fctx):
    host = fctx.inventory.get("node01")
    text = template("pgbouncer/pgbouncer.ini.j2", "/x", pgbouncer_context(fctx, host)).content.decode()
    kv = dict(ln.split(" = ", 1) for ln in text.splitlines() if " = " in ln and not ln.startswith(";"))
    assert kv["pool_mode"] == "transaction"
    assert kv["auth_type"] == "scram-sha-256" and kv["auth_user"] == "pgbouncer_auth"
    assert kv["auth_query"] == "SELECT usename, passwd FROM pgbouncer.get_auth($1)"
    assert kv["client_tls_sslmode"] == "require"
    assert kv["client_tls_cert_file"] == "/opt/patroni/.tls/pgbouncer-server.crt"  # its own server certificate
    assert kv["client_tls_key_file"] == "/opt/patroni/.tls/pgbouncer-server.key"
    assert kv["listen_addr"] == "192.168.60.131,127.0.0.1" and kv["listen_port"] == "6432"
    assert kv["*"] == "host=/var/run/postgresql port=5432"  # the local socket
    assert "auth_file" in kv and "userlist" in kv["auth_file"]


def test_lookup_function_is_narrow():
    sql = FUNCTION_SQL
    assert "SECURITY DEFINER" in sql and "SET search_path = pg_catalog, pg_temp" in sql
    assert "NOT usesuper AND NOT userepl" in sql
    assert "REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC" in sql
    assert "GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth" in sql


def test_lookup_role_sql_carries_a_scram_secret_never_the_password(fctx):
    sql = role_sql(fctx).decode()
    pw = fctx.secrets["pooler"]["password"]
    assert pw not in sql and "PASSWORD 'SCRAM-SHA-256$4096:" in sql
    assert "NOSUPERUSER" in sql and "NOREPLICATION" in sql and "SET log_statement TO 'none'" in sql


def test_scram_verifier_matches_a_scram_client_proof():
    """A SCRAM-SHA-256 client (RFC 5802/7677) computes ClientKey from the password and the server's salt; the
    server checks H(ClientKey) == StoredKey: the verifier must satisfy that, and be stable."""
    v = scram_verifier("correct horse battery staple")
    assert v == scram_verifier("correct horse battery staple")
    head, keys = v.split("$", 1)[1].split("$")
    iterations, salt = head.split(":")
    stored, server = (base64.b64decode(k) for k in keys.split(":"))
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse battery staple", base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert hashlib.sha256(client_key).digest() == stored
    assert hmac.new(salted, b"Server Key", "sha256").digest() == server
    assert scram_verifier("another password") != v


# -- HAProxy ---------------------------------------------------------------------------------------
def _haproxy(fctx, name="node01") -> str:
    host = fctx.inventory.get(name)
    return template("haproxy/haproxy.cfg.j2", "/x", haproxy_context(fctx, host)).content.decode()


def _listener(text: str, name: str) -> list[str]:
    block = text.split(f"listen {name}\n", 1)[1].split("\nlisten ", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_haproxy_listeners(fctx):
    text = _haproxy(fctx)
    rw, ro = _listener(text, RW), _listener(text, RO)
    assert "bind *:5000" in rw and "bind *:5001" in ro
    assert "http-check send meth GET uri /primary" in rw
    assert "http-check send meth GET uri /replica?lag=1048576" in ro
    for block in (rw, ro):
        servers = [ln for ln in block if ln.startswith("server ")]
        assert [s.split()[1:3] for s in servers] == [["node01", "192.168.60.131:6432"],
                                                     ["node02", "192.168.60.132:6432"]]
        for s in servers:  # the health check: Patroni's REST API, TLS with a client certificate, verified
            assert "check port 8008 check-ssl verify required ca-file /etc/haproxy/tls/ca.crt" in s
            assert "crt /etc/haproxy/tls/client.pem" in s
        assert any("on-marked-down shutdown-sessions" in ln for ln in block)
    assert "stats socket /run/haproxy/admin.sock mode 600 level admin" in text


def test_show_stat_parser_and_routes():
    stats = parse_show_stat((CAPTURED / "haproxy-show-stat.csv").read_text())
    assert stats == {RW: {"node01": "UP", "node02": "DOWN"}, RO: {"node01": "DOWN", "node02": "UP 1/2"}}
    assert up(stats[RW]) == ["node01"] and up(stats[RO]) == ["node02"]
    assert parse_show_stat("") == {} and parse_show_stat("garbage\n") == {}


def test_rw_routes_counts_exactly_one_up():
    """The step's shell check on captured output: rc 0 with one read-write backend UP, 1 with two or none."""
    csv = (CAPTURED / "haproxy-show-stat.csv").read_text()
    script = rw_routes().split(" | ", 1)[1]
    run = lambda text: subprocess.run(["sh", "-c", script], input=text, text=True).returncode  # noqa: E731
    assert run(csv) == 0
    assert run(csv.replace("postgres_rw,node02,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN",
                           "postgres_rw,node02,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP")) == 1
    assert run(csv.replace("postgres_rw,node01,0,0,0,1,,3,500,600,,0,,0,0,0,0,UP",
                           "postgres_rw,node01,0,0,0,1,,3,500,600,,0,,0,0,0,0,DOWN")) == 1


# -- keepalived ------------------------------------------------------------------------------------
def test_keepalived_unicast_auth_nopreempt(fctx):
    texts = {}
    for name in ("node01", "node02"):
        c = keepalived_context(fctx, fctx.inventory.get(name), "Ab3_xY9z")
        texts[name] = template("keepalived/keepalived.conf.j2", "/x", c).content.decode()
    a, b = texts["node01"], texts["node02"]
    assert "unicast_src_ip 192.168.60.131" in a and "unicast_peer {\n        192.168.60.132\n    }" in a
    assert "unicast_src_ip 192.168.60.132" in b and "192.168.60.131\n    }" in b
    for t in (a, b):
        assert "state BACKUP" in t and "nopreempt" in t and "auth_type PASS" in t and "auth_pass Ab3_xY9z" in t
        assert "192.168.60.100/24 dev eth0" in t and "chk_haproxy" in t.split("track_script", 1)[1]
    vrid = [ln.split()[1] for t in (a, b) for ln in t.splitlines() if "virtual_router_id" in ln]
    assert vrid[0] == vrid[1] == str(router_id("patroni_cluster"))
    prio = [int(ln.split()[1]) for t in (a, b) for ln in t.splitlines() if ln.strip().startswith("priority")]
    assert prio[0] != prio[1]


def test_router_id_in_range_and_stable():
    ids = {router_id(f"cluster{i}") for i in range(300)}
    assert min(ids) >= 1 and max(ids) <= 255 and router_id("a") == router_id("a")


# -- the steps -------------------------------------------------------------------------------------
def test_front_door_steps_plan_only_with_a_vip(fctx, ctx, bundle):
    """With cluster.vip: PgBouncer on the postgres hosts, HAProxy/keepalived on the balancers; none without."""
    fctx.options.dry = ctx.options.dry = True
    steps = section_steps("pooler") + section_steps("balancer")
    assert apply(ctx, steps, ctx.inventory.hosts).plan == []  # the repo's hosts.yml names no vip
    fctx.bundle_dir = ctx.bundle_dir
    report = apply(fctx, steps, fctx.inventory.hosts)
    hosts_of: dict[str, set[str]] = {}
    for d in report.plan:
        hosts_of.setdefault(d.step.name, set()).add(d.host.name)
    assert hosts_of["pooler.config"] == {"node01", "node02"} and hosts_of["pooler.lookup"] == {"node01"}
    assert hosts_of["balancer.haproxy"] == {"node01", "node02"} and hosts_of["balancer.settled"] == {"node01"}
    assert fctx.transport.writes == []


def test_secrets_are_masked_in_the_plan(fctx, bundle):
    fctx.bundle_dir = bundle
    from runbook.core.export import export_markdown

    text = export_markdown(fctx, section_steps("pooler") + section_steps("balancer"))
    for key in ("pooler", "vrrp"):
        assert fctx.secrets[key]["password"] not in text


def test_front_door_files_end_with_newline_and_hold_only_their_own_secret(fctx):
    """Every front door file ends with a newline; only keepalived.conf (VRRP) and userlist.txt (lookup role)
    hold a password, each its own, and both are written 0600 as secrets."""
    from runbook.sections.balancer import keepalived, tls
    from runbook.sections.pooler import config

    host = fctx.inventory.get("node01")
    fctx.bundle_dir = Path("/nonexistent")
    puts = [a for step in (config, keepalived) for a in step.actions_fn(fctx, host) if hasattr(a, "content")]
    puts.append(template("haproxy/haproxy.cfg.j2", "/etc/haproxy/haproxy.cfg", haproxy_context(fctx, host)))
    values = {k: v["password"] for k, v in fctx.secrets.items()}
    for put in puts:
        text = put.content.decode()
        assert text.endswith("\n"), put.path
        holds = {k for k, v in values.items() if v in text}
        want = {"/etc/keepalived/keepalived.conf": {"vrrp"}, "/etc/pgbouncer/userlist.txt": {"pooler"}}
        assert holds == want.get(put.path, set()), put.path
        if holds:
            assert put.secret and put.mode == "0600"
    key = [a for a in tls.actions_fn(fctx, host) if getattr(a, "path", "").endswith(".key")]
    assert key and key[0].mode == "0600" and key[0].secret


def test_front_door_certificates_are_of_their_own_purpose(fctx, tmp_path):
    """HAProxy shows the REST API a client-only certificate (CN haproxy, its own key, client.pem + client.pem.key,
    0600 root); PgBouncer serves its own server-only certificate, put by postgres.tls beside Patroni's, and only
    when the front door is on."""
    from cryptography import x509

    from runbook.core.step import Put
    from runbook.credentials.certinfo import cert_cn, cert_eku
    from runbook.sections.balancer import tls
    from runbook.sections.postgres import tls as pg_tls

    host = fctx.inventory.get("node01")
    puts = {a.path: a for a in tls.actions_fn(fctx, host) if isinstance(a, Put)}
    assert set(puts) == {"/etc/haproxy/tls/ca.crt", "/etc/haproxy/tls/client.pem", "/etc/haproxy/tls/client.pem.key"}
    cert = x509.load_pem_x509_certificate(puts["/etc/haproxy/tls/client.pem"].content)
    assert cert_eku(cert) == {"client"} and cert_cn(cert) == "haproxy"
    key = puts["/etc/haproxy/tls/client.pem.key"]
    assert key.mode == "0600" and key.owner == "root" and key.secret
    pg = {a.path: a for a in pg_tls.actions_fn(fctx, host) if isinstance(a, Put)}
    bouncer = x509.load_pem_x509_certificate(pg["/opt/patroni/.tls/pgbouncer-server.crt"].content)
    assert cert_eku(bouncer) == {"server"} and cert_cn(bouncer) == "node01"
    assert pg["/opt/patroni/.tls/pgbouncer-server.key"].content != pg["/opt/patroni/.tls/pg-server.key"].content
    (tmp_path / "off").mkdir()
    off = Ctx(inventory=load_inventory(_inventory(tmp_path / "off", vip=None)), transport=FakeTransport(),
              state_dir=tmp_path / "off-state", bundle_dir=tmp_path / "bundle", options=Options())
    assert not [a for a in pg_tls.actions_fn(off, off.inventory.get("node01"))
                if "pgbouncer" in getattr(a, "path", "")]  # no front door: no PgBouncer certificate


# -- audit -----------------------------------------------------------------------------------------
def test_audit_checks_of_the_pooler():
    from runbook.procedures.audit_probes import plain_verdict
    from runbook.procedures.frontdoor_audit import check_lookup_role, check_pgbouncer_ini

    assert check_lookup_role("false|false|false|false|false\n") == []
    assert check_lookup_role("f|f|f|f|f") == []
    assert "holds more than LOGIN" in check_lookup_role("true|false|false|false|false")[0]
    assert "missing" in check_lookup_role("")[0]
    good = "[pgbouncer]\npool_mode = transaction\nclient_tls_sslmode = require\nauth_type = scram-sha-256\n" \
           "auth_query = SELECT usename, passwd FROM pgbouncer.get_auth($1)\n"
    assert check_pgbouncer_ini(good) == []
    bad = check_pgbouncer_ini(good.replace("transaction", "session").replace("require", "prefer")
                              .replace("auth_query", ";auth_query"))
    assert len(bad) == 3 and "pool_mode is session, want transaction" in bad
    assert plain_verdict("10.0.0.1:6432", "error:08P01:SSL required", "node02") == []  # PgBouncer's refusal
    assert plain_verdict("10.0.0.1:6432", "auth:10", "node02") != []


# -- drills ----------------------------------------------------------------------------------------
def test_frontdoor_writer_goes_to_the_vip_and_needs_one(fctx, ctx):
    from invoke.exceptions import Exit

    from runbook.tasks.procedures import _writer_dsn

    assert _writer_dsn(ctx, False) is None  # the hosts themselves (libpq multi-host)
    with pytest.raises(Exit) as exc:
        _writer_dsn(ctx, True)
    assert exc.value.code == 2 and "--frontdoor needs cluster.vip" in str(exc.value.message)
    dsn = dict(kv.split("=", 1) for kv in _writer_dsn(fctx, True).split())
    assert (dsn["host"], dsn["port"], dsn["sslmode"]) == ("192.168.60.100", "5000", "verify-ca")
    assert "target_session_attrs" not in dsn  # HAProxy chooses the primary


def _stats_socket(path: Path, csv: str, got: list[str]):
    """A stand-in for HAProxy's stats socket: answers `show stat` with *csv*, records every command."""
    import socket
    import threading

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(10)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            cmd = conn.recv(4096).decode().strip()
            got.append(cmd)
            conn.sendall(csv.encode() if cmd == "show stat" else b"\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_hold_stops_checks_only_where_the_server_is_up_and_release_turns_all_on(tmp_path):
    """The script a balancer runs around a Patroni restart, against a socket answering like HAProxy."""
    import shlex

    from runbook.sections import frontdoor as fd

    csv = ("# pxname,svname,qcur,status\n"
           f"{RW},FRONTEND,,OPEN\n{RW},node01,0,UP\n{RW},node02,0,DOWN\n{RW},BACKEND,0,UP\n"
           f"{RO},FRONTEND,,OPEN\n{RO},node01,0,DOWN\n{RO},node02,0,UP 1/2\n{RO},BACKEND,0,UP\n")
    got: list[str] = []
    sock = tmp_path / "admin.sock"
    srv = _stats_socket(sock, csv, got)
    try:
        def run(server: str, action: str) -> str:
            cmd = fd._hold_cmd(server, action).replace(fd.STATS_SOCKET, shlex.quote(str(sock)))
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30, check=True).stdout
        out = run("node01", "hold")
        assert [c for c in got if c != "show stat"] == [f"disable health {RW}/node01"], got
        assert f"{RW}/node01: UP, checks held" in out
        got.clear()
        run("node02", "hold")  # UP 1/2 (going down) still routes: held too
        assert [c for c in got if c != "show stat"] == [f"disable health {RO}/node02"], got
        got.clear()
        run("node01", "release")
        assert [c for c in got if c != "show stat"] == [f"enable health {RW}/node01", f"enable health {RO}/node01"]
    finally:
        srv.close()
    armed = fd.hold_shell("node01", 90)
    assert "systemd-run --quiet --collect --on-active=90" in armed and armed.endswith(fd._hold_cmd("node01", "release"))


def test_checks_are_held_only_with_the_front_door(tmp_path, fctx):
    from runbook.sections.frontdoor import checks_held

    hold, release = checks_held(fctx, fctx.inventory.postgres[0])
    assert len(hold) == len(release) == 1 and "unchecked" in hold[0].label and "enable health" in release[0].label
    plain = Ctx(inventory=load_inventory(_inventory(tmp_path, vip=None)), transport=FakeTransport(),
                state_dir=tmp_path, bundle_dir=tmp_path)
    assert checks_held(plain, plain.inventory.postgres[0]) == ([], [])
