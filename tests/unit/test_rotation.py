"""secrets.rotate and the roles step on the fake transport: the current leader first, before any config has
the new password; resumable without a second password; no secret in argv or the ledger; refused without
a leader. The bootstrap script: no password, there for the first start only."""
from __future__ import annotations

import json

import pytest
import yaml

from runbook.core.engine import apply, decide
from runbook.credentials.secrets import ensure_secrets
from runbook.errors import ProcedureFailed
from runbook.procedures import secrets_rotate as sr
from runbook.sections.patroni import bootstrap, config, current_leader, roles, roles_sql

SWITCHED = [{"Member": "patroni_node02", "Host": "node02", "Role": "Leader", "State": "running", "TL": 2},
            {"Member": "patroni_node01", "Host": "node01", "Role": "Sync Standby", "State": "streaming", "TL": 2}]
NO_LEADER = [{"Member": "patroni_node02", "Host": "node02", "Role": "Replica", "State": "running", "TL": 2},
             {"Member": "patroni_node01", "Host": "node01", "Role": "Replica", "State": "stopped", "TL": 2}]
ALL_OK = "superuser|ok|refused\nreplication|ok|refused\nrewind|ok|refused\nadmin|ok|refused\n"
_ROLE = {"Leader": "leader", "Sync Standby": "sync_standby", "Replica": "replica"}


def members_are(t, members: list[dict]) -> None:
    """The cluster as `patronictl list -f json` prints it and as the REST API's GET /cluster answers (the leader
    of patroni.roles is asked there)."""
    t.on(r"list -f json", (0, json.dumps(members)))
    rest = {"members": [{"name": m["Member"], "host": m["Host"], "role": _ROLE[m["Role"]], "state": m["State"],
                         "timeline": m["TL"]} for m in members], "scope": "patroni_cluster"}
    t.on(r"(?s)python3 -I -S -c .* /cluster$", (0, json.dumps(rest)))


@pytest.fixture
def cluster(ctx, monkeypatch):
    """A cluster whose leader is node02 (after a switchover), bootstrapped on node01 (recorded)."""
    from runbook.procedures import secrets_etcd

    monkeypatch.setattr(secrets_etcd, "_sleep", lambda s: None)  # a test replaces it to see the wait
    t = ctx.transport
    members_are(t, SWITCHED)
    t.on(r"^sh -s$", (0, ALL_OK))
    t.on(r"/bin/python -c", (0, "restapi|ok|refused\n"))
    t.on(r"/v3/auth/authenticate", (0, "etcd|ok|refused\n"))
    ctx.ledger.set("node01", "patroni.bootstrap", "done", fingerprint="x")
    apply(ctx, [config], ctx.inventory.postgres)  # the configs as cluster.up left them
    return t


def configs_with(t, password: str) -> list[str]:
    return [h for (h, path), (content, _, _) in t.files.items()
            if path == "/etc/patroni/config.yml" and password.encode() in content]


def test_rotation_changes_the_leader_first_then_the_configs(ctx, cluster):
    old = {k: v["password"] for k, v in ensure_secrets(ctx.state_dir).items()}
    seen = {}

    def alter(host, cmd):  # at the moment of the ALTER: which configs already carry a new password?
        rot = sr.load_rotation(ctx.state_dir)
        seen["host"], seen["configs"] = host.name, [h for v in rot.roles.values() for h in configs_with(cluster,
                                                                                                       v["new"])]
        return 0
    cluster.on(r"psql .* -v ON_ERROR_STOP=1 -f -$", alter)
    res = sr.rotate(ctx, None)
    assert res["leader"] == "node02" and seen == {"host": "node02", "configs": []}
    new = {k: v["password"] for k, v in ensure_secrets(ctx.state_dir).items()}
    # superuser, restapi and the etcd user included
    assert set(new) == set(old) and all(new[k] != old[k] for k in old)
    assert sorted(configs_with(cluster, new["superuser"])) == ["node01", "node02"]
    assert not sr.rotation_path(ctx.state_dir).exists()
    argv = "\n".join(cluster.commands())
    dump = "\n".join(ctx.ledger.db.conn.iterdump())
    for pw in [*old.values(), *new.values()]:
        assert pw not in argv and pw not in dump
    phases = {r.step: r.status for r in ctx.ledger.all() if r.host == "local"}
    assert phases == {f"secrets.rotate.{p}": "done" for p in sr.PHASES}


