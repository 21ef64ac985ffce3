"""cluster.audit's pure checks on captured lab output (a-* lab, 2026-11) and constructed bad cases;
run_audit wired on the fake transport; the drill's pure figures (write gaps, rewind verdict)."""
from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest

from runbook.errors import ProcedureFailed
from runbook.procedures import audit as a
from runbook.procedures.drill import Writer, rewind_verdict

ETCD_STAT = "/etc/etcd/tls|750|etcd\n/etc/etcd/tls/a-etcd01.key|600|etcd\n"
PATRONI_STAT = ("/opt/patroni/.tls|750|postgres\n/opt/patroni/.tls/a-node01.key|600|postgres\n"
                "/etc/patroni/config.yml|600|postgres\n")
# pg_hba_file_rules of the runbook's own pg_hba (h12 lab, 2026-11-30): line|type|db|user|address|netmask|method|error
HBA = """1|local|all|all|||peer|
2|hostnossl|all|all|0.0.0.0|0.0.0.0|reject|
3|hostnossl|replication|all|0.0.0.0|0.0.0.0|reject|
4|hostssl|replication|replicator|127.0.0.1|255.255.255.255|scram-sha-256|
5|hostssl|replication|replicator|192.168.63.131|255.255.255.255|scram-sha-256|
6|hostssl|replication|replicator|192.168.63.132|255.255.255.255|scram-sha-256|
7|hostssl|all|postgres|127.0.0.1|255.255.255.255|scram-sha-256|
8|hostssl|all|postgres|192.168.63.131|255.255.255.255|scram-sha-256|
9|hostssl|all|postgres|192.168.63.132|255.255.255.255|scram-sha-256|
10|hostssl|all|postgres|0.0.0.0|0.0.0.0|reject|
11|hostssl|all|all|127.0.0.1|255.255.255.255|scram-sha-256|
12|hostssl|all|all|192.168.63.0|255.255.255.0|scram-sha-256|
"""
LOG_SCAN_OK = ("journal (patroni, etcd)|0\n/data/log/patroni/patroni.log|0\n"
               "/data/log/postgresql-2026-11-26.log|0\n")
ETCD_RULES = [a.Rule("/etc/etcd/tls", "0750", "etcd"), a.Rule("/etc/etcd/tls/*.key", "0600", "etcd")]
SECRETS = {"admin": {"username": "admin", "password": "A" * 32}, "restapi": {"username": "patroni",
                                                                            "password": "B" * 32}}


# -- modes ---------------------------------------------------------------------------------------
def test_modes_captured_ok():
    assert a.check_modes(ETCD_STAT, ETCD_RULES) == []


def test_modes_wrong_mode_owner_and_missing():
    out = ("/etc/etcd/tls|755|root\n/etc/etcd/tls/a-etcd01.key|644|etcd\n/etc/etcd/tls/old.key|600|root\n")
    assert a.check_modes(out, ETCD_RULES) == [
        "/etc/etcd/tls is 0755 root, want 0750 etcd",
        "/etc/etcd/tls/a-etcd01.key is 0644 etcd, want 0600 etcd",
        "/etc/etcd/tls/old.key is 0600 root, want 0600 etcd"]
    missing = "stat: cannot statx '/etc/etcd/tls/*.key': No such file or directory\n/etc/etcd/tls|750|etcd\n"
    assert a.check_modes(missing, ETCD_RULES) == ["/etc/etcd/tls/*.key: missing"]


def test_patroni_rules_on_captured_stat(ctx):
    assert a.check_modes(PATRONI_STAT, a.patroni_rules(ctx)) == []
    bad = PATRONI_STAT.replace("config.yml|600", "config.yml|644")
    assert a.check_modes(bad, a.patroni_rules(ctx)) == ["/etc/patroni/config.yml is 0644 postgres, want 0600 postgres"]


