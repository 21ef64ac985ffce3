"""Scenarios on real hosts: bare lab hosts -> etcd over TLS -> PostgreSQL + Patroni -> switchover.

The tests of this module run in order and share one cluster, like an operator's day:
install (killed and resumed), converge again (0 steps), prove TLS and secrets, switch over under a
writer, lose an etcd member. Every wait is a poll with a budget (RUNBOOK_TIMEOUT_SCALE stretches them).
"""
from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
import urllib.error
import urllib.request

import psycopg
import pytest
import yaml
from conftest import e2e_inventory_path
from helpers import T, executed, inv, kill_when, ledger, wait_for

from runbook.inventory import load_inventory

pytestmark = pytest.mark.e2e
# host names, addresses and the distribution come from the e2e inventory (hosts.yml, or RUNBOOK_E2E_INVENTORY)
_INV = load_inventory(e2e_inventory_path())
E1, E2, E3 = (h.name for h in _INV.etcd[:3])
N1, N2 = (h.name for h in _INV.postgres[:2])
NAME = _INV.cluster.name
ETCD = f"{E1},{E2},{E3}"
ADDR = {h.name: h.address for h in _INV.hosts}


@pytest.fixture(scope="module")
def tr(cluster):
    """This module's own SSH transport (its hosts are recreated, so no session-wide connections)."""
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


def sh(tr, inventory, host, cmd, user="root"):
    return tr.run(inventory.get(T(host)), T(cmd), user=user, timeout=120)