def test_one_role_only(ctx, cluster):
    old = ensure_secrets(ctx.state_dir)
    res = sr.rotate(ctx, "replication")
    new = ensure_secrets(ctx.state_dir)
    assert res["roles"] == ["replication"] and new["replication"] != old["replication"]
    assert {k: v for k, v in new.items() if k != "replication"} == {k: v for k, v in old.items() if k != "replication"}
    with pytest.raises(ProcedureFailed, match="--role replicator: unknown; one of superuser, replication"):
        sr.rotate(ctx, "replicator")


def test_refused_without_a_leader_and_nothing_generated(ctx, cluster):
    before = sr.secrets_path(ctx.state_dir).read_text()
    members_are(cluster, NO_LEADER)
    with pytest.raises(ProcedureFailed, match="no running leader .*patroni_node02=Replica/running"):
        sr.rotate(ctx, None)
    assert not sr.rotation_path(ctx.state_dir).exists()
    assert sr.secrets_path(ctx.state_dir).read_text() == before


def test_a_resumed_run_keeps_the_applied_passwords(ctx, cluster, monkeypatch):
    monkeypatch.setattr(sr, "VERIFY_TRIES", 1)
    monkeypatch.setattr(sr, "VERIFY_INTERVAL", 0)
    cluster.on(r"/bin/python -c", (0, "restapi|refused|ok\n"))  # the REST API has not reloaded yet
    with pytest.raises(ProcedureFailed, match="restapi .*the new password does not log in"):
        sr.rotate(ctx, None)
    first = sr.load_rotation(ctx.state_dir)
    assert first is not None
    with pytest.raises(ProcedureFailed, match="a rotation of superuser, .* is in progress"):
        sr.rotate(ctx, "admin")
    alters = len([c for c in cluster.commands("node02") if c.endswith("-f -")])
    cluster.on(r"/bin/python -c", (0, "restapi|ok|refused\n"))
    cluster.on(r"/v3/auth/authenticate", (0, "etcd|ok|refused\n"))
    res = sr.rotate(ctx, None)
    assert res["rotation"] == first.id
    assert {k: v["password"] for k, v in ensure_secrets(ctx.state_dir).items()} == \
        {k: v["new"] for k, v in first.roles.items()}
    assert len([c for c in cluster.commands("node02") if c.endswith("-f -")]) == alters  # no ALTER again


def test_alter_sql_logs_nothing_even_on_error():
    rot = sr.Rotation("x", {r: {"username": u, "old": "o" * 20, "new": "n" * 20} for r, u in
                            (("superuser", "postgres"), ("admin", "admin"), ("restapi", "patroni"))})
    sql = sr.alter_sql(rot).decode().splitlines()
    first_alter = next(i for i, s in enumerate(sql) if s.startswith("ALTER"))
    assert {"SET log_statement TO 'none';", "SET log_min_error_statement TO 'panic';"} <= set(sql[:first_alter])
    assert [s.split('"')[1] for s in sql if s.startswith("ALTER")] == ["postgres", "admin"]  # restapi: no role


def test_login_problems_need_new_ok_and_old_refused():
    rot = sr.Rotation("x", {"admin": {"username": "admin", "old": "a" * 20, "new": "b" * 20}})
    assert sr.login_problems(rot, sr.parse_logins("admin|ok|refused\n")) == []
    assert sr.login_problems(rot, sr.parse_logins("admin|ok|ok\n")) == [
        "admin (admin): the old password is not refused: ok"]
    assert sr.login_problems(rot, {}) == ["admin (admin): the new password does not log in: no answer",
                                          "admin (admin): the old password is not refused: no answer"]


def test_roles_step_follows_the_leader(ctx, inv):
    members_are(ctx.transport, SWITCHED)
    assert [h.name for h in current_leader(ctx, inv.postgres)] == ["node01"]  # before the bootstrap: first host
    assert ctx.transport.calls == []  # ... without asking anything (dry runs of a fresh install)
    ctx.ledger.set("node01", "patroni.bootstrap", "done", fingerprint="x")
    assert [h.name for h in current_leader(ctx, inv.postgres)] == ["node02"]
    members_are(ctx.transport, NO_LEADER)
    assert [h.name for h in current_leader(ctx, inv.postgres)] == ["node01"]
    cmd = roles.actions_fn(ctx, inv.get("node01"))[0].cmd
    assert "else echo 'node01 is not a running primary" in cmd and cmd.endswith("exit 1; fi")  # not silently done
    assert b"SET log_min_error_statement TO 'panic';" in roles_sql(ctx)


