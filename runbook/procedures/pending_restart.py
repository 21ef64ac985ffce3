"""`inv patroni.restart --pending`: restart the members Patroni marks "pending restart", in the order the
changed settings require, one at a time, each waited for.

PostgreSQL requires a hot standby to have at least the primary's value of the settings that size the
shared memory for other backends' transactions (max_connections, max_worker_processes, max_wal_senders,
max_prepared_transactions, max_locks_per_transaction): raised, the replicas restart first (a switchover
then moves the primary onto a restarted replica, and the old primary restarts as a replica); lowered,
the primary restarts first, in place (a switchover would hand the lead to a replica that still has the
higher value, and the old primary would rejoin below it). Any other setting that needs a restart: the
replicas first, then a switchover. Both directions at once cannot be ordered: the procedure refuses and
asks for two changes.

Resumable: what is left to do is read again from Patroni each time (`patronictl list -e`), and each
restart is `patronictl restart --pending` (a member no longer pending is not restarted again).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

from runbook import console as ui
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, patronictl_any, wait
from runbook.errors import ProcedureFailed

# A standby needs at least the primary's value of these (PostgreSQL docs, "Hot Standby", Administrator's
# Overview); each sizes shared memory.
STANDBY_AT_LEAST = ("max_connections", "max_worker_processes", "max_wal_senders", "max_prepared_transactions",
                    "max_locks_per_transaction")
REPLICAS_FIRST, PRIMARY_FIRST = "replicas first", "primary first"

_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4,
          "us": 1e-3, "ms": 1, "s": 1000, "min": 60000, "h": 3600000, "d": 86400000}


def as_number(value: Any) -> float | None:
    """A PostgreSQL setting as a number in base units ('512MB', '8kB', '100', 1.5), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m:
        return None
    unit = m.group(2).lower()
    if unit and unit not in _UNITS:
        return None
    return float(m.group(1)) * _UNITS.get(unit, 1)


def restart_order(changes: Iterable[tuple[str, Any, Any]]) -> str:
    """(setting, old, new) of every change that waits for a restart -> REPLICAS_FIRST or PRIMARY_FIRST.

    Raises ValueError when one standby-bound setting is raised and another lowered (no order fits both)."""
    raised: list[str] = []
    lowered: list[str] = []
    for name, old, new in changes:
        if name not in STANDBY_AT_LEAST:
            continue
        a, b = as_number(old), as_number(new)
        if a is None or b is None or a == b:
            continue
        (raised if b > a else lowered).append(f"{name} {old}->{new}")
    if raised and lowered:
        raise ValueError(f"raised ({', '.join(raised)}) needs the replicas restarted first, lowered "
                         f"({', '.join(lowered)}) the primary first: no order fits both; change them in two "
                         "steps (cluster.up, patroni.restart --pending, then the other)")
    return PRIMARY_FIRST if lowered else REPLICAS_FIRST


def parse_reasons(text: str) -> list[tuple[str, str, str]]:
    """patronictl's 'Pending restart reason' ('max_connections: 100->150' per line) -> (setting, old, new)."""
    out = []
    for line in (text or "").splitlines():
        name, sep, rest = line.partition(": ")
        old, arrow, new = rest.partition("->")
        if sep and arrow and name.strip():
            out.append((name.strip(), old.strip(), new.strip()))
    return out


@dataclass(frozen=True)
class PMember:
    name: str
    role: str
    state: str
    pending: bool
    reasons: tuple[tuple[str, str, str], ...]

    @property
    def is_leader(self) -> bool:
        return self.role == "Leader" and self.state == "running"


def parse_extended(text: str) -> list[PMember]:
    """`patronictl list -e -f json` -> members with their pending-restart flag and reasons."""
    return [PMember(m.get("Member", ""), m.get("Role", ""), m.get("State", ""), bool(m.get("Pending restart")),
                    tuple(parse_reasons(m.get("Pending restart reason", ""))))
            for m in json.loads(text or "[]")]


def members_ext(ctx: Ctx) -> list[PMember]:
    try:
        return parse_extended(patronictl_any(ctx, "list -e -f json"))
    except RuntimeError as exc:
        raise ProcedureFailed(str(exc), 1) from None


@dataclass(frozen=True)
class Plan:
    order: str
    steps: tuple[tuple[str, str], ...]  # (action, member): restart | switchover
    changes: tuple[tuple[str, str, str], ...]


def plan(ms: list[PMember]) -> Plan:
    """What --pending does with these members: the order, then restarts (and a switchover) one at a time."""
    pending = [m for m in ms if m.pending]
    changes = tuple(dict.fromkeys(c for m in pending for c in m.reasons))
    try:
        order = restart_order(changes)
    except ValueError as exc:
        raise ProcedureFailed(f"patroni.restart --pending refused: {exc}", 1) from None
    lead = next((m for m in ms if m.is_leader), None)
    replicas = [m for m in pending if m is not lead]
    steps: list[tuple[str, str]] = []
    if lead is not None and lead.pending and order == PRIMARY_FIRST:
        steps.append(("restart", lead.name))
    steps += [("restart", m.name) for m in replicas]
    if lead is not None and lead.pending and order == REPLICAS_FIRST:
        standbys = [m for m in ms if m is not lead and m.state == "streaming"]
        steps.append(("switchover", lead.name) if standbys else ("restart", lead.name))
    return Plan(order, tuple(steps), changes)