def test_etcd_install_killed_midway_then_resumed(cluster):
    inventory, state = cluster
    kill_when(state, ["etcd.install", "--hosts", ETCD],
              "select 1 from checkpoints where step = 'etcd.tls' and status in ('running', 'done')")
    with ledger(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from checkpoints where step = 'etcd.start'").fetchone()[0] == 0
    out = inv(state, "etcd.install", "--hosts", ETCD).stdout
    assert "took over a run lock left by a dead process" in out
    assert executed(out) > 0
    inv(state, "etcd.health")
    status = inv(state, "etcd.status").stdout
    assert sum(status.count(f"https://{e}:2379") for e in (E1, E2, E3)) >= 3 and "down" not in status


def test_etcd_install_again_executes_nothing(cluster):
    _, state = cluster
    assert executed(inv(state, "etcd.install", "--hosts", ETCD).stdout) == 0


def test_etcd_refuses_plain_http_no_client_cert_and_foreign_ca(cluster, tr, tmp_path):
    inventory, state = cluster
    from runbook.credentials.pki import Pki

    tls = "/etc/etcd/tls"
    base = "ETCDCTL_API=3 etcdctl --command-timeout=3s --dial-timeout=3s"
    ok = sh(tr, inventory, E1,
            f"{base} --cacert={tls}/ca.crt --cert={tls}/etcd-root.crt --key={tls}/etcd-root.key "
            f"--endpoints=https://{E2}:2379 put /probe ok")
    assert ok.ok, ok.stderr
    plain = sh(tr, inventory, E1, f"{base} --endpoints=http://{E2}:2379 get /probe")
    assert not plain.ok
    nocert = sh(tr, inventory, E1,
                f"{base} --cacert={tls}/ca.crt --endpoints=https://{E2}:2379 get /probe")
    assert not nocert.ok and ("bad certificate" in nocert.stderr or "certificate required" in nocert.stderr
                              or "deadline exceeded" in nocert.stderr), nocert.stderr
    foreign = Pki(tmp_path / "foreign").leaf(E1, "etcd-root")  # CN=root, but of another CA
    t = inventory.get(E1)
    for data, dst in ((foreign.cert_pem, "/tmp/foreign.crt"), (foreign.key_pem, "/tmp/foreign.key")):
        tr.put(t, dst, data, mode="0600")
    foreign = sh(tr, inventory, E1,
                 f"{base} --cacert={tls}/ca.crt --cert=/tmp/foreign.crt --key=/tmp/foreign.key "
                 f"--endpoints=https://{E2}:2379 get /probe")
    assert not foreign.ok
    assert sh(tr, inventory, "etcd01", "rm -f /tmp/foreign.crt /tmp/foreign.key").ok


def _tls_get(address: str, port: int, path: str, ca: Path, crt: Path, key: Path) -> tuple[int, bytes]:
    """GET over TLS with a client certificate, from this machine: (status, body); a refusal raises."""
    import http.client

    c = ssl.create_default_context(cafile=str(ca))
    c.check_hostname = False  # we dial the address; the SANs name the host too
    c.load_cert_chain(str(crt), str(key))
    conn = http.client.HTTPSConnection(address, port, context=c, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


HOST_GET = r"""import ssl, sys, urllib.request
url, ca, crt, key = sys.argv[1:5]
c = ssl.create_default_context(cafile=ca)
c.check_hostname = False
c.load_cert_chain(crt, key)
try:
    r = urllib.request.urlopen(url, context=c, timeout=10)
    print("status=%d %s" % (r.status, r.read()[:4000].decode(errors="replace")))  # the whole member list
except Exception as e:
    print("refused=" + type(e).__name__)
"""


def _get_on(tr, inventory, host: str, url: str, ca: str, crt: str, key: str) -> str:
    """GET *url* from *host* itself (etcd checks a peer's address against its certificate's SANs)."""
    r = tr.run(inventory.get(T(host)), f"python3 - {url} {ca} {crt} {key}", stdin=HOST_GET.encode(), timeout=60)
    assert r.ok, r.stderr
    return r.stdout.strip()


def test_a_postgres_host_key_cannot_join_etcd_as_a_peer(cluster, tr):
    """Peers trust only the peer CA: node01's certificates (keys a PostgreSQL superuser can read) are refused on
    the raft port, from node01 itself; an etcd host's peer certificate gets the member list."""
    inventory, state = cluster
    e1, e2 = inventory.get(T("etcd01")), inventory.get(T("etcd02"))
    etls = "/etc/etcd/tls"
    ok = _get_on(tr, inventory, e1.name, f"https://{e2.name}:2380/members", f"{etls}/peer-ca.crt",
                 f"{etls}/etcd-peer.crt", f"{etls}/etcd-peer.key")
    assert ok.startswith("status=200") and e2.name in ok, ok  # the positive control: a peer is a peer
    n1 = inventory.get(T("node01"))  # its certificates as state/pki issued them (PostgreSQL is not installed yet)
    tr.put(n1, "/tmp/peer-ca.crt", (state / "pki" / "peer-ca.crt").read_bytes())
    for purpose in ("etcd-client", "rest-client", "pg-server"):
        for ext in ("crt", "key"):
            tr.put(n1, f"/tmp/{purpose}.{ext}", (state / "pki" / n1.name / f"{purpose}.{ext}").read_bytes(),
                   mode="0600")
        got = _get_on(tr, inventory, "node01", f"https://{e2.address}:2380/members", "/tmp/peer-ca.crt",
                      f"/tmp/{purpose}.crt", f"/tmp/{purpose}.key")
        assert got.startswith("refused="), (purpose, got)
    assert tr.run(n1, "rm -f /tmp/peer-ca.crt /tmp/etcd-client.* /tmp/rest-client.* /tmp/pg-server.*", timeout=30).ok
    # and an etcd host's client-API certificate (main CA) is no peer either
    got = _get_on(tr, inventory, e1.name, f"https://{e2.name}:2380/members", f"{etls}/peer-ca.crt",
                  f"{etls}/etcd-server.crt", f"{etls}/etcd-server.key")
    assert got.startswith("refused="), got


def test_patroni_etcd_user_cannot_write_outside_its_namespace(cluster, tr):
    """etcd RBAC: the etcd user patroni (node01's CN-less etcd client certificate + its password, as Patroni logs
    in) reads and writes under the namespace only; the certificate alone is no etcd user, nor is a certificate of
    another purpose (the REST client's, CN patroni-rest)."""
    inventory, state = cluster
    pki = state / "pki"
    n1, e1 = inventory.get(T("node01")), inventory.get(T("etcd01"))
    for purpose in ("etcd-client", "rest-client"):
        for ext in ("crt", "key"):
            tr.put(e1, f"/tmp/probe-{purpose}.{ext}", (pki / n1.name / f"{purpose}.{ext}").read_bytes(), mode="0600")
    base = (f"ETCDCTL_API=3 etcdctl --command-timeout=3s --dial-timeout=3s --cacert=/etc/etcd/tls/ca.crt "
            f"--endpoints=https://{e1.name}:2379")
    cert = "--cert=/tmp/probe-etcd-client.crt --key=/tmp/probe-etcd-client.key"
    password = yaml.safe_load((state / "secrets.yml").read_text())["etcd"]["password"]

    def as_patroni(args: str):  # the password on stdin, into etcdctl's environment: never in argv
        return tr.run(e1, f'read -r pw; ETCDCTL_USER="patroni:$pw" {base} {cert} {args}',
                      stdin=(password + "\n").encode(), timeout=60)
    try:
        inside = as_patroni("put /patroni/runbook-probe x")
        assert inside.ok, inside.stderr
        assert as_patroni("del /patroni/runbook-probe").ok
        for key in ("/outside", "/patroni-other/x", "/"):
            out = as_patroni(f"put {key} x")
            assert not out.ok and "permission denied" in out.stderr, (key, out.stderr)
        auth = as_patroni("auth disable")
        assert not auth.ok and "permission denied" in auth.stderr, auth.stderr
        bare = sh(tr, inventory, e1.name, f"{base} {cert} get /patroni --prefix --keys-only")
        assert not bare.ok and ("permission denied" in bare.stderr or "user name is empty" in bare.stderr), bare.stderr
        rest = sh(tr, inventory, e1.name, f"{base} --cert=/tmp/probe-rest-client.crt "
                                          "--key=/tmp/probe-rest-client.key get /patroni --prefix --keys-only")
        assert not rest.ok and ("user name not found" in rest.stderr or "permission denied" in rest.stderr), rest.stderr
        status = sh(tr, inventory, e1.name, "ectl auth status").stdout
        assert "Authentication Status: true" in status
    finally:
        sh(tr, inventory, e1.name, "rm -f /tmp/probe-etcd-client.* /tmp/probe-rest-client.*")


def test_etcd_files_modes_and_owners(cluster, tr):
    inventory, _ = cluster
    for h in (E1, E2, E3):
        r = sh(tr, inventory, h, "stat -c '%n %a %U' /etc/etcd/tls /etc/etcd/tls/etcd-peer.key "
                                 "/etc/etcd/tls/etcd-server.key /etc/etcd/tls/etcd-root.key /var/lib/etcd; "
                                 "getent passwd etcd | cut -d: -f7; systemctl show -p User etcd; ls /etc/etcd/tls")
        lines = r.stdout.split("\n")
        assert lines[0] == "/etc/etcd/tls 750 etcd"
        assert lines[1:4] == ["/etc/etcd/tls/etcd-peer.key 600 etcd", "/etc/etcd/tls/etcd-server.key 600 etcd",
                              "/etc/etcd/tls/etcd-root.key 600 root"]  # root only: the etcd root user's key
        assert lines[4] == "/var/lib/etcd 700 etcd"
        assert lines[5].endswith("nologin") and lines[6] == "User=etcd"
        assert sorted(x for x in lines[7:] if x) == ["ca.crt", "etcd-peer.crt", "etcd-peer.key", "etcd-root.crt",
                                                     "etcd-root.key", "etcd-server.crt", "etcd-server.key",
                                                     "peer-ca.crt"]


def test_cluster_up_killed_in_patroni_section_then_resumed(cluster):
    _, state = cluster
    kill_when(state, ["cluster.up"],
              "select 1 from checkpoints where step = 'patroni.wheels' and status = 'running'", budget=900)
    out = inv(state, "cluster.up", timeout=1500).stdout
    assert "cluster.verify" in out
    st = inv(state, "cluster.status").stdout
    assert "Leader" in st and "streaming" in st


def test_second_cluster_up_executes_nothing(cluster):
    _, state = cluster
    assert executed(inv(state, "cluster.up").stdout) == 0
    with ledger(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _upload_events(state, run_id: int) -> list[str]:
    with ledger(state) as db:
        return [r[0] for r in db.execute("select stdout from events where run_id = ? and kind = 'upload'", [run_id])]


def _last_run(state) -> int:
    with ledger(state) as db:
        return db.execute("select max(id) from runs").fetchone()[0]


def test_push_again_sends_nothing_and_resends_a_damaged_file(cluster, tr):
    from runbook.core.offline import NOT_CONTACTED

    inventory, state = cluster
    out = inv(state, "bundle.push").stdout
    assert executed(out) == 0 and "sent" not in _upload_events(state, _last_run(state))
    deb = sh(tr, inventory, N2, f"ls /opt/runbook-bundle/debs/{inventory.get(N2).os}/*.deb | head -1").stdout.strip()
    assert sh(tr, inventory, N2, f"truncate -s 1000 {deb}").ok
    # the ledger says all done: a plain run contacts no host (and says so); --verify probes them
    out = inv(state, "bundle.push").stdout
    assert executed(out) == 0 and NOT_CONTACTED in " ".join(out.split())
    out = inv(state, "bundle.push", "--verify").stdout
    assert executed(out) == 1  # N2 only: its check failed
    assert _upload_events(state, _last_run(state)).count("sent") == 1
    assert sh(tr, inventory, N2, "sha256sum --quiet -c /opt/runbook-bundle/SHA256SUMS").ok
    # same size, other bytes: --verify hashes the files
    assert sh(tr, inventory, N1, f"printf XXXX | dd of={deb} bs=1 seek=100 conv=notrunc status=none").ok
    assert executed(inv(state, "bundle.push").stdout) == 0
    out = inv(state, "bundle.push", "--verify").stdout
    assert executed(out) == 1 and _upload_events(state, _last_run(state)).count("sent") == 1
    assert sh(tr, inventory, N1, "sha256sum --quiet -c /opt/runbook-bundle/SHA256SUMS").ok


def test_lost_replication_role_is_detected_and_repaired(cluster, tr):
    inventory, state = cluster
    lead = wait_for(lambda: _leader(state), 30)
    r = sh(tr, inventory, lead, "psql -X -h /var/run/postgresql -c 'DROP ROLE replicator'", user="postgres")
    assert r.ok, r.stderr
    out = inv(state, "cluster.up", "--verify").stdout
    assert "patroni.roles" in out
    q = "psql -X -h /var/run/postgresql -tAc \"select rolreplication from pg_roles where rolname='replicator'\""
    assert sh(tr, inventory, lead, q, user="postgres").stdout.strip() == "t"


def test_a_step_done_by_hand_is_recorded_and_skipped(cluster, tr):
    inventory, state = cluster
    conf = "/etc/etcd/etcd.conf.yml"
    inv(state, "runbook.rollback", "etcd.existing", "--hosts", E2)  # the last etcd step: no cascade
    assert "initial-cluster-state: new" in sh(tr, inventory, E2, f"cat {conf}").stdout
    text = inv(state, "runbook.export").stdout
    block = text.split(f"#### etcd.existing on {E2}")[1].split("```sh\n")[1].split("\n```")[0]
    assert sh(tr, inventory, E2, block).ok  # a person runs the exported commands
    inv(state, "runbook.mark-done", "etcd.existing", "--hosts", E2, "--note", "by hand")
    assert executed(inv(state, "cluster.up").stdout) == 0
    assert "manual" in inv(state, "runbook.status").stdout
    assert "initial-cluster-state: existing" in sh(tr, inventory, E2, f"cat {conf}").stdout
    assert sh(tr, inventory, E2, "ectl endpoint health").ok


def test_step_mode_asks_before_each_step_and_records_the_answers(cluster, tr):
    import os
    import subprocess

    from helpers import INV, REPO, env

    inventory, state = cluster
    inv(state, "runbook.rollback", "etcd.existing", "--hosts", E1)

    def step_mode(answers: str) -> subprocess.CompletedProcess:
        e = dict(env(state), RUNBOOK_STEP_ANSWERS=answers)
        return subprocess.run([INV, "etcd.install", "--step"], cwd=REPO, env=e, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)

    quit_ = step_mode("quit")
    assert quit_.returncode == 4 and "stopped by the operator before etcd.existing" in quit_.stdout + quit_.stderr
    assert "initial-cluster-state: new" in sh(tr, inventory, E1, "cat /etc/etcd/etcd.conf.yml").stdout
    yes = step_mode("yes")
    assert yes.returncode == 0 and executed(yes.stdout) == 1
    with ledger(state) as db:
        answers = [r[0] for r in db.execute("select action from events where kind = 'answer' and host = ?", [E1])]
        mode = db.execute("select mode from checkpoints where host = ? and step = 'etcd.existing'", [E1]).fetchone()
    assert answers[-2:] == ["--step answer: quit", "--step answer: yes"] and mode == ("step",)
    assert os.path.exists(state / f"{NAME}.db")


def test_dry_run_shows_plan_and_diff_without_changing_anything(cluster, tr):
    inventory, state = cluster
    assert sh(tr, inventory, E3, "echo '# drift' >> /etc/etcd/etcd.conf.yml").ok
    out = inv(state, "etcd.install", "--dry", "--verify").stdout
    assert f"Plan for {NAME}" in out and "drifted" in out and "-# drift" in out
    assert "# drift" in sh(tr, inventory, E3, "cat /etc/etcd/etcd.conf.yml").stdout
    out = inv(state, "etcd.install", "--verify").stdout
    assert "etcd.config" in out and "# drift" not in sh(tr, inventory, E3, "cat /etc/etcd/etcd.conf.yml").stdout


def test_rolling_reload_and_restart(cluster):
    _, state = cluster
    assert "reload" in inv(state, "patroni.reload").stdout
    out = inv(state, "patroni.restart").stdout
    assert out.count("restart patroni_") == 2
    st = inv(state, "cluster.status").stdout
    assert "Leader" in st and "streaming" in st


def _secrets(state):
    return yaml.safe_load((state / "secrets.yml").read_text())


def _dsn(state, hosts=f"{ADDR[N1]},{ADDR[N2]}", user="admin", sslmode="verify-ca", **kw):
    s = _secrets(state)
    pw = kw.pop("password", s["admin"]["password"] if user == "admin" else None)
    parts = dict(host=hosts, port="5432", dbname="postgres", user=user, password=pw, sslmode=sslmode,
                 sslrootcert=str(state / "pki/ca.crt"), connect_timeout="3", target_session_attrs="read-write")
    parts.update(kw)
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


def test_secrets_and_keys_are_0600_and_owned_by_service_users(cluster, tr):
    inventory, state = cluster
    assert (state / "secrets.yml").stat().st_mode & 0o777 == 0o600
    assert (state / "pki/ca.key").stat().st_mode & 0o777 == 0o600
    for h in (N1, N2):
        r = sh(tr, inventory, h, "stat -c '%a %U' /opt/patroni/.tls/etcd-client.key /etc/patroni/config.yml; "
                                            "test -e /etc/patroni/post_bootstrap.sh && echo left || echo gone; "
                                            "systemctl show -p User patroni")
        # the bootstrap script is there for the first start only (10.8)
        assert r.stdout.split("\n")[:4] == ["600 postgres", "600 postgres", "gone", "User=postgres"]
    secrets = [v["password"] for v in _secrets(state).values()]
    with ledger(state) as db:
        dump = "\n".join(db.iterdump())
    assert not [s for s in secrets if s in dump]
    journal = sh(tr, inventory, N1, "journalctl --no-pager -u patroni; cat /data/log/*.log "
                                                      "/data/log/patroni/* 2>/dev/null").stdout
    assert not [s for s in secrets if s in journal]


def test_postgres_refuses_non_ssl_and_md5(cluster, tr):
    inventory, state = cluster
    with psycopg.connect(_dsn(state)) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0] is True
    with pytest.raises(psycopg.OperationalError, match="no encryption|reject"):
        psycopg.connect(_dsn(state, sslmode="disable"))
    lead = wait_for(lambda: _leader(state), 30)
    sql = ("SET password_encryption = 'md5'; DROP ROLE IF EXISTS md5user; "
           "CREATE ROLE md5user LOGIN PASSWORD 'md5-password-123';")
    r = sh(tr, inventory, lead, f"psql -X -h /var/run/postgresql -c \"{sql}\"", user="postgres")
    assert r.ok, r.stderr
    with pytest.raises(psycopg.OperationalError, match="password authentication failed|SCRAM|authentication"):
        psycopg.connect(_dsn(state, user="md5user", password="md5-password-123"))


def test_rest_api_refuses_unauthenticated_post_and_wrong_purpose_certificates(cluster):
    inventory, state = cluster
    pki = state / "pki"
    n1 = inventory.get(T("node01"))
    with_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with_cert.load_cert_chain(str(pki / N1 / "rest-client.crt"), str(pki / N1 / "rest-client.key"))
    req = urllib.request.Request(f"https://{N1}:8008/restart", data=b"{}", method="POST")
    req.full_url = f"https://{ADDR[N1]}:8008/restart"
    with_cert.check_hostname = False  # the certificate names the host and its address; we dial the address
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, context=with_cert, timeout=10)
    assert exc.value.code == 401
    no_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    no_cert.check_hostname = False
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(urllib.request.Request(f"https://{ADDR[N1]}:8008/patroni"),
                               context=no_cert, timeout=10).read()
    # server certificates (serverAuth only) are refused as client certificates, even of our CA and this host
    assert _tls_get(n1.address, 8008, "/patroni", pki / "ca.crt", pki / n1.name / "rest-client.crt",
                    pki / n1.name / "rest-client.key")[0] == 200
    for purpose in ("rest-server", "pg-server"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _tls_get(n1.address, 8008, "/patroni", pki / "ca.crt", pki / n1.name / f"{purpose}.crt",
                     pki / n1.name / f"{purpose}.key")


def _leader(state) -> str | None:
    with psycopg.connect(_dsn(state)) as conn:
        addr = conn.execute("select inet_server_addr()").fetchone()[0]
    return {ADDR[N1]: N1, ADDR[N2]: N2}.get(str(addr))


def test_switchover_there_and_back_under_a_writer_loses_nothing(cluster, tr):
    inventory, state = cluster
    lead = _leader(state)
    r = sh(tr, inventory, lead,
           "psql -X -h /var/run/postgresql -c 'CREATE TABLE IF NOT EXISTS writer (id int primary key); "
           "GRANT SELECT, INSERT ON writer TO admin'", user="postgres")
    assert r.ok, r.stderr
    acked, stop = [], threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 100000:
            i += 1
            try:
                with psycopg.connect(_dsn(state)) as conn:
                    conn.execute("insert into writer values (%s)", (i,))
                acked.append(i)
            except psycopg.Error:
                time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(2)
        first = inv(state, "patroni.switchover", "--force").stdout
        assert "switchover" in first and "new leader writable after" in first
        assert _leader(state) != lead
        inv(state, "patroni.switchover", "--force")
        assert _leader(state) == lead
        time.sleep(2)
    finally:
        stop.set()
        t.join(timeout=30)
    assert len(acked) > 20
    with psycopg.connect(_dsn(state)) as conn:
        present = {row[0] for row in conn.execute("select id from writer")}
    lost = [i for i in acked if i not in present]
    assert lost == [], f"{len(lost)} acknowledged rows lost"


def test_switchover_refused_when_precheck_fails(cluster):
    _, state = cluster
    p = inv(state, "patroni.switchover", "--force", "--candidate", E1, check=False)
    assert p.returncode != 0 and "refused by the pre-checks" in (p.stdout + p.stderr)


def test_losing_one_etcd_member_keeps_reads_and_writes(cluster, tr):
    inventory, state = cluster
    from runbook.lab import lab as labmod

    labmod.kill(inventory, E3)
    try:
        # if etcd03 led the raft, the others elect a new leader first (election-timeout 5000 ms, as in the
        # walk-through): writes may fail for a few seconds, then they must succeed
        def put_and_get():
            r = sh(tr, inventory, E1, f"ectl --endpoints=https://{E1}:2379,https://{E2}:2379 put /drill/k v"
                                      f" && ectl --endpoints=https://{E2}:2379 get /drill/k")
            return r.ok and "v" in r.stdout.split()

        wait_for(put_and_get, 30, 1)
        status = inv(state, "etcd.status").stdout
        assert E3 in status and "down" in status
        assert inv(state, "etcd.health", check=False).returncode != 0
    finally:
        labmod.start(inventory, E3)
    wait_for(lambda: inv(state, "etcd.health", check=False).returncode == 0, 60, 2)
