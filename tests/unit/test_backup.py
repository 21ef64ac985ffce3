"""pgBackRest: inventory role and settings, rendered configuration, the dynamic config it adds, steps and hosts,
`pgbackrest info` parsing, the restore's target time, the audit warning."""
from __future__ import annotations

import configparser
import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from runbook.cluster.context import Ctx
from runbook.cluster.dynamic import desired_dynamic
from runbook.cluster.render import patroni_context, render
from runbook.core.context import Options
from runbook.core.testing import FakeTransport
from runbook.errors import ProcedureFailed
from runbook.inventory import InventoryError, load_inventory
from runbook.procedures import backup_ops, restore
from runbook.sections import backup as sec

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def with_backup(tmp_path: Path, extra: dict | None = None, backup: dict | None = None) -> Path:
    doc = yaml.safe_load((ROOT / "hosts.yml").read_text())
    doc["hosts"]["backup01"] = {"address": "192.168.60.151", "roles": ["backup"]}
    doc["hosts"]["spare01"] = {"address": "192.168.60.161", "roles": ["restore"]}
    doc["hosts"].update(extra or {})
    if backup is not None:
        doc["cluster"]["backup"] = backup
    p = tmp_path / "hosts.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture
def binv(tmp_path):
    return load_inventory(with_backup(tmp_path))


@pytest.fixture
def bctx(binv, tmp_path):
    return Ctx(inventory=binv, transport=FakeTransport(), state_dir=tmp_path / "state", bundle_dir=tmp_path / "b",
               options=Options(dry=True))


def ini(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)  # tls-server-auth repeats on purpose
    cp.read_string(text)
    return cp


# -- inventory ----------------------------------------------------------------------------------------------
def test_backup_role_and_defaults(binv, inv):
    assert binv.backup is not None and binv.backup.name == "backup01"
    assert [h.name for h in binv.role("restore")] == ["spare01"]
    b = binv.cluster.backup
    assert (b.retention_full, b.full_schedule, b.diff_schedule) == (2, "Sun *-*-* 01:00:00", "Mon..Sat *-*-* 01:00:00")
    assert inv.backup is None  # the repo's hosts.yml: no backups configured


@pytest.mark.parametrize("extra, backup, msg", [
    ({"backup02": {"address": "192.168.60.152", "roles": ["backup"]}}, None, "2 backup hosts"),
    ({"node03": {"address": "192.168.60.133", "roles": ["postgres", "backup"]}}, None, "a host of its own"),
    ({}, {"retention_full": 0}, "cluster.backup.retention_full"),
    ({}, {"full_schedule": "weekly; rm -rf /"}, "not a systemd calendar expression"),
    ({}, {"archive_push_queue_max": "lots"}, "is not a size"),
])
def test_bad_backup_inventory_is_one_clear_error(tmp_path, extra, backup, msg):
    with pytest.raises(InventoryError, match=msg):
        load_inventory(with_backup(tmp_path, extra, backup))


# -- rendered configuration -------------------------------------------------------------------------------
def test_repo_config(bctx, binv):
    put = sec.conf_file(bctx, binv.get("backup01"))
    assert put.path == "/etc/pgbackrest/pgbackrest.conf" and put.mode == "0640" and put.group == "postgres"
    text = put.content.decode()
    cp = ini(text)
    g, st = cp["global"], cp["patroni_cluster"]
    assert g["repo1-path"] == "/var/lib/pgbackrest" and g["repo1-retention-full"] == "2"
    assert g["start-fast"] == "y" and g["tls-server-cert-file"] == "/etc/pgbackrest/tls/backup01-pgbackrest.crt"
    # every PostgreSQL host as pgN-host over TLS with the repository's client certificate
    assert [st[f"pg{i}-host"] for i in (1, 2)] == ["node01", "node02"]
    assert st["pg1-host-type"] == st["pg2-host-type"] == "tls" and st["pg2-path"] == bctx.paths.pgdata()
    assert st["pg1-host-key-file"] == "/etc/pgbackrest/tls/backup01-pgbackrest.key"
    # only the PostgreSQL and restore hosts' certificates may talk to the repository, for this stanza only
    auth = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("tls-server-auth=")]
    assert auth == ["node01-pgbackrest=patroni_cluster", "node02-pgbackrest=patroni_cluster",
                    "spare01-pgbackrest=patroni_cluster"]
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_postgres_and_restore_host_config(bctx, binv):
    pg = ini(sec.conf_file(bctx, binv.get("node02")).content.decode())
    g = pg["global"]
    assert (g["repo1-host"], g["repo1-host-type"], g["repo1-host-port"]) == ("backup01", "tls", "8432")
    assert g["repo1-host-cert-file"] == "/etc/pgbackrest/tls/node02-pgbackrest.crt"
    assert g["archive-push-queue-max"] == "4GiB" and g["start-fast"] == "y"
    assert g["tls-server-auth"] == "backup01-pgbackrest=patroni_cluster"  # only the repository asks for backups
    assert pg["patroni_cluster"]["pg1-path"] == bctx.paths.pgdata()
    spare = ini(sec.conf_file(bctx, binv.get("spare01")).content.decode())
    assert "tls-server-address" not in spare["global"]  # no server: nobody connects to a restore host
    assert spare["patroni_cluster"]["pg1-path"] == sec.RESTORE_PGDATA


