"""`inv patroni.switchover|restart|reload`: checked before and after, rolling, replicas first."""
from __future__ import annotations

import shlex
import sys
import time

from invoke import task
from invoke.exceptions import Exit
from rich.prompt import Confirm

from . import console as ui
from .cli import session
from .context import Ctx
from .patroni_api import Member, host_of, members, wait
from .render import member_name


def _etcd_healthy(ctx: Ctx) -> list[str]:
    from .patroni_api import parse_endpoint_health
    from .sections.etcd import etcdctl

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
    from .sections.patroni import psql

    sql = ("CREATE TABLE IF NOT EXISTS runbook_verify (token text primary key, at timestamptz default now()); "
           f"INSERT INTO runbook_verify (token) VALUES ('switchover-{time.time_ns()}');")
    r = ctx.transport.run(host_of(ctx, member), psql(ctx, f"-v ON_ERROR_STOP=1 -c {shlex.quote(sql)}"),
                          user="postgres", timeout=30)
    return r.ok


def do_switchover(ctx: Ctx, candidate: str | None) -> dict:
    from .sections.patroni import patronictl

    ms = members(ctx)
    lead, cand, problems = prechecks(ctx, ms, candidate)
    if problems:
        raise Exit("switchover refused by the pre-checks:\n  " + "\n  ".join(problems), code=1)
    ui.console.print(f"pre-checks ok: leader {lead.name}, candidate {cand.name} (sync standby, lag 0), etcd healthy")
    lh = host_of(ctx, lead.name)
    t0 = time.monotonic()
    r = ctx.transport.run(lh, patronictl(ctx, f"switchover {ctx.inventory.cluster.name} --leader {lead.name} "
                                              f"--candidate {cand.name} --force"), user="postgres", timeout=120)
    t_cmd = time.monotonic() - t0
    ctx.ledger.event(lh.name, "patroni.switchover", "run", f"switchover {lead.name} -> {cand.name}", r.rc,
                     r.stdout, r.stderr, round(t_cmd, 3))
    if not r.ok:
        raise Exit(f"patronictl switchover failed on {lh.name}: {r.stderr.strip() or r.stdout.strip()}", code=1)
    new = wait(lambda: any(m.name == cand.name and m.is_leader for m in members(ctx)), 60, 0.5)
    if not new or not wait(lambda: _write_ok(ctx, cand.name), 30, 0.5):
        raise Exit(f"post-check failed: {cand.name} is not a leader accepting writes after 60 s", code=1)
    t_write = time.monotonic() - t0
    back = wait(lambda: any(m.name == lead.name and m.streaming for m in members(ctx)), 120, 1)
    t_back = time.monotonic() - t0
    if not back:
        raise Exit(f"post-check failed: the old leader {lead.name} is not streaming after 120 s", code=1)
    # synchronous_mode: the cluster is only as safe as before once a sync standby is named again
    if not wait(lambda: any(m.role == "Sync Standby" and m.streaming for m in members(ctx)), 60, 1):
        raise Exit("post-check failed: no sync standby 60 s after the switchover", code=1)
    res = {"from": lead.name, "to": cand.name, "command_s": round(t_cmd, 2), "writable_s": round(t_write, 2),
           "old_leader_streaming_s": round(t_back, 2)}
    ctx.ledger.event(lh.name, "patroni.switchover", "result", str(res), 0)
    return res


@task(help={"candidate": "host or member to promote (default: the sync standby)",
            "force": "do not ask for confirmation (needed without a terminal)"})
def switchover(c, candidate=None, force=False):
    """Switch the leader over to the sync standby: pre-checks (sync standby, lag 0, etcd healthy), the
    switchover, post-checks (new leader writes, old leader streams again); prints the time taken."""
    if not force:
        if not sys.stdin.isatty():
            raise Exit("error: no terminal to confirm on; pass --force", code=2)
        if not Confirm.ask("switch over the leader?"):
            raise Exit("cancelled", code=1)
    with session(c, "patroni.switchover") as ctx:
        res = do_switchover(ctx, candidate)
        ui.console.print(f"[bold green]✓[/] switchover {res['from']} -> {res['to']}: command {res['command_s']}s, "
                         f"new leader writable after {res['writable_s']}s, old leader streaming after "
                         f"{res['old_leader_streaming_s']}s")


def _rolling(c, verb: str) -> None:
    from .sections.patroni import patronictl

    with session(c, f"patroni.{verb}") as ctx:
        ms = members(ctx)
        order = [m for m in ms if not m.is_leader] + [m for m in ms if m.is_leader]
        for m in order:
            h = host_of(ctx, m.name)
            t0 = time.monotonic()
            r = ctx.transport.run(h, patronictl(ctx, f"{verb} {ctx.inventory.cluster.name} {m.name} --force"),
                                  user="postgres", timeout=300)
            ctx.ledger.event(h.name, f"patroni.{verb}", "run", f"{verb} {m.name}", r.rc, r.stdout, r.stderr)
            if not r.ok:
                raise Exit(f"{verb} of {m.name} failed: {r.stderr.strip() or r.stdout.strip()}", code=1)
            ok = wait(lambda m=m: any(x.name == m.name and (x.is_leader or x.streaming) for x in members(ctx)), 120, 1)
            if not ok:
                raise Exit(f"{m.name} did not come back (running/streaming) within 120 s; stopping here", code=1)
            ui.console.print(f"  [green]✓[/] {verb} {m.name} ({m.role}) {time.monotonic() - t0:.1f}s")
        # restarting the leader drops the replicas' streams for a moment: done = all healthy again
        if not wait(lambda: _healthy(members(ctx)), 120, 1):
            raise Exit(f"after the {verb} the cluster is not healthy (a leader and streaming replicas) "
                       "within 120 s; see `inv cluster.status`", code=1)


def _healthy(ms: list[Member]) -> bool:
    return sum(m.is_leader for m in ms) == 1 and all(m.is_leader or m.streaming for m in ms)


@task
def restart(c):
    """Restart PostgreSQL on every member through Patroni, replicas first, each waited for."""
    _rolling(c, "restart")


@task
def reload(c):
    """Reload the Patroni/PostgreSQL configuration on every member, replicas first."""
    _rolling(c, "reload")