def test_local_mode(tmp_path):
    f = tmp_path / "secrets.yml"
    assert a.check_local_mode(f, None) == [f"{f}: missing"]
    assert a.check_local_mode(f, 0o100600) == []
    assert a.check_local_mode(f, 0o100644) == [f"{f} is 0644, want 0600"]


# -- TLS -----------------------------------------------------------------------------------------
def test_etcd_tls():
    assert a.check_etcd_tls(0, 1, 1) == []
    assert a.check_etcd_tls(0, 0, 1) == ["plain http on the client port was accepted"]
    assert a.check_etcd_tls(0, 1, 0) == ["a TLS client without a certificate was accepted (client-cert-auth off)"]
    assert "prove nothing" in a.check_etcd_tls(1, 1, 1)[0]  # etcd down: the refusals mean nothing


def test_parse_refusals():
    assert a.parse_refusals("plain=1 nocert=1\n") == (1, 1)
    assert a.parse_refusals("noise\nplain=0 nocert=124\n") == (0, 124)
    for bad in ("", "plain=1\n", "plain= nocert=1\n", "plain=1 nocert=x\n"):
        assert a.parse_refusals(bad) is None, bad


def test_etcd_config_client_cert_auth():
    assert a.check_etcd_config("2\n") == []
    assert a.check_etcd_config("1\n") == ["client-cert-auth: true on 1 of 2 transports (client, peer)"]
    assert a.check_etcd_config("") != []


def test_verify_client():
    assert a.check_verify_client("   verify_client: required\n") == []
    assert a.check_verify_client("  verify_client: optional\n") == [
        "restapi verify_client is optional, want required"]
    assert a.check_verify_client("") == ["restapi verify_client is not set, want required"]


def test_rest_probe():
    assert a.check_rest_probe("cert_no_auth=401\nno_cert=refused:URLError\n") == []  # captured
    assert a.check_rest_probe("cert_no_auth=400\nno_cert=refused:SSLError\n") == [
        "POST without basic auth answered 400, want 401"]
    assert a.check_rest_probe("cert_no_auth=401\nno_cert=401\n") == [
        "a client without a certificate got 401, want a TLS refusal"]
    assert len(a.check_rest_probe("")) == 2


def test_ssl_on():
    assert a.check_ssl("on\n") == []
    assert a.check_ssl("off\n") == ["ssl is off, want on"]


def test_pg_hba_captured_ok():
    assert a.check_pg_hba(HBA) == []


def test_pg_hba_bad_methods_no_reject_and_errors():
    bad = ("3|local|all|all|||trust|\n11|host|all|all|0.0.0.0|0.0.0.0|md5|\n"
           "12|hostssl|all|all|10.0.0.0|255.0.0.0|password|\n"
           "13|hostssl|all|all|10.0.0.0||scram-sha-256|invalid IP address\n")
    assert a.check_pg_hba(bad) == [
        "pg_hba line 3: `local all all trust` uses trust (want scram-sha-256; peer on the socket)",
        "pg_hba line 11: `host all all 0.0.0.0/0 md5` uses md5 (want scram-sha-256; peer on the socket)",
        "pg_hba line 11: `host all all 0.0.0.0/0 md5` accepts connections without TLS (want hostssl, or reject)",
        "pg_hba line 12: `hostssl all all 10.0.0.0/8 password` uses password (want scram-sha-256; peer on the socket)",
        "pg_hba line 13: invalid IP address", "pg_hba has no hostnossl ... reject rule"]


def test_unit_user():
    assert a.check_unit_user("User=etcd\n", "etcd") == []
    assert a.check_unit_user("User=\n", "etcd") == ["unit runs as root (User= empty), want etcd"]
    assert a.check_unit_user("User=root\n", "postgres") == ["unit runs as root, want postgres"]