def test_bootstrap_script_is_put_for_the_first_start_only(ctx, inv):
    secrets = ensure_secrets(ctx.state_dir)
    node01 = inv.get("node01")
    assert not [a for a in config.actions_fn(ctx, node01) if getattr(a, "path", "") == ctx.paths.post_bootstrap]
    assert f"rm -f {ctx.paths.post_bootstrap}" in [getattr(a, "cmd", "") for a in config.actions_fn(ctx, node01)]
    acts = bootstrap.actions_fn(ctx, node01)
    assert acts[0].cmd.endswith(f"/dev/stdin {ctx.paths.post_bootstrap}") and acts[0].stdin.startswith(b"#!/bin/sh")
    assert acts[1].cmd == "systemctl start patroni" and acts[-1].cmd == f"rm -f {ctx.paths.post_bootstrap}"
    assert not [v for v in secrets.values() if v["password"].encode() in acts[0].stdin]
    assert bootstrap.check_fn(ctx, node01).endswith(f"test ! -e {ctx.paths.post_bootstrap}")
    assert decide(ctx, bootstrap, node01).run  # the plan of a fresh install still starts it


def test_rotation_file_mode_and_shape_are_checked(ctx):
    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    p = sr.rotation_path(ctx.state_dir)
    p.write_text(yaml.safe_dump({"id": "x", "roles": {"admin": {"username": "admin"}}}))
    p.chmod(0o600)
    with pytest.raises(ProcedureFailed, match="not a rotation record"):
        sr.load_rotation(ctx.state_dir)
    p.chmod(0o644)
    with pytest.raises(ProcedureFailed, match="readable by group/others"):
        sr.load_rotation(ctx.state_dir)


def test_the_front_doors_secrets_rotate_too(ctx, cluster):
    """pooler and vrrp, once in state/secrets.yml, rotate with the rest; without cluster.vip no config carries
    them: the lookup role's password changes where the role exists, as a SCRAM secret, never in plain."""
    from runbook.sections.frontdoor import secret

    secret(ctx, "pooler"), secret(ctx, "vrrp")
    old = ensure_secrets(ctx.state_dir)
    sqls = []
    cluster.on(r"psql .* -v ON_ERROR_STOP=1 -f -$", lambda h, c: sqls.append(h.name) or 0)
    res = sr.rotate(ctx, None)
    new = ensure_secrets(ctx.state_dir)
    assert res["roles"][-2:] == ["pooler", "vrrp"]
    assert all(new[k]["password"] != old[k]["password"] for k in old)
    assert len(new["vrrp"]["password"]) == 8 and len(new["pooler"]["password"]) == 32  # keepalived takes 8
    rot = sr.Rotation("x", {"pooler": {"username": "pgbouncer_auth", "old": "o" * 32, "new": "n" * 32}})
    sql = sr.alter_sql(rot).decode()
    assert "IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbouncer_auth')" in sql
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in sql and "n" * 32 not in sql
    assert not [c for c in cluster.commands() if "pgbouncer" in c or "keepalived" in c]  # not deployed: no config
    with pytest.raises(ProcedureFailed, match="--role nope: unknown; one of .*restapi, etcd, pooler, vrrp"):
        sr.rotate(ctx, "nope")


def test_with_the_front_door_pgbouncer_and_keepalived_reload_and_are_proven(ctx, cluster, tmp_path, monkeypatch):
    from test_frontdoor import _inventory

    from runbook.inventory import load_inventory
    from runbook.sections import pooler
    from runbook.sections.frontdoor import secret

    monkeypatch.setattr(sr, "VERIFY_TRIES", 1)
    monkeypatch.setattr(sr, "VERIFY_INTERVAL", 0)
    ctx.inventory = load_inventory(_inventory(tmp_path))  # cluster.vip: the PostgreSQL hosts balance
    secret(ctx, "pooler"), secret(ctx, "vrrp")
    cluster.on(r"^sh -s$", (0, ALL_OK + "pooler|ok|refused\n"))
    cluster.on(r"ip -4 -o addr show to", lambda h, c: (0, "inet x" if h.name == "node01" else ""))
    cluster.on(r"ss -Hltn", 0)  # PgBouncer listens: a reload, not a restart
    res = sr.rotate(ctx, "pooler")
    assert res["roles"] == ["pooler"]
    cmds = cluster.commands("node01")
    assert any(pooler.reload_or_restart("192.168.60.131", 6432) in c for c in cmds)
    assert not [c for c in cmds if "ALTER" in c or "keepalived" in c]
    res = sr.rotate(ctx, "vrrp")
    assert any("reload-or-restart keepalived" in c for c in cluster.commands("node02"))
    cluster.on(r"ip -4 -o addr show to", (0, "inet x"))  # both balancers claim the VIP: not proven
    with pytest.raises(ProcedureFailed, match="vrrp: the VIP .* is held by 2 balancers"):
        sr.rotate(ctx, "vrrp")


