"""The etcd user `patroni`'s password in `secrets.rotate`: etcd holds it too (etcd.auth set it), so it changes
in an order that never leaves Patroni without its DCS.

Patroni's etcd3 client keeps the token it authenticated with and takes new credentials on a reload without
logging in again (Patroni 4.1: ``reload_config`` sets username/password, nothing more). The token stays valid
until etcd's auth store changes revision, which `user passwd` does; from then on every client logs in again
with the password it holds. Hence:

1. configs: patroni.config writes the new password and reloads Patroni on every PostgreSQL host (done by the
   `configs` phase with the other roles); every Patroni applies the reload at the top of its next cycle, at
   most loop_wait later: waited for, plus a margin;
2. then `user passwd patroni` on one etcd host (etcd-root certificate, the password on stdin): the next
   request of each Patroni finds its token stale and logs in again, with the new password it already has;
3. verify: through the /v3 JSON gateway, as Patroni logs in (the CN-less etcd-client certificate of the
   leader), the new password gets a token and the old one is refused; a leader still holds the cluster.

Changed the other way round, every Patroni would fail to log in between the two steps (with failsafe_mode the
leader survives it, but nothing else in the cluster would work).

The price of one etcd user: between 1 and 2 (about one Patroni loop) a *new* etcd client with the config's
password, i.e. patronictl, is refused by etcd; the runbook runs none in that window (patroni.roles, which finds
the leader with patronictl, runs after 2). Two etcd users taking turns would close that window.
"""
from __future__ import annotations

import json
import shlex
import time
from typing import TYPE_CHECKING

from runbook.cluster.commands import etcdctl
from runbook.errors import ProcedureFailed
from runbook.inventory import Host

if TYPE_CHECKING:
    from runbook.cluster.context import Ctx
    from runbook.procedures.secrets_rotate import Rotation

ROLE = "etcd"
RELOAD_MARGIN = 3  # seconds beyond loop_wait for every Patroni to apply its reload


def reload_wait(ctx: Ctx) -> float:
    """Seconds a reloaded Patroni may take to apply its new configuration (one loop, plus a margin)."""
    return ctx.inventory.cluster.patroni.loop_wait + RELOAD_MARGIN


def passwd_command(ctx: Ctx, host: Host) -> str:
    """`etcdctl user passwd patroni` as etcd root (the etcd-root certificate); the password arrives on stdin."""
    return f"read -r pw; printf '%s\\n' \"$pw\" | {etcdctl(ctx, host, 'user passwd patroni --interactive=false')}"


def _sleep(seconds: float) -> None:  # the one wait, replaced in unit tests
    time.sleep(seconds)


def change_in_etcd(ctx: Ctx, rot: Rotation) -> str:
    """After the configs phase: wait for the Patroni reloads, then set the new password in etcd (idempotent:
    a resumed run sets the same password again)."""
    if ROLE not in rot.roles:
        return ""
    _sleep(reload_wait(ctx))
    new = rot.roles[ROLE]["new"]
    for host in ctx.inventory.etcd:  # the first that answers; etcd replicates the change
        r = ctx.transport.run(host, passwd_command(ctx, host), user="root", stdin=(new + "\n").encode(), timeout=60)
        ctx.ledger.event(host.name, "secrets.rotate.configs", "run", "etcdctl user passwd patroni <<stdin>>", r.rc,
                         rot.mask(r.stdout), rot.mask(r.stderr))
        if r.ok:
            return f"etcd user patroni's password changed through {host.name} after the Patroni reloads"
    raise ProcedureFailed("secrets.rotate: no etcd host changed the etcd user patroni's password (see the ledger "
                          "events of secrets.rotate.configs); Patroni has the new one already: fix etcd and run "
                          "`inv secrets.rotate` again, it resumes with the same passwords", 1)


ETCD_LOGIN = r"""import json, ssl, sys, urllib.error, urllib.request
url, ca, crt, key = sys.argv[1:5]
c = ssl.create_default_context(cafile=ca)
c.load_cert_chain(crt, key)
def word(user, pw):
    req = urllib.request.Request(url, data=json.dumps({"name": user, "password": pw}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        body = json.loads(urllib.request.urlopen(req, context=c, timeout=10).read())
        return "ok" if body.get("token") else "error no token"
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        return "refused" if "authentication failed" in text else f"error {e.code}"
    except Exception as e:
        return f"error {type(e).__name__}"
user, new, old = json.loads(sys.stdin.readline())
print(f"etcd|{word(user, new)}|{word(user, old)}")
"""


def login_command(ctx: Ctx) -> str:
    """python on a PostgreSQL host (as postgres): log in to etcd as Patroni does, with the new and old password."""
    tls, etcd = ctx.paths.patroni_tls_dir, ctx.inventory.etcd[0]
    args = " ".join(shlex.quote(a) for a in (f"https://{etcd.name}:2379/v3/auth/authenticate", f"{tls}/ca.crt",
                                             f"{tls}/etcd-client.crt", f"{tls}/etcd-client.key"))
    return f"{ctx.paths.patroni_venv}/bin/python -c {shlex.quote(ETCD_LOGIN)} {args}"


def verify_login(ctx: Ctx, leader: Host, rot: Rotation) -> str:
    """'etcd|new|old' from the leader: ok / refused / error ..., the credentials on stdin only."""
    v = rot.roles[ROLE]
    creds = (json.dumps([v["username"], v["new"], v["old"]]) + "\n").encode()
    r = ctx.transport.run(leader, login_command(ctx), user="postgres", stdin=creds, timeout=60)
    out = rot.mask(r.stdout)
    return out if r.ok else f"etcd|error {rot.mask(r.stderr.strip())[-200:]}|"
