"""Templates rendered for etcd01 and node01 of the repo's hosts.yml, checked key by key against
the walk-through (shared/reference/walkthrough-patroni-etcd.ru.txt) and the DESIGN's security fixes."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import jinja2
import pytest
import yaml

from runbook.cluster.render import Paths, etcd_context, member_name, patroni_context, render, template_names
from runbook.inventory import load_inventory
from runbook.inventory.yamlio import UniqueKeyLoader

REPO = Path(__file__).resolve().parents[2]
TLS = "/opt/patroni/.tls"
ETLS = "/etc/etcd/tls"

# The walk-through's postgresql parameters (bootstrap.dcs.postgresql.parameters), verbatim.
WALKTHROUGH_PG_PARAMETERS = {
    "shared_buffers": "512MB", "wal_level": "replica", "wal_keep_size": "512MB", "max_connections": 100,
    "effective_cache_size": "1GB", "maintenance_work_mem": "256MB", "max_wal_senders": 5,
    "max_replication_slots": 5, "checkpoint_completion_target": 0.7, "log_connections": "on",
    "log_disconnections": "on", "log_statement": "ddl", "log_line_prefix": "%m [%p] %q%u@%d ",
    "logging_collector": "on", "log_destination": "stderr", "log_directory": "/data/log",
    "log_filename": "postgresql-%Y-%m-%d.log", "log_rotation_size": "100MB", "log_rotation_age": "1d",
    "log_min_duration_statement": -1, "log_min_error_statement": "error", "log_min_messages": "warning",
    "log_error_verbosity": "verbose", "log_hostname": "off", "log_duration": "off",
    "log_timezone": "Europe/Moscow", "timezone": "Europe/Moscow", "lc_messages": "C.UTF-8",
    "password_encryption": "scram-sha-256", "debug_print_parse": "off", "debug_print_rewritten": "off",
    "debug_print_plan": "off", "superuser_reserved_connections": 3, "synchronous_commit": "on",
    "synchronous_standby_names": "*", "hot_standby": "on", "compute_query_id": "on",
}


def _load(text: str) -> dict:
    return yaml.load(text, Loader=UniqueKeyLoader)  # duplicate keys are an error


def _walk_keys(obj: object, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}"
            yield from _walk_keys(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_keys(v, prefix)


FRONT_DOOR = ("haproxy/", "keepalived/", "pgbouncer/")


@pytest.fixture(scope="module")
def inv():
    return load_inventory(REPO / "hosts.yml")


@pytest.fixture(scope="module")
def secrets() -> dict:
    return {role: {"username": user, "password": f"{role}-Pw_0123456789abcdefghij"[:32]}
            for role, user in (("superuser", "postgres"), ("replication", "replicator"),
                               ("rewind", "rewind_user"), ("admin", "admin"), ("restapi", "patroni"),
                               ("etcd", "patroni"))}


@pytest.fixture(scope="module")
def ectx(inv) -> dict:
    return etcd_context(inv, inv.get("etcd01"), Paths())


@pytest.fixture(scope="module")
def pctx(inv, secrets) -> dict:
    return patroni_context(inv, inv.get("node01"), secrets, Paths())


@pytest.fixture(scope="module")
def patroni_text(pctx) -> str:
    return render("patroni/config.yml.j2", **pctx)


@pytest.fixture(scope="module")
def pcfg(patroni_text) -> dict:
    return _load(patroni_text)


def test_all_templates_listed() -> None:
    assert template_names() == [
        "etcd/ectl.sh.j2", "etcd/etcd.conf.yml.j2", "haproxy/haproxy.cfg.j2", "keepalived/check_haproxy.sh.j2",
        "keepalived/keepalived.conf.j2", "patroni/config.yml.j2", "patroni/post_bootstrap.sh.j2",
        "patroni/profile.sh.j2", "pgbackrest/backup.service.j2", "pgbackrest/backup.timer.j2", "pgbackrest/db.conf.j2",
        "pgbackrest/repo.conf.j2", "pgbackrest/server.service.j2", "pgbouncer/pgbouncer.ini.j2",
        "pgbouncer/userlist.txt.j2", "systemd/etcd.service.j2", "systemd/patroni.service.j2"]


def test_strict_undefined() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render("systemd/etcd.service.j2", paths={})


def test_paths_defaults() -> None:
    p = Paths()
    assert p.pgdata(15) == "/data/15" and p.pg_bin_dir(15) == "/usr/lib/postgresql/15/bin"
    assert p.etcd_tls_dir == ETLS and p.patroni_tls_dir == TLS
    assert Paths(etcd_tls_dir="/srv/tls").etcd_tls_dir == "/srv/tls"


# --------------------------------------------------------------------------- etcd

def test_etcd_config_walkthrough_values(ectx) -> None:
    cfg = _load(render("etcd/etcd.conf.yml.j2", **ectx))
    # one certificate per purpose; peers trust only the peer CA
    tls = {"cert-file": f"{ETLS}/etcd-server.crt", "key-file": f"{ETLS}/etcd-server.key",
           "client-cert-auth": True, "trusted-ca-file": f"{ETLS}/ca.crt"}
    peer = {"cert-file": f"{ETLS}/etcd-peer.crt", "key-file": f"{ETLS}/etcd-peer.key",
            "client-cert-auth": True, "trusted-ca-file": f"{ETLS}/peer-ca.crt"}
    assert cfg == {
        "name": "etcd01",
        "data-dir": "/var/lib/etcd/default",
        "listen-peer-urls": "https://0.0.0.0:2380",
        "listen-client-urls": "https://0.0.0.0:2379",
        "advertise-client-urls": "https://etcd01:2379",
        "initial-advertise-peer-urls": "https://etcd01:2380",
        "initial-cluster-token": "etcd_scope",
        "initial-cluster": "etcd01=https://etcd01:2380,etcd02=https://etcd02:2380,etcd03=https://etcd03:2380",
        "initial-cluster-state": "new",
        "election-timeout": 5000,
        "heartbeat-interval": 500,
        "auto-compaction-mode": "periodic",  # fix: etcd's default retention 0 never compacts
        "auto-compaction-retention": "1h",
        "quota-backend-bytes": 2 * 1024**3,
        "client-transport-security": tls,
        "peer-transport-security": peer,
    }


def test_etcd_config_existing_and_token(inv) -> None:
    ctx = etcd_context(inv, inv.get("etcd02"), Paths(), initial_cluster_state="existing", cluster_token="t2")
    cfg = _load(render("etcd/etcd.conf.yml.j2", **ctx))
    assert cfg["initial-cluster-state"] == "existing" and cfg["initial-cluster-token"] == "t2"
    assert cfg["name"] == "etcd02" and cfg["peer-transport-security"]["cert-file"] == f"{ETLS}/etcd-peer.crt"
    with pytest.raises(ValueError, match="new' or 'existing"):
        etcd_context(inv, inv.get("etcd02"), Paths(), initial_cluster_state="old")
    with pytest.raises(ValueError, match="no 'etcd' role"):
        etcd_context(inv, inv.get("node01"), Paths())


def _unit(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string(text)
    return cp


def test_etcd_unit(ectx) -> None:
    u = _unit(render("systemd/etcd.service.j2", **ectx))
    assert dict(u["Service"]) == {"User": "etcd", "Type": "notify",
                                  "ExecStart": "/usr/bin/etcd --config-file=/etc/etcd/etcd.conf.yml",
                                  "Restart": "always", "RestartSec": "5", "LimitNOFILE": "40000"}
    assert u["Unit"]["After"] == "network-online.target" and u["Unit"]["Wants"] == "network-online.target"
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_ectl_wrapper(ectx) -> None:
    text = render("etcd/ectl.sh.j2", **ectx)
    assert text.startswith("#!/bin/sh\n")
    assert f"--cacert={ETLS}/ca.crt" in text
    assert f"--cert={ETLS}/etcd-root.crt" in text and f"--key={ETLS}/etcd-root.key" in text
    assert "--endpoints=https://etcd01:2379,https://etcd02:2379,https://etcd03:2379" in text
    assert 'exec /usr/bin/etcdctl' in text and '"$@"' in text


# --------------------------------------------------------------------------- Patroni

def test_patroni_top_level_walkthrough_values(pcfg) -> None:
    assert pcfg["scope"] == "patroni_cluster" and pcfg["namespace"] == "/patroni"
    assert pcfg["name"] == "patroni_node01"
    assert pcfg["log"] == {"level": "INFO", "dir": "/data/log/patroni", "file_size": 50000000, "file_num": 10}
    tls = {"cafile": f"{TLS}/ca.crt", "certfile": f"{TLS}/rest-server.crt", "keyfile": f"{TLS}/rest-server.key"}
    assert pcfg["restapi"] == {"listen": "0.0.0.0:8008", "connect_address": "node01:8008",
                               "verify_client": "required", **tls,
                               "authentication": {"username": "patroni",
                                                  "password": "restapi-Pw_0123456789abcdefghij"}}
    assert pcfg["ctl"] == {"cacert": f"{TLS}/ca.crt", "certfile": f"{TLS}/rest-client.crt",
                           "keyfile": f"{TLS}/rest-client.key"}
    assert pcfg["etcd3"] == {"hosts": ["etcd01:2379", "etcd02:2379", "etcd03:2379"], "protocol": "https",
                             "cacert": f"{TLS}/ca.crt", "cert": f"{TLS}/etcd-client.crt",
                             "key": f"{TLS}/etcd-client.key", "username": "patroni",
                             "password": "etcd-Pw_0123456789abcdefghij"}
    assert pcfg["watchdog"] == {"mode": "off"}  # the string, not YAML's boolean
    assert pcfg["tags"] == {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False}


def test_patroni_bootstrap_dcs(pcfg) -> None:
    dcs = pcfg["bootstrap"]["dcs"]
    assert {k: v for k, v in dcs.items() if k != "postgresql"} == {
        "failsafe_mode": True, "ttl": 30, "loop_wait": 10, "retry_timeout": 10,
        "maximum_lag_on_failover": 1048576, "synchronous_mode": True, "synchronous_mode_strict": True,
        "synchronous_node_count": 1, "primary_start_timeout": 30}  # no permanent slot unless asked for
    pg = dcs["postgresql"]
    assert pg["use_pg_rewind"] is True and pg["use_slots"] is True
    params = pg["parameters"]
    for key, value in WALKTHROUGH_PG_PARAMETERS.items():
        assert params[key] == value, key
    assert params["ssl"] == "on"
    assert params["max_slot_wal_keep_size"] == "8GB"  # fix: a slot never retains WAL without bound
    # per-host paths must not be cluster-wide: a replica would start with the leader's certificate
    assert set(params) == set(WALKTHROUGH_PG_PARAMETERS) | {"ssl", "max_slot_wal_keep_size"}


def test_patroni_bootstrap_initdb_and_post_bootstrap(pcfg, pctx, secrets) -> None:
    b = pcfg["bootstrap"]
    assert b["initdb"] == ["encoding=UTF8", "data-checksums", "auth=scram-sha-256"]
    assert "users" not in b  # removed in Patroni 4: the admin user is made by post_bootstrap
    assert b["post_bootstrap"] == "/etc/patroni/post_bootstrap.sh"
    script = render("patroni/post_bootstrap.sh.j2", **pctx)
    assert script.startswith("#!/bin/sh\n")
    assert "CREATE ROLE admin LOGIN CREATEDB;" in script  # its password is set by patroni.roles
    assert not [v for v in secrets.values() if v["password"] in script]  # the script holds no password
    assert "/usr/lib/postgresql/17/bin/psql" in script  # the reference hosts.yml: Debian 13, PostgreSQL 17


def test_patroni_postgresql_section(pcfg, secrets) -> None:
    pg = pcfg["postgresql"]
    assert pg["listen"] == "0.0.0.0:5432" and pg["connect_address"] == "192.168.60.131:5432"
    assert pg["use_unix_socket"] is True
    assert pg["data_dir"] == pg["config_dir"] == "/data/17"
    assert pg["bin_dir"] == "/usr/lib/postgresql/17/bin"
    assert pg["pgpass"] == "/home/postgres/.pgpass_patroni"
    auth = pg["authentication"]
    assert auth["superuser"] == {"username": "postgres", "password": secrets["superuser"]["password"]}
    for role, user in (("replication", "replicator"), ("rewind", "rewind_user")):
        assert auth[role] == {"username": user, "password": secrets[role]["password"],
                              "sslmode": "verify-full", "sslrootcert": f"{TLS}/ca.crt"}
    assert pg["parameters"] == {"unix_socket_directories": "/var/run/postgresql",
                                "ssl_cert_file": f"{TLS}/pg-server.crt", "ssl_key_file": f"{TLS}/pg-server.key",
                                "ssl_ca_file": f"{TLS}/ca.crt"}
    assert pg["create_replica_methods"] == ["basebackup"]
    assert pg["basebackup"] == {"max-rate": "100M", "checkpoint": "fast"}


def test_no_removed_or_wrong_keys(pcfg, patroni_text) -> None:
    keys = list(_walk_keys(pcfg))
    assert not [k for k in keys if k.rsplit(".", 1)[-1].startswith("master_")]
    assert not [k for k in keys if k.endswith("synchronous_mode_count")]
    assert "master" not in patroni_text.replace("master_start_timeout was removed", "")


def test_pg_hba_once_and_safe(pcfg, patroni_text) -> None:
    assert patroni_text.count("pg_hba:") == 1
    assert "pg_hba" not in pcfg["bootstrap"]["dcs"]["postgresql"]
    hba = pcfg["postgresql"]["pg_hba"]
    assert hba == [
        "local all all peer",
        "hostnossl all all 0.0.0.0/0 reject",
        "hostnossl replication all 0.0.0.0/0 reject",
        "hostssl replication replicator 127.0.0.1/32 scram-sha-256",
        "hostssl replication replicator 192.168.60.131/32 scram-sha-256",
        "hostssl replication replicator 192.168.60.132/32 scram-sha-256",
        "hostssl all postgres 127.0.0.1/32 scram-sha-256",
        "hostssl all postgres 192.168.60.131/32 scram-sha-256",
        "hostssl all postgres 192.168.60.132/32 scram-sha-256",
        "hostssl all postgres 0.0.0.0/0 reject",
        "hostssl all all 127.0.0.1/32 scram-sha-256",
        "hostssl all all 192.168.60.0/24 scram-sha-256",
    ]
    for rule in hba:
        f = rule.split()
        assert "md5" not in f and "trust" not in f and "password" not in f
        assert f[0] in ("local", "hostssl", "hostnossl")
        assert f[0] != "hostnossl" or f[-1] == "reject"


def test_pg_hba_custom_networks(inv, secrets) -> None:
    ctx = patroni_context(inv, inv.get("node02"), secrets, Paths(), networks=["10.0.0.0/8"])
    hba = _load(render("patroni/config.yml.j2", **ctx))["postgresql"]["pg_hba"]
    assert "hostssl all all 10.0.0.0/8 scram-sha-256" in hba
    assert "hostssl all all 192.168.60.0/24 scram-sha-256" not in hba
    with pytest.raises(ValueError):
        patroni_context(inv, inv.get("node02"), secrets, Paths(), networks=["not-a-net"])


def test_tls_everywhere(pcfg) -> None:
    assert pcfg["etcd3"]["protocol"] == "https"
    assert all(pcfg["restapi"][k] for k in ("cafile", "certfile", "keyfile"))
    assert pcfg["restapi"]["verify_client"] == "required"
    assert pcfg["bootstrap"]["dcs"]["postgresql"]["parameters"]["ssl"] == "on"


def test_node02_differs_only_where_the_walkthrough_says(inv, secrets, pcfg) -> None:
    other = _load(render("patroni/config.yml.j2", **patroni_context(inv, inv.get("node02"), secrets, Paths())))
    assert other["name"] == member_name(inv.get("node02")) == "patroni_node02"
    assert other["restapi"]["connect_address"] == "node02:8008"
    assert other["postgresql"]["connect_address"] == "192.168.60.132:5432"
    assert other["bootstrap"] == json.loads(json.dumps(pcfg["bootstrap"]).replace("node01", "node02"))


def test_patroni_context_rejects_bad_input(inv, secrets) -> None:
    with pytest.raises(ValueError, match="no 'postgres' role"):
        patroni_context(inv, inv.get("etcd01"), secrets, Paths())
    bad = {**secrets, "admin": {"username": "admin", "password": "it's'; DROP"}}
    with pytest.raises(ValueError, match="admin password"):
        patroni_context(inv, inv.get("node01"), bad, Paths())
    with pytest.raises(ValueError, match="rewind needs"):
        patroni_context(inv, inv.get("node01"), {k: v for k, v in secrets.items() if k != "rewind"}, Paths())


def test_patroni_unit(pctx) -> None:
    u = _unit(render("systemd/patroni.service.j2", **pctx))
    s = u["Service"]
    assert s["User"] == "postgres" and s["Type"] == "simple"
    assert s["ExecStart"] == "/opt/patroni/bin/patroni /etc/patroni/config.yml"
    assert s["KillMode"] == "process" and s["Restart"] in ("always", "on-failure")
    assert (s["RestartSec"], s["TimeoutSec"]) == ("5", "30")
    assert int(s["LimitNOFILE"]) >= 65536  # PostgreSQL inherits it: 1000 files per backend + sockets
    assert s["RuntimeDirectory"] == "postgresql" and s["RuntimeDirectoryPreserve"] == "yes"
    assert u["Unit"]["After"] == "network-online.target"
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_profile(pctx) -> None:
    text = render("patroni/profile.sh.j2", **pctx)
    assert "export PATRONI_CONFIG_FILE=/etc/patroni/config.yml" in text
    assert "export PATRONICTL_CONFIG_FILE=/etc/patroni/config.yml" in text
    assert "export PG_CONFIG=/usr/lib/postgresql/17/bin/pg_config" in text
    assert 'PATH="$PATH:/usr/lib/postgresql/17/bin:/opt/patroni/bin"' in text


def test_rendered_files_end_with_newline_and_no_secrets_outside_config(pctx, ectx, secrets) -> None:
    for name in template_names():
        if name.startswith(FRONT_DOOR) or name.startswith("pgbackrest/"):
            continue  # rendered with their own contexts: tests/unit/test_frontdoor.py, tests/unit/test_backup.py
        ctx = ectx if name.startswith(("etcd/", "systemd/etcd")) else pctx
        text = render(name, **ctx)
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        if name in ("systemd/patroni.service.j2", "patroni/profile.sh.j2"):
            assert not any(e["password"] in text for e in secrets.values()), name


def test_paths_pg_major(inv, secrets) -> None:
    p = Paths(pg_major=15)
    assert p.pgdata() == "/data/15" and p.pg_bin_dir() == "/usr/lib/postgresql/15/bin"
    assert p.pgdata(16) == "/data/16"
    with pytest.raises(ValueError, match="major unknown"):
        Paths().pgdata()
    p = Paths(pg_major=17)
    assert patroni_context(inv, inv.get("node01"), secrets, p)["data_dir"] == "/data/17"
    with pytest.raises(ValueError, match="pg_major=16"):
        patroni_context(inv, inv.get("node01"), secrets, Paths(pg_major=16))
