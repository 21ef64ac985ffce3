"""cluster.audit's capacity findings: what takes a running cluster down weeks after the install.

- PostgreSQL: an inactive replication slot that holds back WAL (pg_wal grows until the disk is full), and
  max_slot_wal_keep_size = -1 (no bound on what a slot may retain);
- etcd: an active alarm (NOSPACE stops every write: Patroni cannot renew the leader key and the primary
  demotes), a backend over 80 % of its quota, compaction off.

Pure checks on command output (unit-tested on captures); the remote part only reads.
"""
from __future__ import annotations

import json
import re
import shlex

from runbook.cluster.context import Ctx
from runbook.inventory import Host

RETAINED_WAL_LIMIT = 16 * 1024**2  # one WAL segment: an idle replica's slot copy stays well below it
QUOTA_SHARE_LIMIT = 0.8
ETCD_DEFAULT_QUOTA = 2 * 1024**3  # what etcd uses when quota-backend-bytes is not set
SLOTS_SQL = ("select slot_name, active, coalesce(pg_wal_lsn_diff(case when pg_is_in_recovery() then "
             "pg_last_wal_replay_lsn() else pg_current_wal_lsn() end, restart_lsn), 0)::bigint, "
             "coalesce(wal_status, '') from pg_replication_slots where restart_lsn is not null order by 1")
_ALARM = re.compile(r"memberID:(\d+)\s+alarm:(\w+)")


def _mb(n: float) -> str:
    return f"{n / 1024**2:.0f} MB"


def check_slots(rows_out: str, keep_size: str, limit: int = RETAINED_WAL_LIMIT) -> list[str]:
    """`slot|active(t/f)|retained bytes|wal_status` rows and `show max_slot_wal_keep_size`."""
    problems = []
    for ln in rows_out.splitlines():
        f = ln.strip().split("|")
        if len(f) != 4 or not f[2].lstrip("-").isdigit():
            continue
        name, active, retained, status = f[0], f[1] == "t", int(f[2]), f[3]
        if not active and retained >= limit:
            problems.append(f"slot {name} is inactive and retains {_mb(retained)} of WAL ({status or 'reserved'}): "
                            f"start its consumer, or drop it (remove it from cluster.permanent_slots, or "
                            f"select pg_drop_replication_slot('{name}'))")
    if keep_size.strip() == "-1":
        problems.append("max_slot_wal_keep_size is -1: a slot may retain WAL until the disk is full; set "
                        "cluster.max_slot_wal_keep_size and run cluster.up")
    return problems


def member_id(status_json: str) -> str | None:
    """The member id (decimal, as `etcdctl alarm list` prints it) from `endpoint status -w json`."""
    for e in json.loads(status_json or "[]"):
        mid = e.get("Status", {}).get("header", {}).get("member_id")
        if mid:
            return str(mid)
    return None


def parse_alarms(alarm_out: str) -> list[tuple[str, str]]:
    """`etcdctl alarm list` -> [(member id, alarm)], e.g. [('1234', 'NOSPACE')]."""
    return _ALARM.findall(alarm_out)


def check_etcd_alarms(alarm_out: str, own_id: str | None) -> list[str]:
    """The alarms raised by this member (alarms are cluster-wide; each host reports its own)."""
    mine = [a for m, a in parse_alarms(alarm_out) if own_id is None or m == own_id]
    return [f"active alarm {a}: etcd refuses writes (Patroni cannot renew the leader key); free space with "
            "`inv etcd.maintain`, then `inv etcd.maintain --disarm`" for a in mine]


def quota_of(conf_grep: str) -> int:
    m = re.search(r"^quota-backend-bytes:\s*(\d+)", conf_grep, re.MULTILINE)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else ETCD_DEFAULT_QUOTA


def check_etcd_quota(status_json: str, quota: int, share: float = QUOTA_SHARE_LIMIT) -> list[str]:
    """The backend size (dbSize, what the quota counts) against the quota."""
    problems = []
    entries = json.loads(status_json or "[]")
    if not entries:
        return ["etcd did not report its status (endpoint status)"]
    for e in entries:
        size = int(e.get("Status", {}).get("dbSize", 0))
        if size > share * quota:
            problems.append(f"backend {_mb(size)} is {size / quota:.0%} of its quota {_mb(quota)}: defragment with "
                            "`inv etcd.maintain` (and check that compaction runs)")
    return problems


def check_etcd_compaction(conf_grep: str) -> list[str]:
    """auto-compaction-retention set and not 0 (0, etcd's default, keeps every revision forever)."""
    m = re.search(r"^auto-compaction-retention:\s*[\"']?([^\"'\s]*)", conf_grep, re.MULTILINE)
    if not m or m.group(1) in ("", "0", "0h", "0m", "0s"):
        return ["auto-compaction is off: revisions pile up until the quota raises NOSPACE; set "
                "cluster.etcd_auto_compaction_retention and run cluster.up"]
    return []


def audit_etcd_capacity(ctx: Ctx, h: Host):
    from runbook.cluster.commands import etcdctl
    from runbook.procedures.audit import Check

    run = lambda cmd: ctx.transport.run(h, cmd, timeout=60)  # noqa: E731
    conf = run(f"grep -E '^(quota-backend-bytes|auto-compaction-(mode|retention)):' {ctx.paths.etcd_conf}").stdout
    status = run(etcdctl(ctx, h, "endpoint status -w json"))
    alarms = run(etcdctl(ctx, h, "alarm list"))
    out = status.stdout if status.ok else ""
    return [Check(h.name, "etcd: no active alarm",
                  check_etcd_alarms(alarms.stdout, member_id(out)) if alarms.ok else
                  [f"alarm list failed: {alarms.stderr.strip()[-200:]}"]),
            Check(h.name, f"etcd: backend under {QUOTA_SHARE_LIMIT:.0%} of its quota",
                  check_etcd_quota(out, quota_of(conf))),
            Check(h.name, "etcd: auto-compaction on", check_etcd_compaction(conf))]


def audit_wal_retention(ctx: Ctx, h: Host):
    from runbook.cluster.commands import psql
    from runbook.procedures.audit import Check

    rows = ctx.transport.run(h, psql(ctx, f"-tA -F '|' -c {shlex.quote(SLOTS_SQL)}"), user="postgres", timeout=60)
    keep = ctx.transport.run(h, psql(ctx, "-tAc 'show max_slot_wal_keep_size'"), user="postgres", timeout=60)
    if not (rows.ok and keep.ok):
        return Check(h.name, "no inactive slot retaining WAL",
                     [f"psql failed: {(rows.stderr or keep.stderr).strip()[-200:]}"])
    return Check(h.name, "no inactive slot retaining WAL", check_slots(rows.stdout, keep.stdout))
