"""`inv patroni.switchover|restart|reload`: checked before and after, rolling, replicas first."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

from runbook import console as ui
from runbook.cluster.context import Ctx
from runbook.cluster.readers import Member, host_of, members, wait
from runbook.cluster.render import member_name
from runbook.errors import ProcedureFailed


def _etcd_healthy(ctx: Ctx) -> list[str]:
    from runbook.cluster.commands import etcdctl
    from runbook.cluster.readers import parse_endpoint_health

    eps = ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd)
    for h in ctx.inventory.etcd:
        try:
            r = ctx.transport.run(h, etcdctl(ctx, h, "endpoint health -w json", eps), timeout=30)
        except Exception:
            continue
        health = parse_endpoint_health(r.stdout) if r.stdout.strip() else {}
        return [ep for ep, (ok, _) in health.items() if not ok] or ([] if health else ["no answer"])
    return ["no etcd host answered"]


def prechecks(ctx: Ctx, ms: list[Member], candidate: str | None,
              etcd_bad: list[str] | None = None) -> tuple[Member | None, Member | None, list[str]]:
    """The leader, the candidate and every reason to refuse (empty when it is safe; then both are set).
    `etcd_bad`: the unhealthy etcd endpoints when already asked (else asked here)."""
    problems = []
    leaders = [m for m in ms if m.is_leader]
    if len(leaders) != 1:
        problems.append(f"expected one running leader, found {len(leaders)}")
    if candidate:
        cname = candidate if candidate.startswith("patroni_") else member_name(ctx.inventory.get(candidate))
        cands = [m for m in ms if m.name == cname]
        if not cands:
            problems.append(f"no member {cname} (members: {', '.join(m.name for m in ms)})")
    else:
        cands = [m for m in ms if m.role == "Sync Standby"]
        if not cands:
            problems.append("no sync standby to switch over to")
    cand = cands[0] if cands else None
    if cand is not None:
        if cand.role != "Sync Standby":
            problems.append(f"{cand.name} is {cand.role}, not a sync standby: a switchover could lose commits")
        if cand.state != "streaming":
            problems.append(f"{cand.name} is {cand.state}, not streaming")
        if cand.lag not in (0, "0", None, 0.0):
            problems.append(f"{cand.name} lags by {cand.lag}")
    bad = _etcd_healthy(ctx) if etcd_bad is None else etcd_bad
    if bad:
        problems.append(f"etcd unhealthy: {', '.join(bad)}")
    return (leaders[0] if leaders else None), cand, problems


@dataclass(frozen=True)
class Bounds:
    """The post-check's budgets (seconds): each wait has its own, each try is much shorter than its wait."""

    leader: float = 60  # the candidate is the Patroni leader
    writable: float = 30  # ... and takes a local write transaction
    try_s: float = 10  # one psql try
    old_leader: float = 120  # the old leader streams from the new one
    sync: float = 60  # a sync standby is named again
    interval: float = 0.5  # between two `patronictl list` (each ~0.5 s of Patroni start-up on the host)
    stream_interval: float = 0.2  # between two psql tries (writable, pg_stat_replication): cheap


# pg_current_xact_id() assigns a transaction id: it fails in recovery and, committed with
# synchronous_commit = local, writes a commit record without waiting for any standby (the old leader
# may still be restarting) and without creating anything in a user database.
WRITABLE_SQL = "SET synchronous_commit TO local; SET statement_timeout TO '5s'; " \
               "SELECT pg_is_in_recovery(), pg_current_xact_id();"


def writable(ctx: Ctx, member: str, try_s: float = 10) -> bool:
    """True when the member's PostgreSQL is out of recovery and commits a transaction locally."""
    from runbook.cluster.commands import psql

    r = ctx.transport.run(host_of(ctx, member), psql(ctx, f"-tA -v ON_ERROR_STOP=1 -c {shlex.quote(WRITABLE_SQL)}"),
                          user="postgres", timeout=try_s)
    return r.ok and committed_locally(r.stdout)


def committed_locally(out: str) -> bool:
    """psql -tA output of WRITABLE_SQL: 'f|<xid>' = not in recovery and a transaction id was assigned."""
    last = out.strip().splitlines()[-1:]
    return bool(last) and last[0].startswith("f|") and last[0][2:].isdigit()


# The old leader as the new leader's PostgreSQL sees it: its walsender's state and sync_state (Patroni names
# each member's connection after the member). 'sync' (or 'quorum') = commits wait for it again.
STANDBY_SQL = "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = '{name}'"


