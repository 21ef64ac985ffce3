"""Scenarios for the latent outages of issue 10 on real hosts: WAL held by replication slots, and etcd upkeep.

A converged cluster keeps no inactive slot that retains WAL; a slot left in the DCS by an old deployment
(the walk-through's permanent `prod_replica1`) is removed by a plain `cluster.up`; `cluster.audit` reports
an idle slot that holds WAL back; `etcd.maintain` defragments every member and leaves a verified 0600
snapshot on this machine. Host names come from the e2e inventory. Every wait is a bounded poll.
"""
from __future__ import annotations

import json
import re
import shlex
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, executed, inv, ledger, wait_for

pytestmark = pytest.mark.e2e
OLD_SLOT = "prod_replica1"  # the walk-through's permanent slot, as a deployment before the fix had it
IDLE_SLOT = "runbook_e2e_idle"
SLOTS_SQL = ("select slot_name || '|' || active || '|' || coalesce(pg_wal_lsn_diff(case when pg_is_in_recovery() "
             "then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end, restart_lsn), 0)::bigint "
             "from pg_replication_slots where restart_lsn is not null")
RETAINED_LIMIT = 16 * 1024**2


@pytest.fixture(scope="module")
def tr(converged):
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


def _ctx(inventory, tr):
    from runbook.cluster.context import Ctx

    return Ctx(inventory=inventory, transport=tr, state_dir=Path("/nonexistent"), bundle_dir=Path("/nonexistent"))


def _psql(inventory, tr, host, sql: str) -> str:
    from runbook.cluster.commands import psql

    r = tr.run(host, psql(_ctx(inventory, tr), f"-tAc {shlex.quote(sql)}"), user="postgres", timeout=120)
    assert r.ok, f"{host.name}: {r.stderr}"
    return r.stdout.strip()


def _ctl(inventory, tr, args: str, host=None) -> str:
    from runbook.cluster.commands import patronictl

    host = host or inventory.postgres[0]
    r = tr.run(host, patronictl(_ctx(inventory, tr), args), user="postgres", timeout=120)
    assert r.ok, f"patronictl {args} on {host.name}: {r.stderr}"
    return r.stdout


def _slots(inventory, tr, host) -> dict[str, tuple[bool, int]]:
    out = _psql(inventory, tr, host, SLOTS_SQL)
    return {n: (a == "t", int(b)) for n, a, b in (ln.split("|") for ln in out.splitlines() if ln.strip())}


def _leader(inventory, tr):
    members = json.loads(_ctl(inventory, tr, "list -f json"))
    name = next(m["Member"] for m in members if m["Role"] == "Leader" and m["State"] == "running")
    return next(h for h in inventory.postgres if name == f"patroni_{h.name}")


def test_no_inactive_slot_retains_wal_after_cluster_up(converged, tr):
    inventory, _ = converged
    dcs = yaml.safe_load(_ctl(inventory, tr, "show-config"))
    assert "slots" not in dcs and dcs["postgresql"]["parameters"]["max_slot_wal_keep_size"] == "8GB"
    for h in inventory.postgres:
        wait_for(lambda h=h: _psql(inventory, tr, h, "show max_slot_wal_keep_size") == "8GB", 60)
        slots = _slots(inventory, tr, h)
        assert OLD_SLOT not in slots, (h.name, slots)
        idle = {n: b for n, (active, b) in slots.items() if not active and b >= RETAINED_LIMIT}
        assert idle == {}, (h.name, slots)


def _put_back_the_old_slot(inventory, tr) -> None:
    """What a deployment before the fix left in the DCS: the permanent slot, and no bound on slot WAL."""
    leader = _leader(inventory, tr)
    _ctl(inventory, tr, f"edit-config --force --quiet --set slots.{OLD_SLOT}.type=physical "
                        "--pg max_slot_wal_keep_size=-1")
    wait_for(lambda: OLD_SLOT in _slots(inventory, tr, leader), 60)  # Patroni created it, WAL reserved


def _assert_the_slot_is_gone(inventory, tr) -> None:
    dcs = yaml.safe_load(_ctl(inventory, tr, "show-config"))
    assert "slots" not in dcs and dcs["postgresql"]["parameters"]["max_slot_wal_keep_size"] == "8GB"
    for h in inventory.postgres:  # Patroni drops the slot on every member within a few HA loops
        wait_for(lambda h=h: OLD_SLOT not in _slots(inventory, tr, h), 90)
        wait_for(lambda h=h: _psql(inventory, tr, h, "show max_slot_wal_keep_size") == "8GB", 60)


def test_cluster_up_removes_the_slot_an_old_deployment_left_in_the_dcs(converged, tr):
    inventory, state = converged
    first = inventory.postgres[0].name
    _put_back_the_old_slot(inventory, tr)
    inv(state, "runbook.forget", "patroni.dynamic", "--hosts", first)  # an old ledger has no such step
    out = inv(state, "cluster.up").stdout
    assert re.search(r"▶ patroni\.dynamic[^▶]*✓ " + re.escape(first), out), out[-3000:]
    _assert_the_slot_is_gone(inventory, tr)
    with ledger(state) as db:
        assert db.execute("select status from checkpoints where step = 'patroni.dynamic'").fetchone()[0] == "done"
    assert executed(inv(state, "cluster.up").stdout) == 0  # in line now: nothing runs
    # the same put back by hand after the step was recorded done: --verify finds it and repairs it
    _put_back_the_old_slot(inventory, tr)
    out = inv(state, "cluster.up", "--verify", timeout=900).stdout
    assert re.search(r"▶ patroni\.dynamic[^▶]*✓ " + re.escape(first), out), out[-3000:]
    _assert_the_slot_is_gone(inventory, tr)


