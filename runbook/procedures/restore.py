"""`backup.restore --target-time T [--on HOST]`: point-in-time recovery onto a restore host, as ledger steps.

The restored copy runs standalone outside the cluster (no Patroni, listens on localhost only, archive_mode
off so it never pushes a new timeline into the cluster's repository, ssl off: the cluster's certificates are
not on that host). The steps: WAL up to now in the repository (`pgbackrest check`), the previous restore on
HOST wiped (irreversible), `pgbackrest restore --type=time`, the copy started and promoted at T.
"""
from __future__ import annotations

import datetime as dt
import shlex

from runbook.cluster.commands import psql
from runbook.cluster.context import Ctx
from runbook.core.step import Run, Section, Step
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.backup_ops import ORDER, require_repo
from runbook.sections.backup import RESTORE_PGDATA, leader_host, pgbr

UNIT = "runbook-restored"  # the restored server: a transient systemd unit on the restore host
START_WAIT = 900  # seconds for the replay up to T and the promotion
# Per-host settings of the cluster member the backup was taken from, replaced for a standalone copy
# (postgresql.auto.conf is read last; pgBackRest writes its recovery settings there too)
STANDALONE = {"listen_addresses": "localhost", "port": "5432", "ssl": "off", "logging_collector": "off",
              "synchronous_standby_names": "", "archive_mode": "off", "hba_file": f"{RESTORE_PGDATA}/pg_hba.conf",
              "ident_file": f"{RESTORE_PGDATA}/pg_ident.conf", "cluster_name": "restored"}


def parse_target_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """--target-time: an ISO 8601 time with its zone (2026-11-29T23:01:02.5+00:00 or ...Z), in the past."""
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ProcedureFailed(f"--target-time {text!r} is not an ISO 8601 time; write e.g. "
                              "2026-11-29T23:01:02+00:00 (with its zone)", 2) from None
    if t.tzinfo is None:
        raise ProcedureFailed(f"--target-time {text!r} has no time zone: the hosts may not share yours; add "
                              "one, e.g. +00:00 or Z", 2)
    if t > (now or dt.datetime.now(dt.UTC)):
        raise ProcedureFailed(f"--target-time {text!r} is in the future: WAL after now does not exist yet", 2)
    return t.astimezone(dt.UTC)