@pytest.mark.parametrize("active, listening, expected", [
    (0, "LISTEN 0 128 10.0.0.5:6432 0.0.0.0:*", "reload"),  # running where the config says: clients stay
    (0, "LISTEN 0 128 10.0.0.9:6432 0.0.0.0:*", "restart"),  # a new listen address: only a restart applies it
    (3, "", "restart"),  # not running
])
def test_pgbouncer_is_reloaded_when_it_listens_there(tmp_path, active, listening, expected):
    import subprocess

    from runbook.sections.pooler import reload_or_restart

    log = tmp_path / "log"
    (tmp_path / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n[ \"$1\" = is-active ] && exit {active}\n"
                                        "exit 0\n")
    (tmp_path / "ss").write_text(f"#!/bin/sh\necho '{listening}'\n")
    for f in ("systemctl", "ss"):
        (tmp_path / f).chmod(0o755)
    subprocess.run(["sh", "-c", reload_or_restart("10.0.0.5", 6432)], check=True, timeout=30,
                   env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert log.read_text().splitlines()[-1] == f"{expected} pgbouncer"


def test_the_etcd_password_changes_in_etcd_after_every_patroni_has_it(ctx, cluster, monkeypatch):
    """Patroni keeps its etcd token across a reload and logs in again only when etcd's auth revision moves: the
    configs (reloaded) carry the new password before `user passwd` runs, after a wait of one Patroni loop; then
    a login through the JSON gateway proves new in, old out. The password travels on stdin only."""
    from runbook.procedures import secrets_etcd

    waited = []
    monkeypatch.setattr(secrets_etcd, "_sleep", lambda s: waited.append(s))
    old = ensure_secrets(ctx.state_dir)["etcd"]["password"]
    seen = {}

    def passwd(host, cmd):
        rot = sr.load_rotation(ctx.state_dir)
        seen["host"], seen["waited"] = host.name, list(waited)
        seen["configs"] = sorted(configs_with(cluster, rot.roles["etcd"]["new"]))
        return 0
    cluster.on(r"user passwd patroni --interactive=false", passwd)

    def patronictl_list(host, cmd):  # a fresh patronictl logs in with the config's password: refused until passwd
        rot = sr.load_rotation(ctx.state_dir)
        ahead = rot is not None and configs_with(cluster, rot.roles["etcd"]["new"]) and "host" not in seen
        return (1, "") if ahead else (0, json.dumps(SWITCHED))
    cluster.on(r"list -f json", patronictl_list)
    res = sr.rotate(ctx, "etcd")
    new = ensure_secrets(ctx.state_dir)["etcd"]["password"]
    assert res["roles"] == ["etcd"] and new != old and res["logins"] == {"etcd": {"new": "ok", "old": "refused"}}
    wait = ctx.inventory.cluster.patroni.loop_wait + secrets_etcd.RELOAD_MARGIN
    assert seen == {"host": "etcd01", "configs": ["node01", "node02"], "waited": [wait]}
    cmds = cluster.commands()
    assert "etcd-root.crt" in next(c for c in cmds if "user passwd patroni" in c)
    login = next(c for c in cmds if "/v3/auth/authenticate" in c)
    assert "etcd-client.crt" in login and "/etcd01:2379/" in login.replace("https:/", "")
    argv, dump = "\n".join(cmds), "\n".join(ctx.ledger.db.conn.iterdump())
    assert all(pw not in argv and pw not in dump for pw in (old, new))
    assert not [c for c in cmds if "ALTER ROLE" in c]  # not a PostgreSQL role
    roles_on = [h for h, _u, c in cluster.calls if "roles change on the leader only" in c]
    assert roles_on == ["node02"]  # patroni.roles found the leader: it ran after etcd had the new password


def test_an_old_etcd_password_still_accepted_fails_the_rotation(ctx, cluster, monkeypatch):
    from runbook.procedures import secrets_etcd

    monkeypatch.setattr(secrets_etcd, "_sleep", lambda s: None)
    monkeypatch.setattr(sr, "VERIFY_TRIES", 1)
    cluster.on(r"/v3/auth/authenticate", (0, "etcd|ok|ok\n"))
    with pytest.raises(ProcedureFailed, match="etcd .patroni.: the old password is not refused: ok"):
        sr.rotate(ctx, "etcd")
    assert sr.rotation_path(ctx.state_dir).exists()  # the rotation stays open, to resume
