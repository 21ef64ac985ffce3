"""`inv secrets.rotate [--role NAME]`: new passwords, applied on the current leader before any config has them.

Phases, each recorded in the ledger (host `local`, step `secrets.rotate.<phase>`, note = the rotation id):

    generate  new passwords into state/secrets.rotation.yml (0600), next to the old ones
    alter     ALTER ROLE ... PASSWORD on the current Patroni leader (SQL on stdin, nothing logged); the
              front door's lookup role as a SCRAM secret, only where the role exists
    commit    the new passwords into state/secrets.yml
    configs   patroni.config (+ validate, roles) re-run through the engine on every postgres host: reload;
              the etcd user patroni's password then changes in etcd, once every Patroni has the new one
              (runbook.procedures.secrets_etcd says why that order)
              with the front door deployed, pooler.lookup + pooler.config (userlist.txt, PgBouncer reloaded)
              and balancer.keepalived (VRRP password, keepalived reloaded on every balancer at once)
    verify    a TLS login with each new password works, the old one is refused (REST API: basic auth;
              etcd: through its JSON gateway with the CN-less etcd-client certificate, as Patroni logs in);
              one balancer holds the VIP after the VRRP password changed
    done      state/secrets.rotation.yml removed

Every entry of state/secrets.yml rotates: the cluster's roles, and the front door's (`pooler`, `vrrp`) once
they exist. With the front door not deployed (no cluster.vip) its secrets change in the file (and the lookup
role's password in PostgreSQL, when the role is there): the next install uses the new ones.

The rotation file is the resume point: while it exists a run finishes that rotation with the passwords
it holds and never generates others. Passwords travel only on stdin; output is masked with old and new.
"""
from __future__ import annotations

import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from runbook import console as ui
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members
from runbook.core.fsutil import write_atomic
from runbook.credentials.secrets import PASSWORD_LENGTH, USERS, ensure_secrets, new_password, redact, secrets_path
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.inventory.yamlio import UniqueKeyLoader
from runbook.procedures import secrets_etcd
from runbook.sections import frontdoor

ROTATION_FILE = "secrets.rotation.yml"
PHASES = ("generate", "alter", "commit", "configs", "verify", "done")
PG_ROLES = ("superuser", "replication", "rewind", "admin")  # roles in PostgreSQL; restapi is Patroni's
STEP = "secrets.rotate"
IRREVERSIBLE = {"alter": " (irreversible: the old passwords stop working on the cluster)",
                "done": " (irreversible: the old passwords are forgotten)"}
VERIFY_TRIES, VERIFY_INTERVAL = 15, 2.0  # about 30 s for every host to apply its reload




@dataclass
class Rotation:
    id: str
    roles: dict[str, dict[str, str]]  # role -> {username, old, new}

    def values(self) -> list[str]:
        return [v[k] for v in self.roles.values() for k in ("old", "new")]

    def mask(self, text: str) -> str:
        return redact(text or "", self.values())


def rotation_path(state_dir: Path) -> Path:
    return Path(state_dir) / ROTATION_FILE


def load_rotation(state_dir: Path) -> Rotation | None:
    p = rotation_path(state_dir)
    if not p.exists():
        return None
    if p.stat().st_mode & 0o077:
        raise ProcedureFailed(f"{p} is readable by group/others; refusing to use it (chmod 600 {p}, and since "
                              "the passwords may have leaked, finish this rotation and rotate again)", 2)
    data = yaml.load(p.read_text(), Loader=UniqueKeyLoader) or {}
    roles = data.get("roles") if isinstance(data, dict) else None
    if not isinstance(roles, dict) or not roles or not all(
            isinstance(v, dict) and set(v) == {"username", "old", "new"} for v in roles.values()):
        raise ProcedureFailed(f"{p}: not a rotation record (roles: {{NAME: {{username, old, new}}}}); restore it "
                              "from a backup - it holds the only copy of the passwords being applied", 2)
    return Rotation(str(data.get("id")), {str(k): dict(v) for k, v in roles.items()})