def standby_state(ctx: Ctx, primary: str, standby: str, try_s: float = 10) -> tuple[str, str]:
    """(state, sync_state) of `standby`'s replication connection on `primary`; ('', '') when it has none."""
    from runbook.cluster.commands import psql

    sql = STANDBY_SQL.format(name=standby.replace("'", "''"))
    try:
        r = ctx.transport.run(host_of(ctx, primary), psql(ctx, f"-tA -F '|' -c {shlex.quote(sql)}"), user="postgres",
                              timeout=try_s)
    except Exception:  # noqa: BLE001 - one try of a bounded wait: the next try asks again
        return "", ""
    first = (r.stdout.strip().splitlines() or [""])[0] if r.ok else ""
    state, _, sync = first.partition("|")
    return state.strip(), sync.strip()


def postcheck(ctx: Ctx, lead: Member, cand: Member, t0: float, bounds: Bounds = Bounds(), settle: bool = True) -> dict:
    """After the switchover command: the candidate leads and writes locally, then (own bound) the old leader
    streams, then a sync standby again. Raises ProcedureFailed naming the check that timed out.

    The old leader's stream and its sync state are read on the new leader (pg_stat_replication, one psql per
    try), the moment they hold. Patroni names the member "Sync Standby" on its leader's next HA cycle (up to
    loop_wait later) although PostgreSQL already waits for it on commit; `settle` waits for that name too: what
    comes next in a procedure (another switchover, a restart) needs Patroni to see a sync standby."""
    from concurrent.futures import ThreadPoolExecutor

    iv = bounds.interval
    with ThreadPoolExecutor(max_workers=1) as pool:  # Patroni's view (patronictl, slow) beside PostgreSQL's (psql)
        leads = pool.submit(wait, lambda: any(m.name == cand.name and m.is_leader for m in members(ctx)),
                            bounds.leader, iv)
        wrote = wait(lambda: writable(ctx, cand.name, bounds.try_s), bounds.writable, bounds.stream_interval)
        led = leads.result()
    if not led:
        raise ProcedureFailed(f"post-check failed: {cand.name} is not the running leader {bounds.leader:.0f} s after "
                              "the switchover; see `inv cluster.status`", 1)
    if not wrote:
        raise ProcedureFailed(f"post-check failed: {cand.name} leads but did not commit a local write transaction "
                              f"within {bounds.writable:.0f} s (still in recovery?); see `inv cluster.status`", 1)
    t_write = time.monotonic() - t0
    seen = {"sync": ""}

    def streams() -> bool:
        state, seen["sync"] = standby_state(ctx, cand.name, lead.name, bounds.try_s)
        return state == "streaming"

    if not wait(streams, bounds.old_leader, bounds.stream_interval):
        raise ProcedureFailed(f"post-check failed: the switchover to {cand.name} succeeded (it leads and writes), "
                              f"but the old leader {lead.name} is not streaming after {bounds.old_leader:.0f} s; "
                              "see `inv cluster.status` and its Patroni log", 1)
    t_back = time.monotonic() - t0
    # synchronous_mode: the cluster is only as safe as before once commits wait for a standby again
    if seen["sync"] not in SYNC and not wait(lambda: standby_state(ctx, cand.name, lead.name, bounds.try_s)[1]
                                             in SYNC, bounds.sync, bounds.stream_interval):
        raise ProcedureFailed(f"post-check failed: the switchover to {cand.name} succeeded, but no sync standby "
                              f"{bounds.sync:.0f} s later", 1)
    t_sync = time.monotonic() - t0
    if settle and not wait(lambda: any(m.role == "Sync Standby" and m.streaming for m in members(ctx)),
                           bounds.sync, iv):
        raise ProcedureFailed(f"post-check failed: the switchover to {cand.name} succeeded, but no sync standby "
                              f"{bounds.sync:.0f} s later (Patroni names none)", 1)
    return {"writable_s": round(t_write, 2), "old_leader_streaming_s": round(t_back, 2), "sync_s": round(t_sync, 2)}


SYNC = ("sync", "quorum")


