"""cluster.audit's pg_hba analysis on hand-written pg_hba_file_rules rows, and its live probes' verdicts: the
non-TLS login probe run against a fake server on loopback, the sudo journal scan run on a fake journal."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runbook.cluster.render import pg_hba
from runbook.procedures import audit_probes as pr
from runbook.procedures.audit_hba import check_hba_rules, check_pg_hba, overlaps, parse_hba_rows, within

MASKS = {"32": "255.255.255.255", "24": "255.255.255.0", "16": "255.255.0.0", "8": "255.0.0.0", "0": "0.0.0.0"}


def rows(*lines: str) -> str:
    """pg_hba lines -> the view's rows (line|type|db|user|address|netmask|method|error), numbered from 1."""
    out = []
    for n, ln in enumerate(lines, 1):
        f = ln.split()
        if f[0] == "local":
            out.append(f"{n}|local|{f[1]}|{f[2]}|||{f[3]}|")
        else:
            addr, _, bits = f[3].partition("/")
            out.append(f"{n}|{f[0]}|{f[1]}|{f[2]}|{addr}|{MASKS.get(bits, '') if bits else ''}|{f[4]}|")
    return "\n".join(out) + "\n"


def test_the_runbooks_own_pg_hba_is_clean(inv):
    """Both shapes the runbook renders (with and without the front door) pass every rule."""
    assert check_pg_hba(rows(*pg_hba(inv, "replicator", superuser="postgres"))) == []
    front = inv.model_copy(update={"cluster": inv.cluster.model_copy(update={"vip": "192.168.60.250"})})
    assert check_pg_hba(rows(*pg_hba(front, "replicator", superuser="postgres"))) == []


def test_an_accept_before_the_reject_is_a_finding_naming_both_lines():
    """The issue's case: `host all all 0.0.0.0/0 scram-sha-256` placed before the rejects."""
    got = check_pg_hba(rows("host all all 0.0.0.0/0 scram-sha-256", "hostnossl all all 0.0.0.0/0 reject",
                            "hostnossl replication all 0.0.0.0/0 reject", "hostssl all postgres 0.0.0.0/0 reject",
                            "hostssl all all 10.0.0.0/8 scram-sha-256"))
    assert got == [
        "pg_hba line 1: `host all all 0.0.0.0/0 scram-sha-256` accepts connections without TLS (want hostssl, or "
        "reject)",
        "pg_hba line 2: the reject `hostnossl all all 0.0.0.0/0 reject` comes after accepting line(s) 1 "
        "(`host all all 0.0.0.0/0 scram-sha-256`) that match connections it should refuse: the first matching "
        "line decides, so move the reject above them",
        "pg_hba line 4: the reject `hostssl all postgres 0.0.0.0/0 reject` comes after accepting line(s) 1 "
        "(`host all all 0.0.0.0/0 scram-sha-256`) that match connections it should refuse: the first matching "
        "line decides, so move the reject above them"]  # line 3 (replication) is not matched by `all`


def test_a_tls_accept_that_reaches_beyond_a_later_reject_is_a_finding():
    got = check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", "hostssl all all 192.168.0.0/16 scram-sha-256",
                            "hostssl all postgres 0.0.0.0/0 reject"))
    assert [p.split(":")[0] for p in got] == ["pg_hba line 3"] and "line(s) 2" in got[0]


def test_exceptions_carved_out_of_a_later_reject_pass():
    """Narrower in every dimension (type, database, user, address): the superuser from chosen hosts only."""
    assert check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", "hostssl all postgres 127.0.0.1/32 scram-sha-256",
                             "hostssl postgres,app postgres 10.1.2.0/24 scram-sha-256",
                             "hostssl all postgres 0.0.0.0/0 reject", "hostssl all all 10.0.0.0/8 scram-sha-256")) == []


@pytest.mark.parametrize("method", ["ident", "trust", "password", "md5"])
def test_each_weak_method_is_a_finding_on_tcp_and_on_the_socket(method):
    got = check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", f"hostssl all all 10.0.0.0/8 {method}"))
    assert got == [f"pg_hba line 2: `hostssl all all 10.0.0.0/8 {method}` uses {method} (want scram-sha-256; peer "
                   "on the socket)"]
    if method != "ident":  # PostgreSQL reads a local ident as peer: the view never shows it
        assert check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", f"local all all {method}")) != []