# -- secrets -------------------------------------------------------------------------------------
def test_find_secrets_names_roles_never_values():
    token = base64.b64encode(f"patroni:{'B' * 32}".encode()).decode()
    assert a.find_secrets("INSERT INTO events VALUES ('ok')", SECRETS) == []
    assert a.find_secrets(f"x {'A' * 32} y", SECRETS) == ["admin"]
    assert a.find_secrets(f"Authorization: Basic {token}", SECRETS) == ["restapi"]


def test_log_scan():
    assert a.check_log_scan(LOG_SCAN_OK) == []
    assert a.check_log_scan(LOG_SCAN_OK + "/data/log/leak-probe.log|1\n") == [
        "/data/log/leak-probe.log: 1 line(s) hold a secret"]
    assert a.check_log_scan("") == ["the log scan returned nothing"]


def test_log_scan_command_keeps_secrets_off_argv():
    assert "$(cat)" in a.LOG_SCAN and "-f /dev/fd/3" in a.LOG_SCAN  # patterns come on stdin only


# -- run_audit on the fake transport -------------------------------------------------------------
def _lab_answers(ctx, bad_mode: bool = False) -> None:
    t = ctx.transport
    t.on(r"", (0, ""))

    def stat(host, cmd):
        if "/etc/etcd/tls" in cmd:
            return 0, ("/etc/etcd/tls|750|etcd\n/etc/etcd/tls/etcd-peer.key|600|etcd\n"
                       "/etc/etcd/tls/etcd-server.key|600|etcd\n/etc/etcd/tls/etcd-root.key|600|root\n")
        out = PATRONI_STAT.replace("a-node01", host.name)
        return 0, out.replace("config.yml|600", "config.yml|644") if bad_mode and host.name == "node01" else out

    t.on(r"^stat -c", stat)
    t.on(r"etcdctl .*get /runbook-audit-probe", 1)
    t.on(r'echo "plain=\$\? nocert=\$n"', (0, "plain=1 nocert=1\n"))  # both refusal probes refused
    t.on(r"etcdctl --cacert=\S+ --cert=", (0, ""))
    t.on(r"grep -c '\^ \*client-cert-auth", (0, "2\n"))
    t.on(r"systemctl show -p User etcd", (0, "User=etcd\n"))
    t.on(r"systemctl show -p User patroni", (0, "User=postgres\n"))
    t.on(r"verify_client", (0, "  verify_client: required\n"))
    t.on(r"bin/python -", (0, "cert_no_auth=401\nno_cert=refused:URLError\n"))
    t.on(r"pg_hba_file_rules", (0, HBA))
    t.on(r"bin/python - runbook_audit_probe", lambda h, cmd: (0, "".join(
        f"{x}|error:28000:pg_hba.conf rejects connection for host, no encryption\n" for x in cmd.split()[3:])))
    t.on(r"show ssl", (0, "on\n"))
    t.on(r"^p=\$\(cat\)", (0, LOG_SCAN_OK))
    t.on(r"endpoint status -w json", (0, '[{"Endpoint":"https://etcd01:2379","Status":{"header":{"member_id":7},'
                                         '"dbSize":40960,"leader":7,"dbSizeInUse":40960}}]'))
    t.on(r"alarm list", (0, ""))
    t.on(r"quota-backend-bytes\|auto-compaction", (0, 'auto-compaction-mode: periodic\n'
                                                      'auto-compaction-retention: "1h"\n'
                                                      'quota-backend-bytes: 2147483648\n'))
    t.on(r"from pg_replication_slots", (0, "patroni_node02|t|0|reserved\n"))
    t.on(r"show max_slot_wal_keep_size", (0, "8GB\n"))
    t.on(r"SYSLOG_IDENTIFIER=sudo", (0, "scanned|40|12\n"))
    from test_pki_lifecycle import _hosts_serve_the_record

    _hosts_serve_the_record(ctx)
    from runbook.procedures import audit_purposes as ap

    t.on(r"refuses a PostgreSQL server certificate", lambda h, c: (0, "".join(
        f"{what}|refused:SSLError tlsv13 alert certificate required\n" for what, *_ in ap.probes(ctx, h))))