def save_rotation(state_dir: Path, rot: Rotation) -> None:
    text = ("# pg-ha-runbook: a password rotation in progress (old and new); `inv secrets.rotate` finishes it\n"
            + yaml.safe_dump({"id": rot.id, "roles": rot.roles}, sort_keys=False))
    write_atomic(rotation_path(state_dir), text.encode(), 0o600)


def new_rotation(current: dict[str, dict[str, str]], roles: list[str]) -> Rotation:
    """Fresh passwords for `roles`, next to the current ones (pure but for the random generator); each as long
    as its kind takes (keepalived's VRRP password: 8 characters)."""
    length = {r: n for r, (_, n) in frontdoor.FRONTDOOR_SECRETS.items()}
    return Rotation(uuid.uuid4().hex[:12], {r: {"username": current[r]["username"], "old": current[r]["password"],
                                                "new": new_password(length.get(r, PASSWORD_LENGTH))} for r in roles})


def pick_roles(role: str | None, current: dict[str, dict[str, str]]) -> list[str]:
    """The roles to rotate: all of state/secrets.yml's (the front door's once they exist), or the one named."""
    known = [*USERS, *(r for r in frontdoor.FRONTDOOR_SECRETS if r in current)]
    if role is None:
        return known
    if role not in known:
        raise ProcedureFailed(f"--role {role}: unknown; one of {', '.join(known)} (the keys of state/secrets.yml)", 2)
    return [role]


def pooler_sql(rot: Rotation) -> str:
    """The lookup role's new password as a SCRAM secret (the plain password never reaches SQL), where the role
    exists (the front door may not be deployed yet); the same statement pooler.lookup renders."""
    user, verifier = frontdoor.POOLER_USER, frontdoor.scram_verifier(rot.roles["pooler"]["new"])
    return (f"DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{user}') THEN "
            f"ALTER ROLE {user} WITH PASSWORD '{verifier}'; END IF; END $$;")


def alter_sql(rot: Rotation) -> bytes:
    """ALTER ROLE for every PostgreSQL role of the rotation, in a session that logs no statement, not even
    one that fails; synchronous_commit stays on, so the change is on the sync standby before configs move."""
    from runbook.sections.patroni import NO_LOG_SQL

    out = list(NO_LOG_SQL)
    for role, v in rot.roles.items():
        if role in PG_ROLES:
            out.append(f"ALTER ROLE \"{v['username']}\" WITH PASSWORD '{v['new']}';")
    if "pooler" in rot.roles:
        out.append(pooler_sql(rot))
    return ("\n".join(out) + "\n").encode()


def the_leader(ctx: Ctx) -> Host:
    try:
        ms = members(ctx)
    except RuntimeError as exc:
        raise ProcedureFailed(f"secrets.rotate stopped: Patroni did not answer ({exc}); run it again when it does "
                              "(a rotation in progress resumes with its own passwords)", 1) from None
    leaders = [m for m in ms if m.is_leader]
    if len(leaders) != 1:
        now = ", ".join(f"{m.name}={m.role}/{m.state}" for m in ms) or "no members"
        raise ProcedureFailed(f"secrets.rotate refused: no running leader ({now}); the passwords change on the "
                              "leader first. Bring the cluster back (`inv cluster.status`), then run it again (a "
                              "rotation in progress resumes with its own passwords)", 1)
    return host_of(ctx, leaders[0].name)


# -- verification ---------------------------------------------------------------------------------------
def login_roles(ctx: Ctx, rot: Rotation) -> list[str]:
    """The roles of the rotation a TLS login proves: PostgreSQL's, the lookup role once the front door is
    deployed, the REST API's basic auth. VRRP is proven by the VIP (one holder), not by a login."""
    return [r for r in rot.roles
            if r in PG_ROLES or r in ("restapi", "etcd") or (r == "pooler" and frontdoor.enabled(ctx))]


