"""Pooler section: PgBouncer on every PostgreSQL host (when cluster.vip turns the front door on).

Transaction pooling; clients authenticate with SCRAM against the secret an `auth_query` reads through a
SECURITY DEFINER function, as a dedicated lookup role that can do nothing else; TLS towards clients with its
own server certificate (purpose pgbouncer-server); the local socket towards PostgreSQL (pg_hba: scram-sha-256
on the socket for every role but the superuser, which keeps peer)."""
from __future__ import annotations

import shlex

from runbook.cluster.commands import psql
from runbook.cluster.context import Ctx
from runbook.core.step import Run, Section, wait_for
from runbook.inventory import Host
from runbook.sections.frontdoor import POOLER_USER, enabled, scram_verifier, secret, when_enabled
from runbook.sections.patroni import NO_LOG_SQL, current_leader
from runbook.sections.units import template

section = Section("pooler", 60, "PgBouncer on the PostgreSQL hosts: transaction pooling, SCRAM via auth_query, TLS")
CONF = "/etc/pgbouncer/pgbouncer.ini"
USERLIST = "/etc/pgbouncer/userlist.txt"
SCHEMA = "pgbouncer"
FUNCTION = f"{SCHEMA}.get_auth(text)"


def pgbouncer_context(ctx: Ctx, host: Host) -> dict:
    """Context of templates/pgbouncer/pgbouncer.ini.j2 for `host`."""
    tls = ctx.paths.patroni_tls_dir
    return {"conf": CONF, "host": host.name, "socket_dir": ctx.paths.socket_dir, "pg_port": 5432,
            "listen_addr": f"{host.address},127.0.0.1", "port": ctx.inventory.cluster.ports.pgbouncer,
            "pidfile": "/var/run/postgresql/pgbouncer.pid", "userlist": USERLIST, "auth_user": POOLER_USER,
            "pool_mode": "transaction", "max_client_conn": 1000, "default_pool_size": 20,
            "ca_file": f"{tls}/ca.crt",  # its own server certificate (purpose pgbouncer-server), put by postgres.tls
            "cert_file": f"{tls}/pgbouncer-server.crt", "key_file": f"{tls}/pgbouncer-server.key"}