def _state(ctx) -> None:
    from runbook.core.ledger import Ledger

    from test_pki_lifecycle import _issue_all

    assert ctx.secrets["admin"]["password"]  # generates state/secrets.yml (0600)
    _issue_all(ctx)  # the CAs and every host's certificates, as the hosts hold them (_lab_answers)
    Ledger(ctx.state_dir / f"{ctx.inventory.cluster.name}.db").db.conn.close()


def test_run_audit_clean_on_fake_hosts(ctx):
    _state(ctx)
    _lab_answers(ctx)
    checks = a.run_audit(ctx)
    assert [(c.host, c.name, c.problems) for c in checks if c.problems] == []
    assert {c.host for c in checks} == {"local", "etcd01", "etcd02", "etcd03", "node01", "node02"}
    # local (+ backups), security + capacity per host, the certificates of each host and the local CAs, and
    # the three wrong-purpose probes
    assert len(checks) == 3 + 3 * (6 + 3) + 2 * (10 + 1) + 6 + 3
    # audited side by side, listed as one after the other: local, then each host in the inventory's order
    order = list(dict.fromkeys(c.host for c in checks))
    assert order[:6] == ["local", "etcd01", "etcd02", "etcd03", "node01", "node02"]
    sent = " ".join(ctx.transport.commands())
    assert ctx.secrets["admin"]["password"] not in sent  # the log scan gets the secrets on stdin only


def test_run_audit_reports_a_left_bootstrap_script(ctx):
    _state(ctx)
    _lab_answers(ctx)
    ctx.transport.on(r"^test ! -e /etc/patroni/post_bootstrap.sh", lambda h, c: 1 if h.name == "node01" else 0)
    found = [(c.host, p) for c in a.run_audit(ctx) for p in c.problems]
    assert found == [("node01", "/etc/patroni/post_bootstrap.sh is still there (an older runbook left it with the "
                                "admin password); `inv cluster.up` removes it (patroni.config)")]


def test_run_audit_reports_a_bad_mode_a_leak_and_an_unreachable_host(ctx):
    _state(ctx)
    _lab_answers(ctx, bad_mode=True)
    key = ctx.pki_dir / "ca.key"
    os.chmod(key, 0o644)
    ctx.transport.down.add("etcd03")
    db = ctx.state_dir / f"{ctx.inventory.cluster.name}.db"
    with sqlite3.connect(db) as conn:  # a secret that slipped into the ledger unredacted
        conn.execute("INSERT INTO events (kind, action) VALUES ('run', ?)", (ctx.secrets["rewind"]["password"],))
    found = {(c.host, p) for c in a.run_audit(ctx) for p in c.problems}
    assert ("node01", "/etc/patroni/config.yml is 0644 postgres, want 0600 postgres") in found
    assert ("local", f"{key} is 0644, want 0600") in found
    assert ("local", "the password of rewind appears in the ledger") in found
    assert any(h == "etcd03" and "unreachable" in p for h, p in found)
    assert not [p for _, p in found if ctx.secrets["rewind"]["password"] in p]


def test_run_audit_reports_a_slot_retaining_wal_and_an_etcd_alarm(ctx):
    _state(ctx)
    _lab_answers(ctx)
    ctx.transport.on(r"from pg_replication_slots", lambda h, cmd: (0, "leftover|f|104857600|reserved\n"
                                                                    if h.name == "node01" else ""))
    ctx.transport.on(r"alarm list", (0, "memberID:7 alarm:NOSPACE\n"))
    found = {(c.host, c.name, p.split(":")[0]) for c in a.run_audit(ctx) for p in c.problems}
    assert found == {("node01", "no inactive slot retaining WAL", "slot leftover is inactive and retains 100 MB "
                                                                  "of WAL (reserved)"),
                     *((h, "etcd: no active alarm", "active alarm NOSPACE") for h in ("etcd01", "etcd02", "etcd03"))}


