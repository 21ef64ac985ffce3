"""`inv patroni.switchover|restart|reload`: checked before and after, rolling, replicas first."""
from __future__ import annotations

import shlex
import time

from runbook import console as ui
from runbook.cluster.readers import Member, host_of, members, wait
from runbook.cluster.render import member_name
from runbook.core.context import Ctx
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


def prechecks(ctx: Ctx, ms: list[Member], candidate: str | None) -> tuple[Member, Member, list[str]]:
    """The leader, the candidate and every reason to refuse (empty when it is safe)."""
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
    bad = _etcd_healthy(ctx)
    if bad:
        problems.append(f"etcd unhealthy: {', '.join(bad)}")
    return (leaders[0] if leaders else None), cand, problems


def _write_ok(ctx: Ctx, member: str) -> bool:
    from runbook.cluster.commands import psql

    sql = ("CREATE TABLE IF NOT EXISTS runbook_verify (token text primary key, at timestamptz default now()); "
           f"INSERT INTO runbook_verify (token) VALUES ('switchover-{time.time_ns()}');")
    r = ctx.transport.run(host_of(ctx, member), psql(ctx, f"-v ON_ERROR_STOP=1 -c {shlex.quote(sql)}"),
                          user="postgres", timeout=30)
    return r.ok


def do_switchover(ctx: Ctx, candidate: str | None) -> dict:
    from runbook.cluster.commands import patronictl

    ms = members(ctx)
    lead, cand, problems = prechecks(ctx, ms, candidate)
    if problems:
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
    new = wait(lambda: any(m.name == cand.name and m.is_leader for m in members(ctx)), 60, 0.5)
    if not new or not wait(lambda: _write_ok(ctx, cand.name), 30, 0.5):
        raise ProcedureFailed(f"post-check failed: {cand.name} is not a leader accepting writes after 60 s", 1)
    t_write = time.monotonic() - t0
    back = wait(lambda: any(m.name == lead.name and m.streaming for m in members(ctx)), 120, 1)
    t_back = time.monotonic() - t0
    if not back:
        raise ProcedureFailed(f"post-check failed: the old leader {lead.name} is not streaming after 120 s", 1)
    # synchronous_mode: the cluster is only as safe as before once a sync standby is named again
    if not wait(lambda: any(m.role == "Sync Standby" and m.streaming for m in members(ctx)), 60, 1):
        raise ProcedureFailed("post-check failed: no sync standby 60 s after the switchover", 1)
    res = {"from": lead.name, "to": cand.name, "command_s": round(t_cmd, 2), "writable_s": round(t_write, 2),
           "old_leader_streaming_s": round(t_back, 2)}
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


