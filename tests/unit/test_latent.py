"""Issue 10 (latent outages of a deployed cluster), items 1, 2 and 8 in part: the inventory settings, the
rendered files that carry them, and patroni.dynamic's desired-vs-DCS patch (the same code runs on the host)."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runbook.cluster.dynamic import EXACT, config_patch, desired_dynamic, dynamic_command, remote_script
from runbook.cluster.render import Paths, etcd_context, patroni_context, render
from runbook.inventory import InventoryError, load_inventory

REPO = Path(__file__).resolve().parents[2]
SECRETS = {role: {"username": user, "password": f"{role}-Pw_0123456789abcdefghij"[:32]}
           for role, user in (("superuser", "postgres"), ("replication", "replicator"),
                              ("rewind", "rewind_user"), ("admin", "admin"), ("restapi", "patroni"),
                              ("etcd", "patroni"))}
# `patronictl show-config` of a cluster installed before the fix (a-* lab, 2026-11), trimmed.
OLD_DCS = """failsafe_mode: true
loop_wait: 10
postgresql:
  parameters:
    max_connections: 100
    wal_keep_size: 512MB
  use_pg_rewind: true
  use_slots: true
slots:
  prod_replica1:
    type: physical
synchronous_mode: true
ttl: 30
"""


def _inv_with(tmp_path: Path, cluster_extra: str = ""):
    """The repo's hosts.yml with extra cluster: settings (YAML lines, indented by two spaces)."""
    text = (REPO / "hosts.yml").read_text().replace("cluster:\n", "cluster:\n" + cluster_extra, 1)
    (tmp_path / "hosts.yml").write_text(text)
    return load_inventory(tmp_path / "hosts.yml")


# -- inventory settings --------------------------------------------------------------------------
def test_defaults_no_slot_bounded_wal_compaction_on(tmp_path) -> None:
    c = _inv_with(tmp_path).cluster
    assert c.permanent_slots == {}
    assert (c.max_slot_wal_keep_size, c.etcd_auto_compaction_retention, c.etcd_quota_backend_bytes) == \
        ("8GB", "1h", 2 * 1024**3)


@pytest.mark.parametrize("extra, message", [
    ("  permanent_slots: {backup_rx: {}}\n", "permanent_slots.backup_rx.reason: required key 'reason' is missing"),
    ("  permanent_slots: {backup_rx: {reason: ' '}}\n", "a permanent slot needs a reason"),
    ("  permanent_slots: {Backup-1: {reason: x}}\n", "'Backup-1': not a replication slot name"),
    ("  max_slot_wal_keep_size: 8G\n", "'8G' is not a PostgreSQL size"),
    ("  etcd_auto_compaction_retention: 0\n", "'0' is not an etcd compaction retention"),
    ("  etcd_quota_backend_bytes: 1000\n", "cluster.etcd_quota_backend_bytes: 1000 is out of range"),
])
def test_bad_settings_are_one_clear_error(tmp_path, extra, message) -> None:
    with pytest.raises(InventoryError) as err:
        _inv_with(tmp_path, extra)
    assert message in str(err.value) and "hosts.yml:" in str(err.value)


# -- rendered files ------------------------------------------------------------------------------
def test_etcd_compaction_and_quota_from_the_inventory(tmp_path) -> None:
    inv = _inv_with(tmp_path, "  etcd_auto_compaction_retention: 30m\n  etcd_quota_backend_bytes: 4294967296\n")
    cfg = yaml.safe_load(render("etcd/etcd.conf.yml.j2", **etcd_context(inv, inv.get("etcd01"), Paths())))
    assert (cfg["auto-compaction-mode"], cfg["auto-compaction-retention"], cfg["quota-backend-bytes"]) == \
        ("periodic", "30m", 4 * 1024**3)