def pg_login_script(ctx: Ctx, host: Host, rot: Rotation) -> str:
    """sh on stdin: per PostgreSQL role, a TLS login (verify-full) with the new and with the old password."""
    psql = f"{ctx.paths.pg_bin_dir(ctx.inventory.cluster.postgres_major)}/psql"
    ca = f"{ctx.paths.patroni_tls_dir}/ca.crt"
    lines = ["try() { out=$(PGPASSWORD=\"$3\" " + psql + " -X -q -tA \"host=" + host.address + " port=5432 "
             f"dbname=postgres user=$1 sslmode=verify-full sslrootcert={ca} connect_timeout=5 $2\" -c \"$4\" "
             "2>&1 >/dev/null) && echo ok || case $out in *'password authentication failed'*) echo refused;; "
             "*) echo \"error $(echo \"$out\" | head -n 1)\";; esac; }"]
    for role in login_roles(ctx, rot):
        if role in ("restapi", "etcd"):
            continue  # basic auth on the REST API: REST_LOGIN; etcd: secrets_etcd.ETCD_LOGIN
        v = rot.roles[role]
        extra, sql = ("replication=true", "IDENTIFY_SYSTEM") if role == "replication" else ("", "select 1")
        lines.append(f"echo \"{role}|$(try {v['username']} '{extra}' '{v['new']}' '{sql}')|"
                     f"$(try {v['username']} '{extra}' '{v['old']}' '{sql}')\"")
    return "\n".join(lines) + "\n"


REST_LOGIN = r"""import base64, json, ssl, sys, urllib.error, urllib.request
url, ca, crt, key = sys.argv[1:5]
def status(user, pw):
    c = ssl.create_default_context(cafile=ca)
    c.check_hostname = False
    c.load_cert_chain(crt, key)
    auth = base64.b64encode(f"{user}:{pw}".encode()).decode()
    # POST /switchover without a leader: Patroni checks the credentials first, then answers 400 and does nothing
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={
        "Content-Type": "application/json", "Authorization": "Basic " + auth})
    try:
        return urllib.request.urlopen(req, context=c, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
user, new, old = json.loads(sys.stdin.readline())
def word(code):
    return "refused" if code == 401 else "ok" if code < 500 else f"error {code}"
print(f"restapi|{word(status(user, new))}|{word(status(user, old))}")
"""


def parse_logins(out: str) -> dict[str, tuple[str, str]]:
    """'role|new|old' lines -> {role: (new, old)}; each is ok, refused or 'error ...'."""
    got = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            got[parts[0]] = (parts[1], parts[2])
    return got


def login_problems(rot: Rotation, got: dict[str, tuple[str, str]], roles: list[str] | None = None) -> list[str]:
    """What the logins of *roles* (default: all of the rotation's) do not prove."""
    problems = []
    for role, v in rot.roles.items():
        if roles is not None and role not in roles:
            continue
        new, old = got.get(role, ("no answer", "no answer"))
        if new != "ok":
            problems.append(f"{role} ({v['username']}): the new password does not log in: {new}")
        if v["old"] != v["new"] and old != "refused":
            problems.append(f"{role} ({v['username']}): the old password is not refused: {old}")
    return problems


def verify_logins(ctx: Ctx, leader: Host, rot: Rotation) -> dict[str, tuple[str, str]]:
    got: dict[str, tuple[str, str]] = {}
    if any(r not in ("restapi", "etcd") for r in login_roles(ctx, rot)):
        r = ctx.transport.run(leader, "sh -s", user="postgres", stdin=pg_login_script(ctx, leader, rot).encode(),
                              timeout=120)
        got.update(parse_logins(rot.mask(r.stdout)))
    if "restapi" in rot.roles:
        import json

        v, tls = rot.roles["restapi"], ctx.paths.patroni_tls_dir
        args = " ".join(shlex.quote(a) for a in (f"https://{leader.address}:8008/switchover", f"{tls}/ca.crt",
                                                 f"{tls}/rest-client.crt", f"{tls}/rest-client.key"))
        creds = (json.dumps([v["username"], v["new"], v["old"]]) + "\n").encode()  # on stdin, never in argv
        r = ctx.transport.run(leader, f"{ctx.paths.patroni_venv}/bin/python -c {shlex.quote(REST_LOGIN)} {args}",
                              user="postgres", stdin=creds, timeout=60)
        got.update(parse_logins(rot.mask(r.stdout)))
        if not r.ok:
            got["restapi"] = ("error " + rot.mask(r.stderr.strip())[-200:], got.get("restapi", ("", ""))[1])
    if secrets_etcd.ROLE in rot.roles:
        got.update(parse_logins(secrets_etcd.verify_login(ctx, leader, rot)))
    return got