@pytest.mark.parametrize("typ", ["host", "hostnossl", "hostgssenc", "hostnogssenc"])
def test_every_tcp_type_but_hostssl_may_only_reject(typ):
    assert check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", f"{typ} all all 10.0.0.0/8 reject")) == []
    got = check_pg_hba(rows("hostnossl all all 0.0.0.0/0 reject", f"{typ} all all 10.0.0.0/8 scram-sha-256"))
    assert got == [f"pg_hba line 2: `{typ} all all 10.0.0.0/8 scram-sha-256` accepts connections without TLS "
                   "(want hostssl, or reject)"]


def test_no_nossl_reject_and_parse_errors_are_findings():
    out = "1|hostssl|all|all|10.0.0.0||scram-sha-256|invalid IP address \"10.0.0.0x\"\n"
    assert check_pg_hba(out) == ['pg_hba line 1: invalid IP address "10.0.0.0x"',
                                 "pg_hba has no hostnossl ... reject rule"]
    assert check_pg_hba("") == ["pg_hba has no hostnossl ... reject rule"]


def test_what_a_rule_matches():
    r = {i + 1: x for i, x in enumerate(parse_hba_rows(rows(
        "hostssl all all 0.0.0.0/0 reject", "hostssl replication all 0.0.0.0/0 scram-sha-256",
        "host all +admins samenet scram-sha-256", "local all all peer", "hostssl all bob 10.0.0.1/32 scram-sha-256",
        "hostnossl all bob 10.0.0.1/32 scram-sha-256", "hostssl sameuser all 10.0.0.0/8 scram-sha-256")))}
    assert not overlaps(r[2], r[1])  # `all` never matches replication
    assert overlaps(r[3], r[1]) and not within(r[3], r[1])  # samenet and a group: unknown, so they may overlap
    assert not overlaps(r[4], r[1])  # the socket is not TCP
    assert within(r[5], r[1]) and not overlaps(r[6], r[1])  # TLS vs clear
    assert within(r[7], r[1]) and not within(r[1], r[7])
    assert r[1].text() == "hostssl all all 0.0.0.0/0 reject"
    assert r[5].text() == "hostssl all bob 10.0.0.1/32 scram-sha-256"


def test_ipv6_rules_are_compared_with_ipv6_only():
    got = check_hba_rules(parse_hba_rows(
        "1|hostssl|all|all|::1|ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff|scram-sha-256|\n"
        "2|hostnossl|all|all|0.0.0.0|0.0.0.0|reject|\n3|hostssl|all|all|::|::|reject|\n"))
    assert got == []  # ::1/128 is inside ::/0: an exception; 0.0.0.0/0 never matches an IPv6 client


# -- the non-TLS login probe ---------------------------------------------------------------------
def test_plain_verdicts():
    refused = "error:28000:pg_hba.conf rejects connection for host ..., no encryption"
    assert pr.plain_verdict("10.0.0.1:5432", refused, "n2") == []
    assert pr.plain_verdict("10.0.0.1:5432", "error:28000:no pg_hba.conf entry for host", "n2") == []
    assert pr.plain_verdict("10.0.0.1:6432", "error:08P01:SSL required", "n2") == []
    assert pr.plain_verdict("10.0.0.1:5432", "auth:10", "n2") == [
        "10.0.0.1:5432 accepted a login without TLS from n2 and asked for SCRAM (SASL): pg_hba (or the pooler) "
        "lets clients in over a connection without TLS"]
    assert "no password at all (trust)" in pr.plain_verdict("10.0.0.1:5432", "auth:0", "n2")[0]
    assert "is not proven" in pr.plain_verdict("10.0.0.1:5432", "unreachable:Connection refused", "n2")[0]
    assert "SQLSTATE 53300" in pr.plain_verdict("10.0.0.1:5432", "error:53300:too many clients", "n2")[0]
    assert pr.plain_verdict("10.0.0.1:5432", "", "n2") == ["10.0.0.1:5432: the probe from n2 got no answer"]


