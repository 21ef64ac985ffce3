"""Backup section: pgBackRest over the cluster's own TLS, WAL archiving, a first full backup, the schedule.

Runs only when a host has role backup (the repository host); without one every step has no host and
`cluster.audit` warns "no backups configured". No SSH between the hosts: the repository and each PostgreSQL
host run `pgbackrest server` (TLS, client certificates of the project's CA, `tls-server-auth` naming who may
connect). archive_mode/archive_command are cluster-wide: patroni.dynamic puts them in the DCS when a backup
host exists (runbook.cluster.dynamic); this section restarts the members whose archive_mode is pending.
Restore hosts (role restore) get the packages, a certificate and a client configuration: `inv backup.restore`
restores onto them.
"""
from __future__ import annotations

import shlex

from runbook.cluster.commands import patronictl, psql
from runbook.cluster.context import Ctx
from runbook.core.step import Put, Run, Section, wait_for
from runbook.credentials.purposes import PGBACKREST, PGBACKREST_TLS_DIR
from runbook.inventory import Host
from runbook.sections.bundle_files import manifest, remote, sums
from runbook.sections.postgres import CREATECLUSTER, CREATECLUSTER_CONTENT, dpkg_install
from runbook.sections.tls_files import leaf_actions
from runbook.sections.units import template, unit_actions, unit_undo

section = Section("backup", 55, "pgBackRest: repository over TLS, WAL archiving, first full backup, schedule")

CONF = "/etc/pgbackrest/pgbackrest.conf"
TLS_DIR = PGBACKREST_TLS_DIR
TLS_PORT = 8432
SERVER = "pgbackrest-server"
SERVER_UNIT = f"/etc/systemd/system/{SERVER}.service"
TYPES = ("full", "diff")  # the scheduled backups: a timer each on the repository host
RESTORE_PGDATA = "/data/restore"  # on a restore host: where backup.restore puts the restored cluster


def stanza(ctx: Ctx) -> str:
    return ctx.inventory.cluster.name


def pgbr(ctx: Ctx, args: str) -> str:
    """pgbackrest for this cluster's stanza (run it as postgres)."""
    return f"pgbackrest --stanza={stanza(ctx)} {args}"