def vip_problems(ctx: Ctx, rot: Rotation) -> list[str]:
    """After a VRRP password change: exactly one balancer holds the VIP (two would mean the balancers no longer
    hear each other)."""
    if "vrrp" not in rot.roles or not frontdoor.enabled(ctx):
        return []
    from runbook.sections.balancer import vip_holders

    holders = vip_holders(ctx)
    return [] if len(holders) == 1 else [f"vrrp: the VIP {ctx.inventory.cluster.vip} is held by {len(holders)} "
                                         f"balancers ({', '.join(holders) or 'none'}), not one"]


# -- the procedure --------------------------------------------------------------------------------------
def phase_done(ctx: Ctx, rot: Rotation, phase: str) -> bool:
    rec = ctx.ledger.get("local", f"{STEP}.{phase}")
    return rec is not None and rec.status == "done" and (rec.note or "").startswith(f"rotation {rot.id}")


def record(ctx: Ctx, rot: Rotation, phase: str, t0: float, detail: str = "") -> None:
    note = f"rotation {rot.id}: {', '.join(rot.roles)}" + (f"; {detail}" if detail else "")
    ctx.ledger.set("local", f"{STEP}.{phase}", "done", note=note, started=t0, mode="procedure")
    ctx.ledger.event("local", f"{STEP}.{phase}", "phase", note, 0, duration=round(time.time() - t0, 3))
    ui.console.print(f"  [green]✓[/] {phase:<9} {detail}")


def plan(ctx: Ctx, role: str | None) -> list[str]:
    """What a run would do, without changing or generating anything (--dry)."""
    rot = load_rotation(ctx.state_dir)
    if rot is None:
        roles = pick_roles(role, ctx.secrets)
        lead = the_leader(ctx)
        return [f"a new rotation of {', '.join(roles)}; leader {lead.name}"] + \
            [f"{p}: will run{IRREVERSIBLE.get(p, '')}" for p in PHASES]
    return [f"resume rotation {rot.id} of {', '.join(rot.roles)}"] + \
        [f"{p}: {'done' if phase_done(ctx, rot, p) else 'will run' + IRREVERSIBLE.get(p, '')}" for p in PHASES]