def _fake_server(reply: bytes) -> tuple[int, list[bytes]]:
    """A one-shot TCP server on loopback that records the startup packet and sends reply."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got: list[bytes] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            n = struct.unpack("!i", conn.recv(4))[0]
            got.append(conn.recv(n - 4))
            conn.sendall(reply)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], got


def _probe(*targets: str) -> dict[str, str]:
    p = subprocess.run([sys.executable, "-", pr.PROBE_ROLE, *targets], input=pr.PLAIN_PROBE, text=True,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return pr.parse_plain_probe(p.stdout)


def test_the_probe_script_speaks_the_protocol_without_tls():
    """A startup packet (protocol 3.0, no SSLRequest) for the probe role; the server's first answer decides."""
    body = b"SFATAL\0C28000\0Mpg_hba.conf rejects connection for host \"10.0.0.2\", no encryption\0\0"
    port, got = _fake_server(b"E" + struct.pack("!i", 4 + len(body)) + body)
    assert _probe(f"127.0.0.1:{port}") == {
        f"127.0.0.1:{port}": 'error:28000:pg_hba.conf rejects connection for host "10.0.0.2", no encryption'}
    assert got[0].startswith(struct.pack("!i", 196608)) and b"user\0runbook_audit_probe\0" in got[0]
    port, _ = _fake_server(b"R" + struct.pack("!ii", 8, 10))  # SASL: the server would go on without TLS
    assert _probe(f"127.0.0.1:{port}") == {f"127.0.0.1:{port}": "auth:10"}


def test_the_probe_script_reports_a_closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert _probe(f"127.0.0.1:{port}")[f"127.0.0.1:{port}"].startswith("unreachable:")


# -- the sudo journal scan -----------------------------------------------------------------------
SECRETS = {"rewind": {"username": "rewind_user", "password": "R" * 24},
           "admin": {"username": "admin", "password": "A" * 24}}


def _scan(tmp_path: Path, journal: str) -> str:
    """SUDO_SCAN run by sh with a fake journalctl that prints `journal` (JSON lines, as `-o json` does)."""
    (tmp_path / "journal.json").write_text(journal)
    fake = tmp_path / "journalctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\ncat {tmp_path}/journal.json\n")
    fake.chmod(0o755)
    p = subprocess.run(["sh", "-c", pr.SUDO_SCAN], input=pr.secret_lines(SECRETS), capture_output=True, timeout=30,
                       env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert p.returncode == 0, p.stderr
    assert "SYSLOG_IDENTIFIER=sudo" in (tmp_path / "argv").read_text()
    return p.stdout.decode()


def test_the_sudo_scan_names_host_time_unit_and_secret_never_the_value(tmp_path):
    clean = '{"__REALTIME_TIMESTAMP":"1764466000000000","_SYSTEMD_UNIT":"session-3.scope","MESSAGE":"ok"}\n'
    leak = ('{"__REALTIME_TIMESTAMP":"1764466001000000","_SYSTEMD_UNIT":"session-4.scope","MESSAGE":"runbook : '
            f'COMMAND=/usr/bin/psql password={"R" * 24}"}}\n')
    out = _scan(tmp_path, clean + leak)
    assert "R" * 24 not in out
    assert pr.check_sudo_scan(out, "node01") == [
        "node01: a sudo journal entry at 2025-11-30 01:26:41 UTC (unit session-4.scope) holds the rewind password: "
        "rotate it (`inv secrets.rotate`) and vacuum the journal"]
    no_unit = leak.replace('"_SYSTEMD_UNIT":"session-4.scope"', '"_PID":"4242"')  # logger gone before journald
    assert "(unit pid 4242)" in pr.check_sudo_scan(_scan(tmp_path, no_unit), "node01")[0]  # asked for its cgroup
    assert pr.check_sudo_scan(_scan(tmp_path, clean), "node01") == []
    assert pr.check_sudo_scan(_scan(tmp_path, ""), "node01") == []  # no sudo entry at all: nothing to find
    assert pr.check_sudo_scan("", "node01") == ["node01: the sudo journal scan returned nothing"]


def test_the_scan_gets_secrets_on_stdin_only():
    lines = pr.secret_lines(SECRETS).decode()
    assert f"rewind\t{'R' * 24}\n" in lines and f"admin\t{'A' * 24}\n" in lines
    assert "R" * 24 not in pr.SUDO_SCAN and "$(cat)" in pr.SUDO_SCAN