def backup_hosts(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """Every host pgBackRest runs on (repository, PostgreSQL, restore); none without a backup host."""
    if ctx.inventory.backup is None:
        return []
    return [h for h in hosts if h.has("backup") or h.has("postgres") or h.has("restore")]


def server_hosts(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """The hosts running `pgbackrest server`: the repository and the PostgreSQL hosts."""
    return [h for h in backup_hosts(ctx, hosts) if not h.has("restore")]


def repo_host(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    return [h for h in hosts if h.has("backup")]


def leader_host(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """The current leader (the first postgres host when none answers), only with a backup host."""
    from runbook.sections.patroni import current_leader

    return current_leader(ctx, hosts) if ctx.inventory.backup is not None else []


# -- certificates: the purpose `pgbackrest` (runbook.credentials.purposes) ---------------------------------
def cert_name(host: Host) -> str:
    """The certificate's CN and file name: the client identity `tls-server-auth` names."""
    return PGBACKREST.common_name(host.name)


# -- rendered files ------------------------------------------------------------------------------------------
def conf_context(ctx: Ctx, host: Host) -> dict:
    inv, b = ctx.inventory, ctx.inventory.cluster.backup
    repo = inv.backup
    assert repo is not None, "backup steps run only with a backup host"
    c = {"host": host.name, "stanza": stanza(ctx), "tls_dir": TLS_DIR, "tls_port": TLS_PORT,
         "cert_name": cert_name(host), "compress_type": b.compress_type, "socket_dir": ctx.paths.socket_dir,
         "pgdata": ctx.paths.pgdata(inv.cluster.postgres_major)}
    if host.has("backup"):
        return {**c, "repo_path": b.repo_path, "retention_full": b.retention_full,
                "pg_hosts": [h.name for h in inv.postgres],
                "clients": [cert_name(h) for h in inv.hosts if h.has("postgres") or h.has("restore")]}
    restore = host.has("restore")
    return {**c, "repo": repo.name, "repo_cn": cert_name(repo), "server": not restore,
            "archive_push_queue_max": b.archive_push_queue_max,
            "what": "A restore host: `inv backup.restore` restores the stanza here" if restore
            else "A PostgreSQL host: archive-push of its WAL, its data directory for the backups",
            **({"pgdata": RESTORE_PGDATA} if restore else {})}


def conf_file(ctx: Ctx, host: Host) -> Put:
    name = "pgbackrest/repo.conf.j2" if host.has("backup") else "pgbackrest/db.conf.j2"
    return template(name, CONF, conf_context(ctx, host), mode="0640", group="postgres")


# -- steps -----------------------------------------------------------------------------------------------------
@section.step("packages", role="all", only=backup_hosts)
def packages(ctx: Ctx, host: Host) -> list:
    """Packages: pgBackRest (the same version everywhere) from the bundle; PostgreSQL too on a restore host
    A PostgreSQL host has it from postgres.packages already; dpkg skips what is installed."""
    m = manifest(ctx)
    debs = sorted({e.path: e for r in host.roles for e in m.debs(host.os, r)}.values(), key=lambda e: e.order)
    files = " ".join(remote(e) for e in debs)
    return [Run("sha256sum --quiet -c -", stdin=sums(debs)),
            Put(CREATECLUSTER, CREATECLUSTER_CONTENT),
            dpkg_install(files)]


@packages.check
def _packages_check(ctx: Ctx, host: Host) -> str:
    want = next((e.version for r in host.roles for e in manifest(ctx).debs(host.os, r) if e.name == "pgbackrest"), "")
    return f"test \"$(dpkg-query -W -f='${{Version}}' pgbackrest 2>/dev/null)\" = {shlex.quote(want)}"


@packages.undo
def _packages_undo(ctx: Ctx, host: Host) -> list:
    return [Run("DEBIAN_FRONTEND=noninteractive dpkg -r pgbackrest >/dev/null 2>&1 || true")]


@section.step("tls", role="all", only=backup_hosts)
def tls(ctx: Ctx, host: Host) -> list:
    """Certificates: the CA and this host's own pgBackRest certificate and key (0600, postgres) in
    /etc/pgbackrest/tls; server and client identity (CN <host>-pgbackrest)"""
    return [Run(f"install -d -m 0750 -o postgres -g postgres {TLS_DIR}"),
            Put(f"{TLS_DIR}/ca.crt", ctx.pki.ca_pem(), mode="0644", owner="postgres"),
            *leaf_actions(ctx, host, TLS_DIR, PGBACKREST)]


@tls.check
def _tls_check(ctx: Ctx, host: Host) -> str:
    return f"test \"$(stat -c '%a %U' {TLS_DIR})\" = '750 postgres'"


@section.step("config", role="all", only=backup_hosts)
def config(ctx: Ctx, host: Host) -> list:
    """Config: /etc/pgbackrest/pgbackrest.conf (0640 root:postgres): TLS to the repository, retention,
    start-fast, archive-push-queue-max; on the repository host the PostgreSQL hosts as pgN-host (type tls)"""
    b = ctx.inventory.cluster.backup
    dirs = "/var/log/pgbackrest" + (f" {b.repo_path}" if host.has("backup") else "")
    return [Run(f"install -d -m 0750 -o postgres -g postgres {dirs}"), conf_file(ctx, host)]


@config.undo
def _config_undo(ctx: Ctx, host: Host) -> list:
    return []  # the file's own undo restores or removes it; the repository's backups stay


@section.step("server", role="all", only=server_hosts,
              depends_on=lambda ctx, host: [conf_file(ctx, host)])  # a changed config restarts the server
def server(ctx: Ctx, host: Host) -> list:
    """Server: `pgbackrest server` (TLS, port 8432) under systemd as postgres, enabled and (re)started"""
    put = template("pgbackrest/server.service.j2", SERVER_UNIT, {"stanza": stanza(ctx)})
    return [*unit_actions(SERVER, put), Run(f"systemctl restart {SERVER}"),
            Run(wait_for(f"ss -Htln 'sport = :{TLS_PORT}' | grep -q LISTEN", 30), timeout=60)]


@server.check
def _server_check(ctx: Ctx, host: Host) -> str:
    return f"systemctl is-active -q {SERVER} && ss -Htln 'sport = :{TLS_PORT}' | grep -q LISTEN"


@server.undo
def _server_undo(ctx: Ctx, host: Host) -> list:
    return unit_undo(SERVER)


ARCHIVE_ON = "select current_setting('archive_mode') = 'on' and current_setting('archive_command') like 'pgbackrest %'"


@section.step("archive", role="postgres", only=leader_host)
def archive(ctx: Ctx, host: Host) -> list:
    """Archiving on: the members restarted where archive_mode waits for a restart (patronictl restart
    --pending), until the leader archives and no member is pending (bounded: 3 min); archive_mode and
    archive_command come from the DCS (patroni.dynamic). Members flag "pending restart" at their next loop
    after edit-config, not at once: the loop waits for that too."""
    pending = (f"{patronictl(ctx, 'list -f json')} | python3 -c 'import json,sys; "
               "sys.exit(0 if any(m.get(\"Pending restart\") for m in json.load(sys.stdin)) else 1)'")
    on = f"{psql(ctx, '-tAc ' + shlex.quote(ARCHIVE_ON))} | grep -qx t"
    restart = patronictl(ctx, f"restart {ctx.inventory.cluster.name} --pending --force")
    return [Run(f"for i in $(seq 60); do if {pending}; then {restart} >/dev/null || true; elif {on}; then exit 0; "
                "fi; sleep 3; done; echo 'archive_mode is not on on the leader after 3 min (see patronictl list "
                "-e)' >&2; exit 1", user="postgres", timeout=300)]


@archive.check
def _archive_check(ctx: Ctx, host: Host) -> str:
    return f"sudo -u postgres {psql(ctx, '-tAc ' + shlex.quote(ARCHIVE_ON))} | grep -qx t"


@archive.undo
def _archive_undo(ctx: Ctx, host: Host) -> list:
    return []  # archive_mode follows the inventory: without a backup host patroni.dynamic takes it out


@section.step("stanza", role="backup", only=repo_host)
def stanza_create(ctx: Ctx, host: Host) -> list:
    """Stanza: `pgbackrest stanza-create` on the repository (reads the cluster's system id over TLS)"""
    return [Run(pgbr(ctx, "stanza-create"), user="postgres", timeout=300)]


@stanza_create.check
def _stanza_check(ctx: Ctx, host: Host) -> str:
    return f"sudo -u postgres {pgbr(ctx, 'info --output=json')} | grep -q '\"db\": *\\[{{'"


@stanza_create.undo
def _stanza_undo(ctx: Ctx, host: Host) -> list:
    return []  # the stanza holds the backups: `pgbackrest stanza-delete` is left to a person


@section.step("check", role="backup", only=repo_host, always_check=True)
def check(ctx: Ctx, host: Host) -> list:
    """Check: `pgbackrest check` (a WAL segment is switched, archived and found in the repository; the
    PostgreSQL hosts answer over TLS); it is the section's check too, on every run"""
    return [Run(pgbr(ctx, "check"), user="postgres", timeout=300)]


@check.check
def _check_check(ctx: Ctx, host: Host) -> str:
    return f"sudo -u postgres {pgbr(ctx, 'check')} >/dev/null"


@check.undo
def _check_undo(ctx: Ctx, host: Host) -> list:
    return []  # a probe


@section.step("full", role="backup", only=repo_host)
def full(ctx: Ctx, host: Host) -> list:
    """First full backup, unless the repository has one already (start-fast: an immediate checkpoint)"""
    return [Run(pgbr(ctx, "--type=full backup"), user="postgres", timeout=3600)]


@full.check
def _full_check(ctx: Ctx, host: Host) -> str:
    return f"sudo -u postgres {pgbr(ctx, 'info --output=json')} | grep -q '\"type\": *\"full\"'"


@full.undo
def _full_undo(ctx: Ctx, host: Host) -> list:
    return []  # a backup is data: retention (expire) removes old ones


def timer_files(ctx: Ctx) -> list[Put]:
    b = ctx.inventory.cluster.backup
    out = []
    for kind in TYPES:
        c = {"type": kind, "stanza": stanza(ctx), "schedule": getattr(b, f"{kind}_schedule")}
        out += [template("pgbackrest/backup.service.j2", f"/etc/systemd/system/pgbackrest-{kind}.service", c),
                template("pgbackrest/backup.timer.j2", f"/etc/systemd/system/pgbackrest-{kind}.timer", c)]
    return out


@section.step("timers", role="backup", only=repo_host)
def timers(ctx: Ctx, host: Host) -> list:
    """Schedule: systemd timers on the repository host (full weekly, differential daily by default:
    cluster.backup.full_schedule / diff_schedule), each calendar checked with systemd-analyze"""
    b = ctx.inventory.cluster.backup
    checks = [Run(f"systemd-analyze calendar {shlex.quote(s)} >/dev/null") for s in (b.full_schedule, b.diff_schedule)]
    return [*checks, *timer_files(ctx), Run("systemctl daemon-reload"),
            Run("systemctl enable --now " + " ".join(f"pgbackrest-{k}.timer" for k in TYPES))]


@timers.check
def _timers_check(ctx: Ctx, host: Host) -> str:
    return " && ".join(f"systemctl is-active -q pgbackrest-{k}.timer" for k in TYPES)


@timers.undo
def _timers_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl disable --now " + " ".join(f"pgbackrest-{k}.timer" for k in TYPES) + " 2>/dev/null || true")]