def settled_members(ctx: Ctx, ms: list[Member], bounds: Bounds = Bounds()) -> list[Member]:
    """The members once Patroni names a sync standby, when a replica streams but none is named yet (right after
    a switchover that did not settle: its leader names it on its next HA cycle, and Patroni switches over only
    to a member it names). Bounded by `bounds.sync`; the pre-checks then judge what they see.

    A replica streams when Patroni's record says so or, before that record caught up (each member rewrites
    its own on its next HA cycle: up to loop_wait after its PostgreSQL streams, e.g. "stopped" or "running"
    right after it was demoted), when the leader's PostgreSQL has its walsender streaming. A replica that
    does not stream in either view is refused at once: nothing is about to name it."""
    if not ctx.inventory.cluster.patroni.synchronous_mode or any(m.role == "Sync Standby" for m in ms):
        return ms
    leaders = [m for m in ms if m.is_leader]
    replicas = [m for m in ms if not m.is_leader]
    if len(leaders) != 1 or not any(m.streaming or standby_state(ctx, leaders[0].name, m.name, bounds.try_s)[0]
                                    == "streaming" for m in replicas):
        return ms
    ui.console.print("waiting for Patroni to name the streaming replica its sync standby (its leader's next HA "
                     f"cycle; at most {bounds.sync:.0f} s)")
    seen = {"ms": ms}

    def named() -> bool:
        seen["ms"] = members(ctx)
        return any(m.role == "Sync Standby" for m in seen["ms"])

    wait(named, bounds.sync, bounds.interval)
    return seen["ms"]


def do_switchover(ctx: Ctx, candidate: str | None, bounds: Bounds = Bounds(), settle: bool = True) -> dict:
    """Pre-checks, `patronictl switchover`, post-checks (see postcheck; `settle`: also until Patroni names the
    sync standby). Returns the figures; raises ProcedureFailed."""
    from concurrent.futures import ThreadPoolExecutor

    from runbook.cluster.commands import patronictl

    with ThreadPoolExecutor(max_workers=1) as pool:  # etcd's health (etcd hosts) beside the members (postgres)
        etcd = pool.submit(_etcd_healthy, ctx)
        ms = settled_members(ctx, members(ctx), bounds)
        etcd_bad = etcd.result()
    lead, cand, problems = prechecks(ctx, ms, candidate, etcd_bad)
    if problems or lead is None or cand is None:
        raise ProcedureFailed("switchover refused by the pre-checks:\n  " + "\n  ".join(problems), 1)
    ui.console.print(f"pre-checks ok: leader {lead.name}, candidate {cand.name} (sync standby, lag 0), etcd healthy")
    lh = host_of(ctx, lead.name)
    t0 = time.monotonic()
    r = ctx.transport.run(lh, patronictl(ctx, f"switchover {ctx.inventory.cluster.name} --leader {lead.name} "
                                              f"--candidate {cand.name} --force"), user="postgres", timeout=120)
    t_cmd = time.monotonic() - t0
    ctx.ledger.event(lh.name, "patroni.switchover", "run", f"switchover {lead.name} -> {cand.name}", r.rc,
                     r.stdout, r.stderr, round(t_cmd, 3))
    if not r.ok:
        raise ProcedureFailed(f"patronictl switchover failed on {lh.name}: {r.stderr.strip() or r.stdout.strip()}", 1)
    res = {"from": lead.name, "to": cand.name, "command_s": round(t_cmd, 2),
           **postcheck(ctx, lead, cand, t0, bounds, settle)}
    ctx.ledger.event(lh.name, "patroni.switchover", "result", str(res), 0)
    return res


def rolling(ctx: Ctx, verb: str) -> None:
    """patronictl VERB on every member, replicas first, each waited for; then the whole cluster healthy."""
    from runbook.cluster.commands import patronictl

    ms = members(ctx)
    order = [m for m in ms if not m.is_leader] + [m for m in ms if m.is_leader]
    for m in order:
        h = host_of(ctx, m.name)
        t0 = time.monotonic()
        r = ctx.transport.run(h, patronictl(ctx, f"{verb} {ctx.inventory.cluster.name} {m.name} --force"),
                              user="postgres", timeout=300)
        ctx.ledger.event(h.name, f"patroni.{verb}", "run", f"{verb} {m.name}", r.rc, r.stdout, r.stderr)
        if not r.ok:
            raise ProcedureFailed(f"{verb} of {m.name} failed: {r.stderr.strip() or r.stdout.strip()}", 1)
        ok = wait(lambda m=m: any(x.name == m.name and (x.is_leader or x.streaming) for x in members(ctx)), 120, 1)
        if not ok:
            raise ProcedureFailed(f"{m.name} did not come back (running/streaming) within 120 s; stopping here", 1)
        ui.console.print(f"  [green]✓[/] {verb} {m.name} ({m.role}) {time.monotonic() - t0:.1f}s")
    # restarting the leader drops the replicas' streams for a moment: done = all healthy again
    if not wait(lambda: _healthy(members(ctx)), 120, 1):
        raise ProcedureFailed(f"after the {verb} the cluster is not healthy (a leader and streaming replicas) "
                   "within 120 s; see `inv cluster.status`", 1)


def _healthy(ms: list[Member]) -> bool:
    return sum(m.is_leader for m in ms) == 1 and all(m.is_leader or m.streaming for m in ms)


