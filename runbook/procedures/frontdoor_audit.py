"""`inv cluster.audit` for the front door (cluster.vip): PgBouncer requires client TLS (audit_probes proves the
refusal from another host), pools per transaction and keeps the lookup role's password 0600; the lookup role
holds no privilege but LOGIN; the balancers keep keepalived's password, HAProxy's client key and stats socket
to root."""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.inventory import Host
from runbook.procedures.audit import Check, Rule, _stat_cmd, check_modes
from runbook.sections.balancer import CLIENT_PEM, KEEPALIVED_CONF
from runbook.sections.frontdoor import POOLER_USER, STATS_SOCKET
from runbook.sections.pooler import CONF, USERLIST

def check_pgbouncer_ini(text: str) -> list[str]:
    """pool_mode transaction, client TLS required, auth through auth_query with SCRAM."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith((";", "#", "["))]
    kv = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in lines)}
    want = {"pool_mode": "transaction", "client_tls_sslmode": "require", "auth_type": "scram-sha-256"}
    problems = [f"{k} is {kv.get(k) or 'not set'}, want {v}" for k, v in want.items() if kv.get(k) != v]
    if not kv.get("auth_query"):
        problems.append("no auth_query: clients would be checked against a copied userlist")
    return problems


def check_lookup_role(out: str) -> list[str]:
    """`rolsuper|rolcreaterole|rolcreatedb|rolreplication|rolbypassrls` of the lookup role: all false."""
    flags = out.strip()
    if not flags:
        return [f"role {POOLER_USER} is missing (inv pooler.install creates it)"]
    if set(flags.split("|")) <= {"f", "false"}:
        return []
    return [f"{POOLER_USER} holds more than LOGIN (superuser|createrole|createdb|replication|bypassrls: {flags})"]


def audit_pooler(ctx: Ctx, h: Host) -> list[Check]:
    from runbook.cluster.commands import psql

    run = lambda cmd, **kw: ctx.transport.run(h, cmd, timeout=60, **kw)  # noqa: E731
    rules = [Rule(USERLIST, "0600", "postgres"), Rule(CONF, "0640", "postgres")]
    q = ("select rolsuper::text || '|' || rolcreaterole::text || '|' || rolcreatedb::text || '|' || "
         f"rolreplication::text || '|' || rolbypassrls::text from pg_roles where rolname = '{POOLER_USER}'")
    role = run(psql(ctx, f"-tA -c {shlex.quote(q)}"), user="postgres")
    ini = run(f"cat {CONF}")
    return [Check(h.name, "PgBouncer userlist 0600 postgres, config 0640", check_modes(run(_stat_cmd(rules)).stdout,
                                                                                        rules)),
            Check(h.name, "PgBouncer: transaction pooling, client TLS required, auth_query",
                  check_pgbouncer_ini(ini.stdout) if ini.ok else [f"{CONF}: {ini.stderr.strip()[-160:]}"]),
            Check(h.name, f"lookup role {POOLER_USER}: LOGIN only",
                  check_lookup_role(role.stdout) if role.ok else [f"psql failed: {role.stderr.strip()[-160:]}"])]


def audit_balancer(ctx: Ctx, h: Host) -> list[Check]:
    rules = [Rule(KEEPALIVED_CONF, "0600", "root"), Rule(f"{CLIENT_PEM}.key", "0600", "root"),
             Rule(STATS_SOCKET, "0600", "root")]
    out = ctx.transport.run(h, _stat_cmd(rules), timeout=60).stdout
    return [Check(h.name, "keepalived config, HAProxy client key and stats socket: root only", check_modes(out, rules))]