def test_audit_reports_an_idle_slot_that_retains_wal(converged, tr):
    inventory, state = converged
    leader = _leader(inventory, tr)
    _ctl(inventory, tr, "pause --wait")  # paused, Patroni leaves an unknown slot alone (it drops it otherwise)
    try:
        _psql(inventory, tr, leader, f"select pg_create_physical_replication_slot('{IDLE_SLOT}', true)")
        # 32 MB of WAL without creating any object: non-transactional logical messages
        _psql(inventory, tr, leader, "select count(pg_logical_emit_message(false, 'runbook-e2e', "
                                     "repeat('x', 1048576))) from generate_series(1, 32)")
        _psql(inventory, tr, leader, "select pg_switch_wal()")
        p = inv(state, "cluster.audit", check=False)
        assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-1000:]
        m = re.search(rf"slot {IDLE_SLOT} is inactive and retains (\d+) MB of WAL", p.stdout)
        assert m and int(m.group(1)) >= 30, p.stdout[-3000:]
    finally:
        _psql(inventory, tr, leader, f"select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                                     f"where slot_name = '{IDLE_SLOT}'")
        _ctl(inventory, tr, "resume --wait")
    assert IDLE_SLOT not in _slots(inventory, tr, leader)


def _etcdutl(tmp_path: Path) -> str:
    """etcdutl from the bundle's etcd (the release tarball on Debian 12, the etcd-server .deb on Debian 13: a
    static binary either way): checks the snapshot independently of the procedure."""
    dest = tmp_path / "etcdutl"
    tarball = next((REPO / "bundle" / "etcd").glob("etcd-v*-linux-amd64.tar.gz"), None)
    if tarball is not None:
        with tarfile.open(tarball) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("/etcdutl"))
            dest.write_bytes(tf.extractfile(member).read())
    else:
        deb = next((REPO / "bundle" / "debs").glob("*/etcd-server_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "etcd-server")], check=True, timeout=60)
        dest.write_bytes((tmp_path / "etcd-server/usr/bin/etcdutl").read_bytes())
    dest.chmod(0o755)
    return str(dest)


def test_etcd_maintain_defrags_every_member_and_saves_a_verified_snapshot(converged, tmp_path):
    inventory, state = converged
    dry = inv(state, "etcd.maintain", "--dry").stdout
    assert "dry run" in dry and not (state / "etcd-snapshots").exists()
    out = inv(state, "etcd.maintain", timeout=600).stdout
    flat = " ".join(out.split())
    for h in inventory.etcd:
        assert f"✓ {h.name} defragmented" in flat, out
    snaps = sorted((state / "etcd-snapshots").glob("*.db"))
    assert len(snaps) == 1
    snap = snaps[0]
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600 and stat.S_IMODE(snap.parent.stat().st_mode) == 0o700
    st = json.loads(subprocess.run([_etcdutl(tmp_path), "snapshot", "status", "-w", "json", str(snap)],
                                   capture_output=True, text=True, check=True, timeout=60).stdout)
    assert st["revision"] > 0 and st["totalKey"] > 0
    inv(state, "etcd.health")  # every member healthy after the maintenance
    with ledger(state) as db:
        kinds = [r[0] for r in db.execute("select kind from events where step = 'etcd.maintain' order by id")]
    assert kinds[0] == "survey" and kinds.count("defrag") == len(inventory.etcd) and "snapshot" in kinds


def test_superuser_logs_in_over_tcp_only_from_the_postgres_hosts(converged, tr):
    import psycopg

    inventory, state = converged
    s = yaml.safe_load((state / "secrets.yml").read_text())
    node, other = inventory.postgres[0], inventory.postgres[1]

    def dsn(role: str) -> str:
        return (f"host={node.address} port=5432 dbname=postgres user={s[role]['username']} "
                f"password={s[role]['password']} sslmode=verify-ca sslrootcert={state / 'pki/ca.crt'} "
                "connect_timeout=5")

    with psycopg.connect(dsn("admin")) as conn:  # this machine is in the client network: other roles log in
        assert conn.execute("select 1").fetchone() == (1,)
    superuser = s["superuser"]["username"]
    with pytest.raises(psycopg.OperationalError, match=rf'pg_hba.conf rejects connection .*user "{superuser}"'):
        psycopg.connect(dsn("superuser"))
    # from another PostgreSQL host the superuser still logs in over TLS (the password on stdin, not in argv)
    from runbook.cluster.render import Paths

    conninfo = (f"host={node.address} dbname=postgres user={s['superuser']['username']} sslmode=verify-ca "
                f"sslrootcert={Paths().patroni_tls_dir}/ca.crt connect_timeout=5")
    r = tr.run(other, f"PGPASSWORD=$(cat) {Paths(pg_major=inventory.cluster.postgres_major).pg_bin_dir()}/psql -XtA "
                      f"{shlex.quote(conninfo)} -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()'",
               user="postgres", stdin=s["superuser"]["password"].encode(), timeout=60)
    assert r.ok and r.stdout.strip() == "t", r.stderr