def test_run_audit_reports_etcd_taking_plain_http_and_a_refusal_probe_without_answer(ctx):
    _state(ctx)
    _lab_answers(ctx)
    ctx.transport.on(r'echo "plain=\$\? nocert=\$n"', lambda h, cmd: {
        "etcd01": (0, "plain=0 nocert=1\n"), "etcd02": (0, "plain=1 nocert=0\n")}.get(h.name, (1, "")))
    found = {(c.host, p.split(" (rc")[0]) for c in a.run_audit(ctx) for p in c.problems}
    assert found == {("etcd01", "plain http on the client port was accepted"),
                     ("etcd02", "a TLS client without a certificate was accepted (client-cert-auth off)"),
                     ("etcd03", "the refusal probes gave no answer")}


def test_run_audit_refuses_without_secrets(ctx):
    with pytest.raises(ProcedureFailed, match="secrets.yml does not exist"):
        a.run_audit(ctx)
    assert not Path(ctx.state_dir / "secrets.yml").exists()  # read-only: nothing generated


# -- the drill's pure figures --------------------------------------------------------------------
def test_writer_gap():
    w = Writer("", "r")
    w.started, w.stopped = 100.0, 110.0
    w.acked = [(1, 100.5), (2, 101.0), (3, 107.0), (4, 107.2)]
    assert w.gap() == (6.0, 107.0)
    assert w.gap(107.1, 108.0) == (pytest.approx(0.8), 108.0)
    assert w.first_ack_after(101.0) == 107.0


def test_rewind_verdict_on_captured_patroni_log():
    lines = ["2026-11-26 13:30:24,515 INFO: running pg_rewind from patroni_a-node02",
             "2026-11-26 13:30:25,240 INFO: pg_rewind exit code=0",
             "2026-11-26 13:30:25,241 INFO:  stderr=pg_rewind: servers diverged at WAL location 0/307B910 on "
             "timeline 1"]
    assert rewind_verdict(lines, 2, 2) == "pg_rewind ran; timeline 2 = leader's 2"
    assert rewind_verdict([], 3, 3).startswith("no pg_rewind in the Patroni log")
    assert "!=" in rewind_verdict([], 2, 3)


def test_a_wrong_purpose_certificate_accepted_is_a_finding(ctx):
    """The probe's verdicts: refused is fine; any HTTP answer names the service and the certificate; no verdict
    (the probe could not load the pair, say) is a finding too, never a pass."""
    from runbook.procedures import audit_purposes as ap

    node = ctx.inventory.get("node01")
    ps = ap.probes(ctx, node)
    assert [p[1] for p in ps] == ["https://192.168.60.141:2379/version", "https://192.168.60.141:2380/members",
                                  "https://192.168.60.132:8008/patroni"]  # the REST API of another host
    assert [p[2].rsplit("/", 1)[1] for p in ps] == ["pg-server.crt", "etcd-client.crt", "pg-server.crt"]
    ctx.transport.on(r"refuses a PostgreSQL server certificate", (0, (
        f"{ps[0][0]}|refused:SSLError tlsv13 alert certificate required\n"
        f"{ps[1][0]}|answered:200\n")))
    checks = {c.name: c.problems for c in ap.audit_wrong_purposes(ctx)}
    assert checks[ps[0][0]] == []
    assert checks[ps[1][0]] == ["etcd peer port (etcd01:2380) accepted a certificate of the wrong purpose "
                                "(Patroni's etcd client certificate): HTTP 200"]
    assert checks[ps[2][0]] == ["the probe gave no verdict: no answer"]
    sent = [c for c in ctx.transport.commands() if "bin/python -" in c]
    assert sent and all(ctx.secrets["admin"]["password"] not in c for c in sent)