def on_leader(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    return current_leader(ctx, hosts) if enabled(ctx) else []


def role_sql(ctx: Ctx) -> bytes:
    """The lookup role: LOGIN and nothing else; its password reaches SQL as a SCRAM secret only."""
    verifier = scram_verifier(secret(ctx, "pooler")["password"])
    out = [*NO_LOG_SQL,
           f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{POOLER_USER}') THEN "
           f"CREATE ROLE {POOLER_USER}; END IF; END $$;",
           f"ALTER ROLE {POOLER_USER} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT "
           f"CONNECTION LIMIT 10 PASSWORD '{verifier}';"]
    return ("\n".join(out) + "\n").encode()


# In every database a client may name (and template1, for the ones created later): PgBouncer 1.18 runs the
# auth_query in the database the client asked for. Superusers and replication roles never log in this way.
FUNCTION_SQL = f"""CREATE SCHEMA IF NOT EXISTS {SCHEMA};
REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
GRANT USAGE ON SCHEMA {SCHEMA} TO {POOLER_USER};
CREATE OR REPLACE FUNCTION {SCHEMA}.get_auth(p_usename text) RETURNS TABLE (usename name, passwd text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT usename, passwd FROM pg_catalog.pg_shadow
  WHERE usename = p_usename AND NOT usesuper AND NOT userepl AND usename <> '{POOLER_USER}'
$$;
REVOKE ALL ON FUNCTION {FUNCTION} FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {FUNCTION} TO {POOLER_USER};
"""
DATABASES = "select datname from pg_database where datallowconn order by 1"


@section.step("lookup", role="postgres", only=on_leader)
def lookup(ctx: Ctx, host: Host) -> list:
    """Lookup role and function: pgbouncer_auth (LOGIN only) may EXECUTE pgbouncer.get_auth(), a SECURITY
    DEFINER function returning a non-superuser's SCRAM secret, in every database (on the leader)"""
    bin_dir = ctx.paths.pg_bin_dir(ctx.inventory.cluster.postgres_major)
    each_db = (f"f=$(mktemp); cat > $f; for db in $({psql(ctx, '-tA -c ' + shlex.quote(DATABASES))}); do "
               f"{bin_dir}/psql -X -q -h {ctx.paths.socket_dir} -v ON_ERROR_STOP=1 -d \"$db\" -f $f "
               "|| { rm -f $f; exit 1; }; done; rm -f $f")
    refuse = (f"echo '{host.name} is not a running primary: the lookup role is created on the leader only; "
              "run again when `inv cluster.status` shows a leader' >&2; exit 1")
    primary = f'[ "$({psql(ctx, "-tAc " + shlex.quote("select pg_is_in_recovery()"))})" = f ]'
    return [Run(f"if {primary}; then {psql(ctx, '-v ON_ERROR_STOP=1 -f -')}; else {refuse}; fi", user="postgres",
                stdin=role_sql(ctx)),
            Run(each_db, user="postgres", stdin=FUNCTION_SQL.encode())]


@lookup.check
def _lookup_check(ctx: Ctx, host: Host) -> str:
    q = ("select count(*) from pg_roles r, pg_proc p join pg_namespace n on n.oid = p.pronamespace "
         f"where r.rolname = '{POOLER_USER}' and r.rolcanlogin and not r.rolsuper and n.nspname = '{SCHEMA}' "
         f"and p.proname = 'get_auth' and p.prosecdef and has_function_privilege('{POOLER_USER}', p.oid, 'execute') "
         "and not has_function_privilege('public', p.oid, 'execute')")
    return f"sudo -u postgres {psql(ctx, '-tAc ' + shlex.quote(q))} | grep -qx 1"


@lookup.undo
def _lookup_undo(ctx: Ctx, host: Host) -> list:
    return []  # the role and function stay: a running PgBouncer elsewhere may still use them


def login_proof(ctx: Ctx, host: Host, seconds: int = 30) -> Run:
    """The admin role logs in through this host's PgBouncer over TLS (verify-full) and runs a query: proves
    TLS, the auth_query lookup and the SCRAM pass-through to PostgreSQL. The password travels on stdin."""
    c = pgbouncer_context(ctx, host)
    dsn = (f"host={host.address} port={c['port']} dbname=postgres user={ctx.secrets['admin']['username']} "
           f"sslmode=verify-full sslrootcert={c['ca_file']} connect_timeout=3")
    probe = f"{ctx.paths.pg_bin_dir(ctx.inventory.cluster.postgres_major)}/psql -X -tA {shlex.quote(dsn)} -c 'select 1'"
    return Run(f"read -r PGPASSWORD; export PGPASSWORD; {wait_for(probe, seconds)}", user="postgres",
               stdin=(ctx.secrets["admin"]["password"] + "\n").encode(), timeout=seconds + 30)


def reload_or_restart(address: str, port: int) -> str:
    """Shell: reload PgBouncer when it already listens where the config says (its clients stay connected; a
    reload re-reads userlist.txt, the pools and the TLS files), restart it otherwise (not running, or a new
    listen address or port, which only a restart applies)."""
    return (f"if systemctl is-active -q pgbouncer && ss -Hltn 'sport = :{port}' | grep -qF '{address}:{port}'; "
            "then systemctl reload pgbouncer; else systemctl restart pgbouncer; fi")


@section.step("config", role="postgres", only=when_enabled)
def config(ctx: Ctx, host: Host) -> list:
    """PgBouncer: /etc/pgbouncer/pgbouncer.ini (transaction pooling, client TLS, auth_query) and the lookup
    role's password (userlist.txt, 0600 postgres); enabled, reloaded (restarted when not listening there yet),
    and a login through it proven"""
    pw = secret(ctx, "pooler")["password"]
    c = pgbouncer_context(ctx, host)
    userlist = template("pgbouncer/userlist.txt.j2", USERLIST, {"user": POOLER_USER, "password": pw},
                        mode="0600", owner="postgres", secret=True)
    return [Run("install -d -m 0755 /etc/pgbouncer"),
            template("pgbouncer/pgbouncer.ini.j2", CONF, c, mode="0640",
                     owner="postgres"),
            userlist,
            Run(f"systemctl enable pgbouncer && {reload_or_restart(host.address, c['port'])}"),
            login_proof(ctx, host)]


@config.check
def _config_check(ctx: Ctx, host: Host) -> str:
    return "systemctl is-active -q pgbouncer && systemctl is-enabled -q pgbouncer"


@config.undo
def _config_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl disable --now pgbouncer 2>/dev/null || true")]
