"""Day-2 pgBackRest: `backup.run`, `backup.check` as ledger steps; `pgbackrest info` parsed for `backup.list`;
the audit's backup check. The restore is in runbook.procedures.restore.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from runbook.cluster.context import Ctx
from runbook.core.step import Run, Section, Step
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.sections.backup import leader_host, pgbr, repo_host

ORDER = 61  # after the install sections and the membership procedures
BACKUP_TYPES = ("full", "diff", "incr")
NO_BACKUPS = "no backups configured: no host has roles: [backup] (the pgBackRest repository)"


def require_repo(ctx: Ctx) -> Host:
    """The repository host, or a clear refusal naming the inventory."""
    repo = ctx.inventory.backup
    if repo is None:
        raise ProcedureFailed(f"{NO_BACKUPS} in {ctx.inventory.path}; add one (e.g. backup01: {{address: ..., "
                              "roles: [backup]}}) and run `inv cluster.up`", 2)
    return repo


def run_steps(ctx: Ctx, kind: str) -> list[Step]:
    """backup.run: one backup of `kind` taken by the repository host from the current primary."""
    if kind not in BACKUP_TYPES:
        raise ProcedureFailed(f"--type {kind!r}: use one of {', '.join(BACKUP_TYPES)}", 2)
    sec = Section("backup.run", ORDER, f"a {kind} backup of stanza {ctx.inventory.cluster.name}")

    @sec.step("backup", role="backup", only=repo_host)
    def backup(ctx: Ctx, h: Host) -> list:
        """Take the backup on the repository host (pgbackrest backup; an interrupted one is resumed by
        pgBackRest itself on the next run); then expire what the retention no longer keeps"""
        return [Run(pgbr(ctx, f"--type={kind} backup"), user="postgres", timeout=6 * 3600)]

    @backup.undo
    def _backup_undo(ctx: Ctx, h: Host) -> list:
        return []  # a backup is data: retention expires it

    return [backup]


def check_steps(ctx: Ctx) -> list[Step]:
    """backup.check: `pgbackrest check` on the repository host and on the current leader (archiving works
    from wherever the primary is now: after a switchover too)."""
    sec = Section("backup.check", ORDER, f"pgbackrest check of stanza {ctx.inventory.cluster.name}")

    @sec.step("repo", role="backup", only=repo_host)
    def repo(ctx: Ctx, h: Host) -> list:
        """pgbackrest check from the repository host: the PostgreSQL hosts answer over TLS, a switched WAL
        segment reaches the repository"""
        return [Run(pgbr(ctx, "check"), user="postgres", timeout=300)]

    @sec.step("leader", role="postgres", only=leader_host)
    def leader(ctx: Ctx, h: Host) -> list:
        """pgbackrest check on the current leader: its archive_command reaches the repository over TLS"""
        return [Run(pgbr(ctx, "check"), user="postgres", timeout=300)]

    for s in (repo, leader):
        s.undo_fn = lambda ctx, h: []  # probes
    return [repo, leader]


# -- pgbackrest info --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupInfo:
    label: str
    type: str
    start: dt.datetime
    stop: dt.datetime
    size: int  # database size
    repo_size: int  # in the repository (compressed, a diff/incr only its changes)
    wal_start: str
    wal_stop: str
    error: bool

    @property
    def seconds(self) -> int:
        return int((self.stop - self.start).total_seconds())


@dataclass(frozen=True)
class StanzaInfo:
    name: str
    status: str  # "ok" or pgBackRest's message
    code: int
    backups: tuple[BackupInfo, ...]
    wal_min: str
    wal_max: str


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(ts), dt.UTC)


def parse_info(text: str, stanza: str) -> StanzaInfo:
    """`pgbackrest info --output=json` -> the stanza's backups (oldest first) and archived WAL range."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ProcedureFailed(f"pgbackrest info printed no JSON ({exc}): {text.strip()[:200]!r}", 1) from None
    entry = next((s for s in doc if s.get("name") == stanza), None) if isinstance(doc, list) else None
    if entry is None:
        raise ProcedureFailed(f"pgbackrest info knows no stanza {stanza!r}: run `inv cluster.up` (backup.stanza)", 1)
    backups = tuple(BackupInfo(
        label=b["label"], type=b["type"], start=_utc(b["timestamp"]["start"]), stop=_utc(b["timestamp"]["stop"]),
        size=int(b.get("info", {}).get("size", 0)),
        repo_size=int(b.get("info", {}).get("repository", {}).get("delta", 0)),
        wal_start=(b.get("archive") or {}).get("start") or "", wal_stop=(b.get("archive") or {}).get("stop") or "",
        error=bool(b.get("error", False))) for b in entry.get("backup", []))
    archives = entry.get("archive") or []
    status = entry.get("status") or {}
    return StanzaInfo(name=stanza, status=str(status.get("message", "")), code=int(status.get("code", -1)),
                      backups=tuple(sorted(backups, key=lambda b: b.start)),
                      wal_min=min((a.get("min") or "" for a in archives), default=""),
                      wal_max=max((a.get("max") or "" for a in archives), default=""))


def read_info(ctx: Ctx) -> StanzaInfo:
    repo = require_repo(ctx)
    r = ctx.transport.run(repo, pgbr(ctx, "info --output=json"), user="postgres", timeout=120)
    if not r.ok:
        raise ProcedureFailed(f"{repo.name}: pgbackrest info failed: {(r.stderr or r.stdout).strip()[-300:]}", 1)
    return parse_info(r.stdout, ctx.inventory.cluster.name)


def info_doc(info: StanzaInfo) -> dict:
    """backup.list --json: stable keys."""
    return {"stanza": info.name, "status": info.status, "status_code": info.code,
            "wal": {"min": info.wal_min, "max": info.wal_max},
            "backups": [{"label": b.label, "type": b.type, "start": b.start.isoformat(), "stop": b.stop.isoformat(),
                         "seconds": b.seconds, "size_bytes": b.size, "repo_bytes": b.repo_size,
                         "wal_start": b.wal_start, "wal_stop": b.wal_stop, "error": b.error} for b in info.backups]}


def check_backups(info: StanzaInfo, now: dt.datetime, max_age_days: float = 8) -> list[str]:
    """The audit's view of the repository (pure): stanza ok, a full backup, the newest not too old."""
    problems = []
    if info.code != 0:
        problems.append(f"stanza {info.name}: {info.status} (pgbackrest info status {info.code})")
    if not any(b.type == "full" for b in info.backups):
        problems.append(f"stanza {info.name}: no full backup (inv backup.run --type full)")
    elif (now - info.backups[-1].stop).total_seconds() > max_age_days * 86400:
        problems.append(f"stanza {info.name}: the newest backup is from {info.backups[-1].stop:%Y-%m-%d %H:%M} UTC, "
                        f"over {max_age_days:g} days old: are the timers running on the repository host?")
    return problems


def audit_backup(ctx: Ctx):
    """cluster.audit: a warning without a backup host; with one, the repository's state as findings."""
    from runbook.procedures.audit import Check

    repo = ctx.inventory.backup
    if repo is None:
        return Check("local", "backups (pgBackRest)", [], warnings=[NO_BACKUPS])
    try:
        problems = check_backups(read_info(ctx), dt.datetime.now(dt.UTC))
    except ProcedureFailed as exc:
        problems = [str(exc)]
    return Check(repo.name, "pgBackRest repository: stanza ok, recent full backup", problems)
