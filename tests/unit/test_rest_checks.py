"""The patroni checks that no longer start patronictl or the validator (issue 16: --verify's cost), executed for
real here: the REST API reader (runbook.cluster.commands.rest_get) against a local TLS server that requires a
client certificate, as Patroni's `verify_client: required` does; patroni.validate's mark against files in a
temporary tree. Each check passes on the right state and fails on every wrong one it claims to catch."""
from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import shlex
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runbook.cluster.commands import member_ok_rest, rest_get
from runbook.cluster.dynamic import EXACT, bootstrap_dcs, dynamic_check
from runbook.cluster.readers import leader, parse_cluster
from runbook.cluster.render import Paths
from runbook.core.shared import _KNOWN, to_share
from runbook.core.shared import uses as shared_uses
from runbook.sections import patroni

LEADER = {"name": "patroni_node01", "role": "leader", "state": "running", "host": "10.0.0.1", "timeline": 1}
SYNC = {"name": "patroni_node02", "role": "sync_standby", "state": "streaming", "host": "10.0.0.2", "timeline": 1,
        "lag": 0}


# -- a TLS REST API that wants a client certificate of its CA ------------------------------------------------
def _cert(name: str, issuer: tuple | None, usage, ca: bool = False) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write(d: Path, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    crt, k = d / f"{name}.crt", d / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(crt), str(k)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tls")
    ca = _cert("test CA", None, None, ca=True)
    ca_crt, _ = _write(d, "ca", *ca)
    server = _write(d, "server", *_cert("localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH))
    client = _write(d, "client", *_cert("client", ca, ExtendedKeyUsageOID.CLIENT_AUTH))
    stranger = _cert("other CA", None, None, ca=True)
    alien = _write(d, "alien", *_cert("alien", stranger, ExtendedKeyUsageOID.CLIENT_AUTH))
    return {"ca": ca_crt, "server": server, "client": client, "alien": alien}


class Api:
    """GET /cluster and /config answered from `self.answers` ({path: (status, JSON)}); `self.paths` records them."""

    def __init__(self, tls: dict):
        api = self
        self.answers: dict[str, tuple[int, object]] = {}
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the http.server API
                api.paths.append(self.path)
                status, body = api.answers.get(self.path, (404, {}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED  # Patroni's verify_client: required
        ctx.load_cert_chain(*tls["server"])
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.address = f"localhost:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def api(tls):
    a = Api(tls)
    yield a
    a.httpd.shutdown()


def run_rest(cmd: str, tls: dict, api: Api, client: str = "client", out: list | None = None) -> int:
    """Run a rest_get command locally: its own script and verdict, this test's CA, client pair and server
    (its stdout appended to `out`)."""
    argv = shlex.split(cmd)
    if argv[:2] == ["sudo", "-u"]:
        argv = argv[3:]
    i = argv.index("-c")
    assert argv[:i] == ["python3", "-I", "-S"]  # the distribution's interpreter, isolated: no patronictl
    script, rest = argv[i + 1], argv[i + 2:]
    rest[:4] = [tls["ca"], *tls[client], api.address]
    r = subprocess.run([sys.executable, "-I", "-S", "-c", script, *rest], capture_output=True, text=True, timeout=30)
    if out is not None:
        out.append(r.stdout)
    return r.returncode


def run_probe_check(check: str, tls: dict, api: Api) -> int:
    """Run a check `<shared REST reader> | <filter>` locally: the reader as run_rest does, the filter on its
    stdout (as a --verify batch or the check alone would)."""
    (key,) = shared_uses(check)
    reader, out = _KNOWN[key], []
    run_rest(reader, tls, api, out=out)
    return subprocess.run(["sh", "-c", check.rsplit(" | ", 1)[1]], input=out[0], text=True).returncode


def test_rest_client_is_what_patronictl_presents(ctx, inv):
    """The certificate paths come from the Patroni config's context (its ctl: section), not from a copy."""
    node01 = inv.get("node01")
    c = patroni.pctx(ctx, node01)
    cmd = rest_get(ctx, node01, ["/cluster"], "pass")
    assert shlex.split(cmd)[5:9] == [c["ca_file"], c["ctl_cert_file"], c["ctl_key_file"], c["restapi_connect_address"]]
    assert c["ctl_cert_file"].endswith("/rest-client.crt")  # the REST API client purpose, not a server pair


def test_member_check_passes_for_a_running_leader_or_a_streaming_replica(ctx, inv, tls, api):
    api.answers = {"/cluster": (200, {"members": [LEADER, SYNC], "scope": "patroni_cluster"})}
    assert run_rest(member_ok_rest(ctx, inv.get("node01")), tls, api) == 0
    assert run_rest(member_ok_rest(ctx, inv.get("node02")), tls, api) == 0


@pytest.mark.parametrize("members", [
    [LEADER, {**SYNC, "state": "stopped"}],  # a replica that does not stream
    [LEADER, {**SYNC, "state": "starting"}],
    [LEADER],  # not a member at all
    [LEADER, {**SYNC, "role": "leader", "state": "stopped"}],  # a leader that does not run
])
def test_member_check_fails_for_a_member_that_is_not_ok(ctx, inv, tls, api, members):
    api.answers = {"/cluster": (200, {"members": members, "scope": "patroni_cluster"})}
    assert run_rest(member_ok_rest(ctx, inv.get("node02")), tls, api) == 1


def test_member_check_fails_without_an_answer_or_with_a_foreign_certificate(ctx, inv, tls, api):
    api.answers = {"/cluster": (503, {})}
    assert run_rest(member_ok_rest(ctx, inv.get("node01")), tls, api) == 1
    api.answers = {"/cluster": (200, {"members": [LEADER, SYNC]})}
    assert run_rest(member_ok_rest(ctx, inv.get("node01")), tls, api, client="alien") == 1  # refused: rc 1
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    dead = Api.__new__(Api)
    dead.address = f"localhost:{port}"
    assert run_rest(member_ok_rest(ctx, inv.get("node01")), tls, dead) == 1


def test_dynamic_check_compares_the_dcs_config_read_fresh(ctx, inv, tls, api):
    want = bootstrap_dcs(ctx.inventory, ctx.paths.log_dir)  # what the DCS holds once the cluster is created
    cmd = dynamic_check(ctx, inv.get("node01"))
    assert "patronictl" not in cmd and "sudo -u postgres " in cmd
    api.answers = {"/cluster": (200, {"members": [LEADER, SYNC]}), "/config": (200, want)}
    api.paths.clear()
    assert run_probe_check(cmd, tls, api) == 0
    assert api.paths == ["/cluster", "/config"]  # /cluster first: Patroni reloads the cluster from the DCS
    drifted = json.loads(json.dumps(want))
    drifted["ttl"] = 99
    api.answers["/config"] = (200, drifted)
    assert run_probe_check(cmd, tls, api) == 1
    extra = json.loads(json.dumps(want))
    extra["postgresql"]["parameters"]["work_mem"] = "1GB"  # not named by the inventory: EXACT removes it
    assert "postgresql.parameters" in EXACT
    api.answers["/config"] = (200, extra)
    assert run_probe_check(cmd, tls, api) == 1
    api.answers["/config"] = (502, {})  # no config in the DCS
    assert run_probe_check(cmd, tls, api) == 1


def test_bootstrap_and_dynamic_read_one_rest_answer_each_verdict_its_own(ctx, inv, tls, api):
    """patroni.bootstrap's and patroni.dynamic's checks share one reader (one GET of /cluster and /config in a
    --verify batch); each passes or fails on its own verdict, as when each asked the API itself."""
    node01 = inv.get("node01")
    want = bootstrap_dcs(ctx.inventory, ctx.paths.log_dir)
    boot = patroni._bootstrap_check(ctx, node01)
    dyn = dynamic_check(ctx, node01)
    assert to_share([boot, dyn])  # the same reader: asked once per batch
    member = boot.split(" && ", 1)[1].rsplit(" && test ! -e", 1)[0]  # the REST part of the check
    drifted = {**want, "ttl": 99}
    for members, config, ok_member, ok_dynamic in (
            ([LEADER, SYNC], (200, want), True, True),
            ([LEADER, SYNC], (200, drifted), True, False),
            ([LEADER, SYNC], (502, {}), True, False),  # no config: only the dynamic verdict fails
            ([{**LEADER, "state": "stopped"}, SYNC], (200, want), False, True)):
        api.answers = {"/cluster": (200, {"members": members}), "/config": config}
        assert (run_probe_check(member, tls, api) == 0) is ok_member
        assert (run_probe_check(dyn, tls, api) == 0) is ok_dynamic
    api.answers = {"/cluster": (503, {}), "/config": (200, want)}
    assert run_probe_check(member, tls, api) == 1 and run_probe_check(dyn, tls, api) == 1


def test_leader_is_read_from_the_rest_api(ctx, inv):
    rest = r"(?s)python3 -I -S -c .* /cluster$"
    ctx.transport.on(rest, (0, json.dumps({"members": [{**LEADER, "name": "patroni_node02"}, SYNC]})))
    assert leader(ctx).name == "node02"
    assert not [c for _, _, c in ctx.transport.calls if "patronictl" in c]
    ctx.transport.on(rest, (0, json.dumps({"members": [{**LEADER, "state": "stopped"}]})))
    assert leader(ctx) is None
    ctx.transport.on(rest, 1)
    with pytest.raises(RuntimeError, match="no postgres host's REST API answered"):
        leader(ctx)
    assert [m.role for m in parse_cluster(json.dumps({"members": [LEADER, SYNC]}))] == ["Leader", "Sync Standby"]


# -- patroni.validate: the mark of the last successful validation ---------------------------------------------
@pytest.fixture
def tree(ctx, tmp_path, monkeypatch):
    """The files the validator judges, under tmp_path; an etcd "host" listening on a local port."""
    root = tmp_path / "host"
    venv, bin_dir, data = root / "opt/patroni", root / "usr/lib/postgresql/17/bin", root / "data/17"
    site = venv / "lib/python3.13/site-packages"
    for d in (site / "patroni-4.1.5.dist-info", site / "psycopg2-2.9.dist-info", bin_dir, data, root / "etc"):
        d.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("version = 3.13.5\n")
    (site / "patroni-4.1.5.dist-info/RECORD").write_text("patroni/__init__.py,sha256=abc,10\n")
    (site / "psycopg2-2.9.dist-info/RECORD").write_text("psycopg2/__init__.py,sha256=def,10\n")
    (bin_dir / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 17.12'\n")
    (bin_dir / "postgres").chmod(0o755)
    (root / "etc/config.yml").write_text("scope: patroni_cluster\n")
    paths = Paths(patroni_venv=str(venv), patroni_conf=str(root / "etc/config.yml"),
                  pg_bin_dir_fmt=str(root / "usr/lib/postgresql/{major}/bin"), pgdata_fmt=str(root / "data/{major}"),
                  pg_major=ctx.inventory.cluster.postgres_major, os=ctx.inventory.cluster.os)
    ctx.__dict__["paths"] = paths
    monkeypatch.setattr(patroni, "VALIDATED", str(root / "var/lib/pg-ha-runbook/patroni-validated.sha256"))
    etcd = socket.socket()
    etcd.bind(("127.0.0.1", 0))
    etcd.listen(8)
    port = etcd.getsockname()[1]
    monkeypatch.setattr(patroni, "pctx", lambda ctx, host: {"etcd_hosts": [f"127.0.0.1:{port}"]})
    yield {"root": root, "site": site, "bin": bin_dir, "data": data, "etcd": etcd}
    etcd.close()


def sh(cmd: str) -> int:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=30).returncode


def validated(ctx, host) -> None:
    """patroni.validate's actions, the validator itself standing in as a success (it is not installed here)."""
    first, run_validator, keep = patroni.validate.actions_fn(ctx, host)
    assert "--validate-config --ignore-listen-port" in run_validator.cmd and run_validator.user == "postgres"
    assert sh(first.cmd) == 0 and sh(keep.cmd) == 0


def test_validate_check_passes_only_after_a_validation_of_the_same_files(ctx, inv, tree):
    node01 = inv.get("node01")
    check = patroni._validate_check(ctx, node01)
    assert "--validate-config" not in check and "patronictl" not in check
    assert sh(check) != 0  # never validated: no mark
    validated(ctx, node01)
    assert sh(check) == 0
    mark = Path(patroni.VALIDATED)
    assert oct(mark.stat().st_mode & 0o777) == "0o600" and oct(mark.parent.stat().st_mode & 0o777) == "0o700"


def test_a_validation_that_fails_leaves_no_mark(ctx, inv, tree):
    node01 = inv.get("node01")
    validated(ctx, node01)
    first, _, _ = patroni.validate.actions_fn(ctx, node01)
    assert sh(first.cmd) == 0  # the validator then fails: the third action never runs
    assert sh(patroni._validate_check(ctx, node01)) != 0


@pytest.mark.parametrize("change", [
    lambda t: (t["root"] / "etc/config.yml").write_text("scope: other\n"),  # the config
    lambda t: (t["site"] / "patroni-4.1.5.dist-info/RECORD").write_text("patroni/__init__.py,sha256=xyz,10\n"),
    lambda t: (t["site"] / "psycopg2-2.9.dist-info/RECORD").unlink(),  # a dependency gone
    lambda t: (t["root"] / "opt/patroni/pyvenv.cfg").write_text("version = 3.14.0\n"),  # another interpreter
    lambda t: (t["bin"] / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 18.1'\n"),
    lambda t: (t["bin"] / "pg_ctl").write_text(""),  # the binaries changed
    lambda t: t["etcd"].close(),  # an etcd host does not answer
    lambda t: (t["data"] / "base").mkdir(),  # a data directory in use without PG_VERSION
    lambda t: ((t["data"] / "PG_VERSION").write_text("16\n"), (t["data"] / "pg_wal").mkdir()),  # another major
    lambda t: (t["data"] / "PG_VERSION").write_text("17\n"),  # no pg_wal
], ids=["config", "patroni", "dependency", "interpreter", "postgres-version", "binaries", "etcd", "data-dir",
        "data-major", "pg_wal"])
def test_validate_check_fails_when_what_the_validator_judged_changed(ctx, inv, tree, change):
    node01 = inv.get("node01")
    validated(ctx, node01)
    assert sh(patroni._validate_check(ctx, node01)) == 0
    change(tree)
    assert sh(patroni._validate_check(ctx, node01)) != 0


def test_validate_check_accepts_a_data_directory_in_use_of_the_right_major(ctx, inv, tree):
    node01 = inv.get("node01")
    validated(ctx, node01)
    (tree["data"] / "PG_VERSION").write_text(f"{ctx.inventory.cluster.postgres_major}\n")
    (tree["data"] / "pg_wal").mkdir()
    (tree["data"] / ".hidden").write_text("")
    assert sh(patroni._validate_check(ctx, node01)) == 0


def test_rolling_validate_back_removes_its_mark(ctx, inv, tree):
    node01 = inv.get("node01")
    validated(ctx, node01)
    assert all(sh(a.cmd) == 0 for a in patroni.validate.undo_actions(ctx, node01))
    assert not Path(patroni.VALIDATED).exists()
    assert sh(patroni._validate_check(ctx, node01)) != 0