def test_timers_and_units(bctx):
    files = {p.path: p.content.decode() for p in sec.timer_files(bctx)}
    assert "OnCalendar=Sun *-*-* 01:00:00" in files["/etc/systemd/system/pgbackrest-full.timer"]
    assert "OnCalendar=Mon..Sat *-*-* 01:00:00" in files["/etc/systemd/system/pgbackrest-diff.timer"]
    assert "--stanza=patroni_cluster --type=diff backup" in files["/etc/systemd/system/pgbackrest-diff.service"]
    unit = render("pgbackrest/server.service.j2", stanza="s")
    assert "User=postgres" in unit and "ExecStart=/usr/bin/pgbackrest server" in unit


def test_dynamic_config_archives_only_with_a_backup_host(binv, inv):
    params = desired_dynamic(binv)["postgresql"]["parameters"]
    assert params["archive_mode"] == "on"
    assert params["archive_command"] == "pgbackrest --stanza=patroni_cluster archive-push %p"
    assert "archive_mode" not in desired_dynamic(inv)["postgresql"]["parameters"]


def test_replicas_restore_from_the_repository_first(binv, inv):
    s = {role: {"username": user, "password": f"{role}-Pw_0123456789abcdefghij"[:32]}
         for role, user in (("superuser", "postgres"), ("replication", "replicator"), ("rewind", "rewind_user"),
                            ("admin", "admin"), ("restapi", "patroni"), ("etcd", "patroni"))}
    with_b = yaml.safe_load(render("patroni/config.yml.j2", **patroni_context(binv, binv.get("node02"), s)))
    assert with_b["postgresql"]["create_replica_methods"] == ["pgbackrest", "basebackup"]
    assert "--stanza=patroni_cluster" in with_b["postgresql"]["pgbackrest"]["command"]
    without = yaml.safe_load(render("patroni/config.yml.j2", **patroni_context(inv, inv.get("node02"), s)))
    assert without["postgresql"]["create_replica_methods"] == ["basebackup"]


# -- steps and hosts ----------------------------------------------------------------------------------------
def test_section_hosts(bctx, binv, ctx, inv):
    steps = {s.name: s for s in sec.section.steps}
    names = lambda c, s: [h.name for h in steps[s].hosts(c, list(c.inventory.hosts))]  # noqa: E731
    assert names(bctx, "backup.packages") == ["node01", "node02", "backup01", "spare01"]
    assert names(bctx, "backup.server") == ["node01", "node02", "backup01"]  # not on a restore host
    for s in ("backup.stanza", "backup.check", "backup.full", "backup.timers"):
        assert names(bctx, s) == ["backup01"]
    assert all(names(ctx, s) == [] for s in steps)  # without a backup host the section is skipped
    assert steps["backup.check"].always_check