def test_permanent_slots_are_opt_in_with_a_reason(tmp_path) -> None:
    inv = _inv_with(tmp_path, "  permanent_slots: {backup_rx: {reason: pg_receivewal on backup01}}\n"
                              "  max_slot_wal_keep_size: 20GB\n")
    text = render("patroni/config.yml.j2", **patroni_context(inv, inv.get("node01"), SECRETS, Paths()))
    dcs = yaml.safe_load(text)["bootstrap"]["dcs"]
    assert dcs["slots"] == {"backup_rx": {"type": "physical"}}
    assert "backup_rx:  # pg_receivewal on backup01" in text
    assert dcs["postgresql"]["parameters"]["max_slot_wal_keep_size"] == "20GB"


def _hba_method(rules: list[str], user: str, address: str) -> str | None:
    """PostgreSQL's choice for a TLS connection to database `app`: the first matching line's method."""
    for rule in rules:
        typ, db, users, *rest = rule.split()
        if typ == "hostssl" and db in ("all", "app") and users in ("all", user) and \
                ipaddress.ip_address(address) in ipaddress.ip_network(rest[0]):
            return rest[-1]
    return None


def test_pg_hba_superuser_only_from_the_cluster_hosts(tmp_path) -> None:
    inv = _inv_with(tmp_path)
    text = render("patroni/config.yml.j2", **patroni_context(inv, inv.get("node01"), SECRETS, Paths()))
    hba = yaml.safe_load(text)["postgresql"]["pg_hba"]
    assert _hba_method(hba, "postgres", "192.168.60.50") == "reject"  # any other host of the subnet
    assert _hba_method(hba, "postgres", "192.168.60.141") == "reject"  # an etcd host is no database host
    assert _hba_method(hba, "postgres", "10.1.2.3") == "reject"
    for address in ("127.0.0.1", "192.168.60.131", "192.168.60.132"):
        assert _hba_method(hba, "postgres", address) == "scram-sha-256", address
    assert _hba_method(hba, "admin", "192.168.60.50") == "scram-sha-256"  # other roles: the client network


def test_profile_keeps_the_system_python_and_pip_first(tmp_path) -> None:
    inv = _inv_with(tmp_path)
    venv, system = tmp_path / "venv", tmp_path / "usr-bin"
    for d, names in ((venv / "bin", ("python3", "pip", "patronictl")), (system, ("python3", "pip"))):
        d.mkdir(parents=True)
        for name in names:
            (d / name).write_text("#!/bin/sh\n")
            (d / name).chmod(0o755)
    profile = tmp_path / "patroni.sh"
    profile.write_text(render("patroni/profile.sh.j2", **patroni_context(inv, inv.get("node01"), SECRETS,
                                                                         Paths(patroni_venv=str(venv)))))
    script = (f". {profile}; . {profile}; command -v python3; command -v pip; command -v patronictl; "
              "echo $PATH")
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{system}:/bin"}).stdout.split()
    assert out[:3] == [f"{system}/python3", f"{system}/pip", f"{venv}/bin/patronictl"]
    assert out[3].count(f"{venv}/bin") == 1  # sourced twice (login + sub-shell): added once


# -- patroni.dynamic: desired vs show-config -----------------------------------------------------
def test_desired_dynamic_default_and_opt_in(tmp_path) -> None:
    d = desired_dynamic(_inv_with(tmp_path))
    assert d["slots"] == {} and d["postgresql"]["parameters"]["max_slot_wal_keep_size"] == "8GB"
    inv = _inv_with(tmp_path, "  permanent_slots: {backup_rx: {reason: pg_receivewal}}\n")
    assert desired_dynamic(inv)["slots"] == {"backup_rx": {"type": "physical"}}