def pg_time(t: dt.datetime) -> str:
    """The target as PostgreSQL reads recovery_target_time: '2026-11-29 23:01:02.500000+00'."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def restore_host(ctx: Ctx, name: str | None) -> Host:
    """--on NAME (a host with role restore), or the first restore host."""
    spares = ctx.inventory.role("restore")
    if name is None:
        if not spares:
            raise ProcedureFailed(f"no host with roles: [restore] in {ctx.inventory.path}: add a spare host "
                                  "(e.g. spare01: {address: ..., roles: [restore]}), run `inv cluster.up`, "
                                  "then restore --on it", 2)
        return spares[0]
    for h in spares:
        if h.name == name:
            return h
    raise ProcedureFailed(f"--on {name}: not a host with role restore in {ctx.inventory.path} (restore hosts: "
                          f"{', '.join(h.name for h in spares) or 'none'}); a cluster member is never restored "
                          "over", 2)


def _as_postgres(cmd: str) -> str:
    return f"sudo -u postgres sh -c {shlex.quote(cmd)}"


def restore_steps(ctx: Ctx, host: Host, target: dt.datetime) -> list[Step]:
    require_repo(ctx)
    t = pg_time(target)
    sec = Section("backup.restore", ORDER, f"restore stanza {ctx.inventory.cluster.name} to {t} on {host.name}")
    on = lambda ctx, hosts: [h for h in hosts if h.name == host.name]  # noqa: E731
    bin_dir = ctx.paths.pg_bin_dir(ctx.inventory.cluster.postgres_major)
    promoted = psql(ctx, "-tAc 'select not pg_is_in_recovery()'") + " | grep -qx t"

    target_dep = lambda ctx, h: [f"target {t}"]  # noqa: E731  (a resumed run with another T redoes them)

    @sec.step("archived", role="postgres", only=leader_host, depends_on=target_dep)
    def archived(ctx: Ctx, h: Host) -> list:
        """WAL up to now in the repository, on the leader: a commit after T (recovery to a time stops at the
        first commit past it; without one it fails at the end of the WAL), then pgbackrest check (switches
        the WAL segment, waits until the repository has it)"""
        return [Run(psql(ctx, "-tAc 'select txid_current()'") + " >/dev/null", user="postgres", timeout=60),
                Run(pgbr(ctx, "check"), user="postgres", timeout=300)]

    @sec.step("wipe", role="restore", only=on,
              irreversible=f"deletes the previous restored copy in {RESTORE_PGDATA} on {host.name}")
    def wipe(ctx: Ctx, h: Host) -> list:
        """Stop a restored copy still running on the host and empty its data directory"""
        return [Run(f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; "
                    f"rm -rf {RESTORE_PGDATA} && install -d -m 0700 -o postgres -g postgres {RESTORE_PGDATA}")]

    @sec.step("restore", role="restore", only=on)
    def restore(ctx: Ctx, h: Host) -> list:
        """pgbackrest restore --type=time: the newest backup before T, then WAL replay up to T and a promotion;
        archive_mode off and the standalone settings in postgresql.auto.conf"""
        extra = "".join(f"{k} = '{v}'\n" for k, v in STANDALONE.items())
        # --delta: a resumed (or repeated) restore fixes up what an interrupted one left
        return [Run(f"systemctl stop {UNIT} 2>/dev/null; systemctl reset-failed {UNIT} 2>/dev/null; true"),
                Run(pgbr(ctx, f"--pg1-path={RESTORE_PGDATA} --delta --type=time --target={shlex.quote(t)} "
                              "--target-action=promote --archive-mode=off restore"), user="postgres", timeout=6 * 3600),
                Run(f"printf '%s' {shlex.quote('# pg-ha-runbook: a standalone restored copy' + chr(10) + extra)} "
                    f">> {RESTORE_PGDATA}/postgresql.auto.conf", user="postgres")]

    @sec.step("start", role="restore", only=on, depends_on=target_dep)
    def start(ctx: Ctx, h: Host) -> list:
        """Start the copy (transient unit runbook-restored, as postgres) and wait until it is promoted"""
        return [Run(f"systemd-run --unit={UNIT} --property=User=postgres --property=Group=postgres "
                    f"{bin_dir}/postgres -D {RESTORE_PGDATA}"),
                # bounded; a copy that stopped (e.g. the WAL ends before T) fails the step at once, with its log
                Run(f"for i in $(seq {START_WAIT // 2}); do {_as_postgres(promoted)} && exit 0; "
                    f"systemctl is-active -q {UNIT} || break; sleep 2; done; "
                    f"journalctl -u {UNIT} -n 40 --no-pager | grep -E 'FATAL|PANIC' | grep -v 57P03 | tail -5 >&2; "
                    f" echo '{host.name}: the restored copy is not promoted (log above)' >&2; exit 1",
                    timeout=START_WAIT + 60)]

    @start.check
    def _start_check(ctx: Ctx, h: Host) -> str:
        return f"systemctl is-active -q {UNIT} && {_as_postgres(promoted)}"

    @start.undo
    def _start_undo(ctx: Ctx, h: Host) -> list:
        return [Run(f"systemctl stop {UNIT} 2>/dev/null || true")]

    archived.undo_fn = lambda ctx, h: []  # a probe
    restore.undo_reason = "the restored copy is replaced by the next restore (its wipe step)"
    return [archived, wipe, restore, start]


RECOVERED_SQL = ("select coalesce(to_char(pg_last_xact_replay_timestamp() at time zone 'UTC', "
                 "'YYYY-MM-DD\"T\"HH24:MI:SS.US+00:00'), '')")


def recovered_at(ctx: Ctx, host: Host) -> str:
    """The time of the last transaction the restored copy replayed (pg_last_xact_replay_timestamp)."""
    r = ctx.transport.run(host, psql(ctx, "-tAc " + shlex.quote(RECOVERED_SQL)), user="postgres", timeout=60)
    if not r.ok:
        raise ProcedureFailed(f"{host.name}: the restored copy does not answer: {r.stderr.strip()[-300:]}", 1)
    return r.stdout.strip()