def test_certificate_per_host_and_purpose(tmp_path, binv):
    from runbook.credentials.pki import Pki

    c = Ctx(inventory=binv, transport=FakeTransport(), state_dir=tmp_path / "s", bundle_dir=tmp_path / "b",
            options=Options())
    c.pki = Pki(tmp_path / "pki")
    from cryptography import x509

    from runbook.core.step import Put
    from runbook.sections.tls_files import host_purposes, leaf

    lf = leaf(c, binv.get("node01"), "pgbackrest")
    cert = x509.load_pem_x509_certificate(lf.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=node01-pgbackrest"
    assert lf.key_path == c.pki.dir / "node01" / "pgbackrest.key"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node01" in sans.get_values_for_type(x509.DNSName)  # the repository verifies the server by name
    others = {leaf(c, binv.get("node01"), p).key_pem for p in ("pg-server", "rest-client")}
    assert lf.key_pem not in others  # its own key
    puts = {a.path: a for a in sec.tls.actions_fn(c, binv.get("node01")) if isinstance(a, Put)}
    assert set(puts) == {"/etc/pgbackrest/tls/ca.crt", "/etc/pgbackrest/tls/node01-pgbackrest.crt",
                         "/etc/pgbackrest/tls/node01-pgbackrest.key"}  # the names pgbackrest.conf gives
    assert puts["/etc/pgbackrest/tls/node01-pgbackrest.key"].mode == "0600"
    # a purpose of every host of the backup (the repository and restore hosts too), and only with a backup host
    assert {h.name for h in binv.hosts if "pgbackrest" in [p.name for p in host_purposes(h, binv)]} == \
        {h.name for h in binv.hosts if h.has("postgres") or h.has("backup") or h.has("restore")}


def test_restore_steps_mark_the_wipe_irreversible(bctx, binv):
    t = dt.datetime(2026, 11, 29, 23, 1, 2, 500000, tzinfo=dt.UTC)
    steps = restore.restore_steps(bctx, binv.get("spare01"), t)
    assert [s.name for s in steps] == ["backup.restore.archived", "backup.restore.wipe", "backup.restore.restore",
                                       "backup.restore.start"]
    assert [s.name for s in steps if s.irreversible] == ["backup.restore.wipe"]
    cmd = steps[2].actions_fn(bctx, binv.get("spare01"))[1].cmd
    assert "--type=time --target='2026-11-29 23:01:02.500000+00'" in cmd and "--archive-mode=off" in cmd
    assert [h.name for h in steps[1].hosts(bctx, list(binv.hosts))] == ["spare01"]
    assert "select txid_current()" in steps[0].actions_fn(bctx, binv.get("node01"))[0].cmd  # a commit after T
    other = restore.restore_steps(bctx, binv.get("spare01"), t + dt.timedelta(seconds=1))
    for a, b in zip(steps, other, strict=True):  # a resumed run with another T: all but the wipe run again
        h = a.hosts(bctx, list(binv.hosts))[0]
        same = a.fingerprint(bctx, h, a.actions_fn(bctx, h)) == b.fingerprint(bctx, h, b.actions_fn(bctx, h))
        assert same == (a.name == "backup.restore.wipe"), a.name


def test_restore_refuses_a_cluster_member(bctx):
    with pytest.raises(ProcedureFailed, match="not a host with role restore"):
        restore.restore_host(bctx, "node01")
    assert restore.restore_host(bctx, None).name == "spare01"


@pytest.mark.parametrize("text, msg", [("yesterday", "not an ISO 8601"), ("2026-11-29T23:00:00", "no time zone"),
                                       ("2999-01-01T00:00:00Z", "in the future")])
def test_target_time_errors(text, msg):
    with pytest.raises(ProcedureFailed, match=msg):
        restore.parse_target_time(text)


def test_target_time_normalised_to_utc():
    t = restore.parse_target_time("2026-11-29T23:01:02+03:00")
    assert restore.pg_time(t) == "2026-11-29 20:01:02.000000+00"


def test_backup_run_rejects_an_unknown_type(bctx):
    with pytest.raises(ProcedureFailed, match="use one of full, diff, incr"):
        backup_ops.run_steps(bctx, "weekly")
    assert [s.name for s in backup_ops.run_steps(bctx, "diff")] == ["backup.run.backup"]


# -- pgbackrest info ------------------------------------------------------------------------------------------
INFO = json.dumps([{
    "archive": [{"database": {"id": 1, "repo-key": 1}, "id": "15-1", "max": "000000020000000000000009",
                 "min": "000000010000000000000003"}],
    "backup": [
        {"archive": {"start": "000000010000000000000005", "stop": "000000010000000000000006"},
         "error": False, "info": {"delta": 100, "repository": {"delta": 2048, "size": 2048}, "size": 30000000},
         "label": "20261129-223000F", "timestamp": {"start": 1796077800, "stop": 1796077812}, "type": "full"},
        {"archive": {"start": "000000020000000000000008", "stop": "000000020000000000000008"},
         "error": False, "info": {"delta": 10, "repository": {"delta": 512, "size": 512}, "size": 30000000},
         "label": "20261129-223000F_20261129-224000D", "timestamp": {"start": 1796078400, "stop": 1796078404},
         "type": "diff"}],
    "name": "patroni_cluster", "status": {"code": 0, "message": "ok"}}])


def test_parse_info():
    info = backup_ops.parse_info(INFO, "patroni_cluster")
    assert [b.type for b in info.backups] == ["full", "diff"] and info.backups[0].seconds == 12
    assert (info.wal_min, info.wal_max, info.status) == ("000000010000000000000003", "000000020000000000000009", "ok")
    doc = backup_ops.info_doc(info)
    assert doc["backups"][1]["label"].endswith("D") and doc["backups"][0]["repo_bytes"] == 2048
    with pytest.raises(ProcedureFailed, match="no stanza 'other'"):
        backup_ops.parse_info(INFO, "other")
    with pytest.raises(ProcedureFailed, match="no JSON"):
        backup_ops.parse_info("ERROR: [056]", "patroni_cluster")


def test_check_backups():
    info = backup_ops.parse_info(INFO, "patroni_cluster")
    soon = info.backups[-1].stop + dt.timedelta(days=1)
    assert backup_ops.check_backups(info, soon) == []
    assert "over 8 days old" in backup_ops.check_backups(info, soon + dt.timedelta(days=8))[0]
    empty = backup_ops.parse_info(json.dumps([{"name": "s", "backup": [], "status": {"code": 2, "message":
                                                                                      "no valid backups"}}]), "s")
    assert [p.split(":")[1].strip() for p in backup_ops.check_backups(empty, soon)] == [
        "no valid backups (pgbackrest info status 2)", "no full backup (inv backup.run --type full)"]


def test_audit_warns_without_backups(ctx):
    check = backup_ops.audit_backup(ctx)
    assert check.problems == [] and check.warnings == [backup_ops.NO_BACKUPS]
    assert "no backups configured" in check.warnings[0]