def _back(ctx: Ctx, name: str, sync_count: int) -> bool:
    """The member runs again: the leader, or streaming and (synchronous mode) a sync standby is named."""
    ms = members_ext(ctx)
    me = next((m for m in ms if m.name == name), None)
    if me is None:
        return False
    if me.is_leader:
        return True
    if me.state != "streaming":
        return False
    return sum(m.role == "Sync Standby" and m.state == "streaming" for m in ms) >= sync_count


def restart_pending(ctx: Ctx, dry: bool = False, wait_s: float = 180) -> dict:
    """Restart what Patroni marks pending, in order; returns {"order", "done": [(action, member, seconds)]}."""
    from runbook.cluster.commands import patronictl
    from runbook.procedures.switchover import do_switchover

    ms = members_ext(ctx)
    p = plan(ms)
    if not p.steps:
        ui.console.print("no member is pending restart")
        return {"order": p.order, "done": [], "changes": []}
    ui.console.print(f"pending restart: {', '.join(f'{n} {o}->{w}' for n, o, w in p.changes) or 'no reason given'}"
                     f" -> {p.order}: " + ", ".join(f"{a} {m}" for a, m in p.steps))
    if dry:
        return {"order": p.order, "done": [], "plan": list(p.steps), "changes": list(p.changes)}
    replicas = len(ms) - 1
    cfg = ctx.inventory.cluster.patroni
    sync_count = min(cfg.synchronous_node_count, replicas) if cfg.synchronous_mode else 0
    done: list[tuple[str, str, float]] = []
    for action, name in p.steps:
        h = host_of(ctx, name)
        t0 = time.monotonic()
        if action == "switchover":
            res = do_switchover(ctx, None)
            ctx.ledger.event(h.name, "patroni.restart", "switchover", json.dumps(res), 0)
            # the demoted leader restarted as a replica: still pending only if that kept the old value
            if any(m.name == name and m.pending for m in members_ext(ctx)):
                _restart(ctx, name, patronictl, wait_s, sync_count)
        else:
            if p.order == PRIMARY_FIRST and name != _leader_name(ctx):
                _caught_up(ctx, name, wait_s)
            _restart(ctx, name, patronictl, wait_s, sync_count)
        done.append((action, name, round(time.monotonic() - t0, 1)))
        ui.console.print(f"  [green]✓[/] {action} {name} {time.monotonic() - t0:.1f}s")
    left = wait(lambda: not any(m.pending for m in members_ext(ctx)), 60, 2)
    if not left:
        still = [m.name for m in members_ext(ctx) if m.pending]
        raise ProcedureFailed(f"still pending restart after the restarts: {', '.join(still)}; run "
                              "`inv patroni.restart --pending` again or see `patronictl list -e`", 1)
    return {"order": p.order, "done": done, "changes": list(p.changes)}


def _leader_name(ctx: Ctx) -> str | None:
    return next((m.name for m in members_ext(ctx) if m.is_leader), None)


def _caught_up(ctx: Ctx, name: str, wait_s: float) -> None:
    """Lowered settings: a replica restarts only once it has replayed the primary's WAL up to now, which
    includes the parameter-change record the primary wrote at its restart. Patroni starts a replica with
    the larger of its own value and the one in pg_controldata: restarted before that record, it would
    keep the old, higher value (and stay pending restart)."""
    from runbook.cluster.commands import psql

    lead = _leader_name(ctx)
    if lead is None:
        raise ProcedureFailed(f"no running leader to restart {name} after; see `inv cluster.status`", 1)
    r = ctx.transport.run(host_of(ctx, lead), psql(ctx, "-tAc 'select pg_current_wal_lsn()'"), user="postgres",
                          timeout=30)
    lsn = r.stdout.strip()
    if not r.ok or not re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", lsn):
        raise ProcedureFailed(f"could not read the primary's WAL position on {lead}: {r.stderr.strip()[-200:]}", 1)
    q = f"-tAc \"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn\""
    h = host_of(ctx, name)
    if not wait(lambda: ctx.transport.run(h, psql(ctx, q), user="postgres", timeout=30).stdout.strip() == "t",
                wait_s, 1):
        raise ProcedureFailed(f"{name} did not replay the primary's WAL up to {lsn} within {wait_s:.0f} s; "
                              "not restarting it (it would keep the old value)", 1)


def _restart(ctx: Ctx, name: str, patronictl, wait_s: float, sync_count: int) -> None:
    h = host_of(ctx, name)
    r = ctx.transport.run(h, patronictl(ctx, f"restart {ctx.inventory.cluster.name} {name} --pending --force"),
                          user="postgres", timeout=300)
    ctx.ledger.event(h.name, "patroni.restart", "run", f"restart --pending {name}", r.rc, r.stdout, r.stderr)
    if not r.ok:
        raise ProcedureFailed(f"restart of {name} failed: {r.stderr.strip() or r.stdout.strip()}", 1)
    if not wait(lambda: _back(ctx, name, sync_count), wait_s, 1):
        raise ProcedureFailed(f"{name} did not run again (streaming, a sync standby named) within {wait_s:.0f} s; "
                              "stopping here, nothing else restarted; see `inv cluster.status`", 1)