def rotate(ctx: Ctx, role: str | None) -> dict:
    """Run (or resume) a rotation; returns its figures. Raises ProcedureFailed with what to do next."""
    from runbook.core.engine import apply
    from runbook.sections.patroni import config, roles, validate

    rot = load_rotation(ctx.state_dir)
    if rot is not None:
        if role is not None and set(rot.roles) != {role}:
            raise ProcedureFailed(f"a rotation of {', '.join(rot.roles)} is in progress ({rotation_path(ctx.state_dir)}"
                                  f"); run `inv secrets.rotate` without --role to finish it first", 2)
        ui.console.print(f"resuming rotation {rot.id} of {', '.join(rot.roles)} (its passwords are kept)")
    else:
        current = ensure_secrets(ctx.state_dir)
        wanted = pick_roles(role, current)
        lead = the_leader(ctx)  # refuse before anything is generated
        t0 = time.time()
        for p in PHASES:
            ctx.ledger.forget("local", f"{STEP}.{p}")
        rot = new_rotation(current, wanted)
        save_rotation(ctx.state_dir, rot)
        record(ctx, rot, "generate", t0, f"new passwords for {', '.join(wanted)} (leader {lead.name})")
    res: dict = {"rotation": rot.id, "roles": list(rot.roles)}
    lead = the_leader(ctx)
    res["leader"] = lead.name
    if not phase_done(ctx, rot, "alter"):
        t0 = time.time()
        pg = [r for r in rot.roles if r in PG_ROLES or r == "pooler"]
        if pg:
            from runbook.cluster.commands import psql

            r = ctx.transport.run(lead, psql(ctx, "-v ON_ERROR_STOP=1 -f -"), user="postgres", stdin=alter_sql(rot),
                                  timeout=60)
            ctx.ledger.event(lead.name, f"{STEP}.alter", "run", f"ALTER ROLE {', '.join(pg)} on the leader <<stdin>>",
                             r.rc, rot.mask(r.stdout), rot.mask(r.stderr), round(time.time() - t0, 3))
            if not r.ok:
                raise ProcedureFailed(f"{lead.name}: ALTER ROLE failed: {rot.mask(r.stderr.strip())[-300:]}; no config "
                                      "carries the new passwords yet. Fix the cause and run `inv secrets.rotate` "
                                      "again: it resumes with the same passwords", 1)
        record(ctx, rot, "alter", t0, f"{', '.join(pg) or 'no PostgreSQL role'} on the leader {lead.name}")
    if not phase_done(ctx, rot, "commit"):
        t0 = time.time()
        commit(ctx, rot)
        record(ctx, rot, "commit", t0, "state/secrets.yml holds the new passwords")
    ctx._secrets = None  # re-read: the configs render the new passwords
    if not phase_done(ctx, rot, "configs"):
        t0 = time.time()
        done = []
        if any(r in USERS for r in rot.roles):
            apply(ctx, [config, validate], ctx.inventory.postgres, in_order=True)  # raises RunFailed: what to do
            done.append("patroni.config re-rendered and reloaded on "
                        + ", ".join(h.name for h in ctx.inventory.postgres))
            if secrets_etcd.ROLE in rot.roles:  # after Patroni has the new password, before any patronictl
                done.append(secrets_etcd.change_in_etcd(ctx, rot))  # (it logs in afresh): see secrets_etcd
            apply(ctx, [roles], ctx.inventory.postgres, in_order=True)  # on the leader, found by patronictl
        if frontdoor.enabled(ctx) and "pooler" in rot.roles:
            from runbook.sections import pooler

            apply(ctx, [pooler.lookup, pooler.config], ctx.inventory.postgres, in_order=True)
            done.append("PgBouncer's userlist.txt written and PgBouncer reloaded")
        if frontdoor.enabled(ctx) and "vrrp" in rot.roles:
            from runbook.sections import balancer

            apply(ctx, [balancer.keepalived], ctx.inventory.balancers, in_order=True)
            done.append("keepalived.conf written and keepalived reloaded on " +
                        ", ".join(h.name for h in ctx.inventory.balancers))
        record(ctx, rot, "configs", t0, "; ".join(done) or "no config carries these secrets (front door not deployed)")
    if not phase_done(ctx, rot, "verify"):
        t0 = time.time()
        lead = the_leader(ctx)
        # Patroni applies a reload in its next loop (loop_wait): the REST API may take the old password for
        # a few seconds more; the verification is retried within its own bound
        got: dict = {}
        checked = login_roles(ctx, rot)
        for _ in range(VERIFY_TRIES):
            got = verify_logins(ctx, lead, rot) if checked else {}
            problems = login_problems(rot, got, checked) + vip_problems(ctx, rot)
            if not problems:
                break
            time.sleep(VERIFY_INTERVAL)
        res["logins"] = {r: {"new": n, "old": o} for r, (n, o) in got.items()}
        ctx.ledger.event(lead.name, f"{STEP}.verify", "check", str(res["logins"]), 1 if problems else 0)
        if problems:
            raise ProcedureFailed("secrets.rotate: the logins do not prove the rotation:\n  " + "\n  ".join(problems)
                                  + "\nthe rotation stays open; run `inv secrets.rotate` again after fixing it", 1)
        record(ctx, rot, "verify", t0, f"TLS logins on {lead.name}: new passwords log in, old ones are refused")
    t0 = time.time()
    rotation_path(ctx.state_dir).unlink(missing_ok=True)
    record(ctx, rot, "done", t0, f"{rotation_path(ctx.state_dir).name} removed")
    return res


def commit(ctx: Ctx, rot: Rotation) -> None:
    """The rotation's new passwords into state/secrets.yml (atomic, 0600); idempotent."""
    data = ensure_secrets(ctx.state_dir)
    for role, v in rot.roles.items():
        data[role] = {"username": v["username"], "password": v["new"]}
    header = "# Generated by pg-ha-runbook; keep 0600, never commit. Rotate with `inv secrets.rotate`.\n"
    write_atomic(secrets_path(ctx.state_dir), (header + yaml.safe_dump(data, sort_keys=False)).encode(), 0o600)