@pytest.mark.parametrize("current, desired, patch", [
    # an old deployment: the walk-through's slot goes, the WAL bound comes
    (yaml.safe_load(OLD_DCS), {"slots": {}, "postgresql": {"parameters": {
        "max_connections": 100, "wal_keep_size": "512MB", "max_slot_wal_keep_size": "8GB"}}},
     {"slots": None, "postgresql": {"parameters": {"max_slot_wal_keep_size": "8GB"}}}),
    # nothing to do: keys of the DCS outside the exact maps are left alone
    ({"ttl": 30, "postgresql": {"use_slots": True, "parameters": {"max_slot_wal_keep_size": "8GB"}}},
     {"slots": {}, "postgresql": {"parameters": {"max_slot_wal_keep_size": "8GB"}}}, {}),
    # parameters are an exact map: one the inventory no longer names goes (back to PostgreSQL's default)
    ({"ttl": 30, "postgresql": {"parameters": {"max_slot_wal_keep_size": "8GB", "work_mem": "8MB"}}},
     {"slots": {}, "postgresql": {"parameters": {"max_slot_wal_keep_size": "8GB"}}},
     {"postgresql": {"parameters": {"work_mem": None}}}),
    # exact map: an unlisted slot is removed, a listed one added, a changed attribute replaced
    ({"slots": {"old": {"type": "physical"}, "keep": {"type": "logical", "database": "app"}}},
     {"slots": {"keep": {"type": "physical"}, "new": {"type": "physical"}}},
     {"slots": {"old": None, "new": {"type": "physical"}, "keep": {"type": "physical", "database": None}}}),
    # scalars compare as text; None means absent
    ({"ttl": 30, "gone": 1}, {"ttl": "30", "gone": None, "absent": None}, {"gone": None}),
])
def test_config_patch(current, desired, patch) -> None:
    assert config_patch(current, desired, EXACT) == patch


def _patronictl_fake(tmp_path: Path, dcs: str) -> str:
    """A stand-in for `patronictl -c CONF`: show-config prints the file, edit-config --apply - patches it
    the way Patroni does (null removes a key)."""
    state = tmp_path / "dcs.yml"
    state.write_text(dcs)
    fake = tmp_path / "patronictl"
    fake.write_text(f"""#!{sys.executable}
import json, sys, yaml
sys.path.insert(0, {str(REPO)!r})
state = {str(state)!r}
if sys.argv[1] == "show-config":
    print(open(state).read())
else:
    assert sys.argv[1:] == ["edit-config", "--force", "--quiet", "--apply", "-"], sys.argv
    def patch(c, d):
        for k, v in d.items():
            if v is None:
                c.pop(k, None)
            elif isinstance(v, dict) and isinstance(c.get(k), dict):
                patch(c[k], v)
            else:
                c[k] = v
    cfg = yaml.safe_load(open(state))
    patch(cfg, yaml.safe_load(sys.stdin))
    open(state, "w").write(yaml.safe_dump(cfg))
""")
    fake.chmod(0o755)
    return str(fake)


def test_remote_script_checks_then_applies_the_difference(tmp_path) -> None:
    ctl = _patronictl_fake(tmp_path, OLD_DCS)
    desired = {"slots": {}, "postgresql": {"parameters": {"max_slot_wal_keep_size": "8GB"}}}
    args = [json.dumps(desired), json.dumps(["slots"])]  # parameters not exact here: the others stay

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", remote_script(), mode, ctl, *args], capture_output=True,
                              text=True, timeout=60)

    check = run("check")
    assert check.returncode == 1 and '"slots": null' in check.stdout
    assert yaml.safe_load((tmp_path / "dcs.yml").read_text())["slots"]  # a check changes nothing
    applied = run("apply")
    assert applied.returncode == 0, applied.stderr
    after = yaml.safe_load((tmp_path / "dcs.yml").read_text())
    assert "slots" not in after and after["postgresql"]["parameters"] == {
        "max_connections": 100, "wal_keep_size": "512MB", "max_slot_wal_keep_size": "8GB"}
    assert after["ttl"] == 30 and after["postgresql"]["use_slots"] is True  # the rest untouched
    assert run("check").returncode == 0


def test_dynamic_command_shape(ctx) -> None:
    cmd = dynamic_command(ctx, "apply")
    assert cmd.startswith("/opt/patroni/bin/python -c ")
    assert " apply '/opt/patroni/bin/patronictl -c /etc/patroni/config.yml ' " in cmd
    assert '"max_slot_wal_keep_size": "8GB"' in cmd and '"slots": {}' in cmd
    with pytest.raises(ValueError):
        dynamic_command(ctx, "force")
