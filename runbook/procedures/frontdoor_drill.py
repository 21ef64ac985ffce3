"""`inv drill.vip`: hard power-off of the balancer holding the VIP, under the writer connected to VIP:5000
(HAProxy -> PgBouncer). keepalived on another balancer must take the VIP; with no balancer host named, that
host is also a PostgreSQL host (perhaps the leader: then Patroni fails over too). The host is booted again;
the drill waits until it streams again (a PostgreSQL host) and the front door has settled (one VIP holder, one
read-write backend UP everywhere), then proves that every acknowledged row is on the primary."""
from __future__ import annotations

import time

from runbook import console as ui
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members, wait
from runbook.errors import ProcedureFailed
from runbook.procedures.drill import (
    _fresh_transport,
    boot,
    boot_back,
    one_leader,
    prepare_table,
    prove,
    start_writer,
    writes_go_on,
)
from runbook.procedures.frontdoor import frontdoor_dsn
from runbook.sections.balancer import _settled, vip_holders


def vip_drill(ctx: Ctx, write_wait: float, rejoin_timeout: float) -> dict:
    from runbook.lab import lab as labmod

    inv = ctx.inventory
    holders = vip_holders(ctx)
    if len(holders) != 1:
        raise ProcedureFailed(f"drill refused: the VIP {inv.cluster.vip} is held by {len(holders)} hosts "
                              f"({', '.join(holders) or 'none'}); run `inv balancer.install`", 1)
    victim = inv.get(holders[0])
    lead = one_leader(members(ctx))
    prepare_table(ctx, host_of(ctx, lead.name))
    w = start_writer(ctx, "vip", frontdoor_dsn(ctx))
    res: dict = {"killed": victim.name, "was_leader": host_of(ctx, lead.name).name == victim.name}
    others = [h for h in inv.balancers if h.name != victim.name]
    booted = False

    def moved() -> str | None:
        # ask only the survivors: the powered-off host would make every SSH call wait for its timeout
        got = [h.name for h in others
               if (r := ctx.transport.run(h, f"ip -4 -o addr show to {inv.cluster.vip}/32", timeout=10)).ok
               and r.stdout.strip()]
        return got[0] if len(got) == 1 else None

    try:
        time.sleep(1)
        t0 = time.monotonic()
        labmod.kill(inv, victim.name)
        ui.console.print(f"[red]✗[/] {victim.name} powered off hard (it held the VIP"
                         + (f" and was the leader {lead.name})" if res["was_leader"] else ")"))
        _fresh_transport(ctx)
        to = wait(moved, 60, 0.5)
        if not to:
            raise ProcedureFailed(f"no other balancer took the VIP within 60 s after powering off {victim.name}", 1)
        res.update(vip_moved_to=to, vip_moved_s=round(time.monotonic() - t0, 2))
        lead_now = next((m.name for m in members(ctx, via=others) if m.is_leader), None)
        ui.console.print(f"  {to} holds the VIP after {res['vip_moved_s']} s")
        writable = wait(lambda: w.first_ack_after(t0), write_wait, 0.2)
        boot(ctx, victim, res)
        booted = True
        res["leader_while_down"] = lead_now
        if victim.has("postgres"):
            # back in the cluster: streaming again, or still the leader (booted within the leader key's ttl,
            # Patroni keeps its lock: no failover) with a streaming replica
            name = f"patroni_{victim.name}"

            def rejoined() -> bool:
                ms = members(ctx, via=others)
                me = next((m for m in ms if m.name == name), None)
                return me is not None and (me.streaming or (me.is_leader and me.state == "running"
                                                            and any(m.streaming for m in ms)))

            back = wait(rejoined, rejoin_timeout, 1)
            res["rejoined"] = bool(back)
            if not back:
                raise ProcedureFailed(f"{victim.name} did not stream again within {rejoin_timeout:.0f} s of its "
                                      "boot", 1)
        writable = writable or wait(lambda: w.first_ack_after(t0), 60, 0.2)
        res["writable_s"] = round(writable - t0, 2) if writable else None
        settled = wait(lambda: _settled(ctx) is None, 60, 1)
        res["settled"] = bool(settled)
        res["vip_holder_after"] = (vip_holders(ctx) or ["none"])[0]
        writes_go_on(w)
    finally:
        res["writer_stopped"] = w.stop(30)
        if not booted:
            boot_back(inv, victim.name)
    res.update(prove(ctx, w))
    return res
