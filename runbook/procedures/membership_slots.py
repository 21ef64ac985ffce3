"""A removed member's replication slot, dropped when the member leaves for good.

Patroni 4 keeps the physical slot of a member whose key left the DCS for `member_slots_ttl` (30 min by
default), on the leader and as a copy on every replica, so that a member that is only restarting finds its
WAL. A member removed on purpose (patroni.remove, patroni.replace) never comes back under that name, and its
slot holds WAL back until the TTL runs out. The leader keeps that list in memory: the only way to make Patroni
forget it is `member_slots_ttl: 0` for one HA loop (the leader then writes /status without it; it drops its
slot and every replica its copy in the next loop), then the previous value back. Once forgotten the slot is
not retained again (Patroni retains only slots of members it sees), so restoring the value at once is safe.
Setting 0 would also forget every other absent member's slot: the step refuses while any other is absent.

One step, `<section>.slot`, on every remaining member, one host at a time (two hosts editing /config at
once abort each other's compare-and-set): set 0 while the slot (or its copy) is there, wait
(bounded) until it is gone here, restore. It needs no leader: run on a replica first, it makes the leader
forget too, and the leader then finds nothing to do.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable

from runbook.cluster.commands import patronictl, psql
from runbook.cluster.context import Ctx
from runbook.core.step import Run, Section, Step
from runbook.inventory import Host

SLOT_WAIT = 120  # several HA loops (loop_wait 10 s): the slot goes one or two loops after 0 is set

_SLOT_SQL = "select slot_name from pg_replication_slots where slot_type = 'physical'"

_FORGET = r'''
import json, re, shlex, subprocess, sys, time
import yaml
ctl, sql, slot, limit = shlex.split(sys.argv[1]), shlex.split(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def run(args, inp=None):
    r = subprocess.run(args, input=inp, capture_output=True, text=True, timeout=60)
    if r.returncode:
        sys.exit(args[0].rsplit("/", 1)[-1] + " failed: " + (r.stderr or r.stdout).strip()[-300:])
    return r.stdout
def slots():
    return set(run(sql).split())
def config():
    return yaml.safe_load(run(ctl + ["show-config"])) or {}
def patch(value):
    # edit-config is a compare-and-set on /config: another writer in between aborts it; bounded retry
    for attempt in range(5):
        r = subprocess.run(ctl + ["edit-config", "--force", "--quiet", "--apply", "-"],
                           input=json.dumps({"member_slots_ttl": value}), capture_output=True, text=True,
                           timeout=60)
        if not r.returncode:
            return
        if "concurrent changes" not in r.stderr + r.stdout or attempt == 4:
            sys.exit("patronictl failed: " + (r.stderr or r.stdout).strip()[-300:])
        time.sleep(1 + attempt)
cfg = config()
prev = cfg.get("member_slots_ttl")
prev = None if str(prev) == "0" else prev  # 0 is what an interrupted run left: Patroni's default comes back
if slot not in slots():
    if str(cfg.get("member_slots_ttl")) == "0":
        patch(prev)
    print(f"no slot {slot} here")
    sys.exit(0)
listed = json.loads(run(ctl + ["list", "-f", "json"]) or "[]")
present = {re.sub(r"[^a-z0-9_]", "_", m["Member"].lower())[:63] for m in listed}
if slot in present:
    sys.exit(f"{slot} is still a member of the cluster: its key must leave the DCS first")
others = sorted(slots() - present - set((cfg.get("slots") or {}).keys()) - {slot})
if others:
    sys.exit("the slots of other absent members would be dropped too: " + ", ".join(others) +
             "; bring those members back (or remove them) first; Patroni drops " + slot +
             " itself once member_slots_ttl has passed")
patch(0)
try:
    deadline = time.monotonic() + limit
    while slot in slots():
        if time.monotonic() > deadline:
            sys.exit(f"Patroni did not drop {slot} here within {limit:.0f} s")
        time.sleep(2)
finally:
    patch(prev)
print(f"Patroni dropped {slot} here; member_slots_ttl back to {prev if prev is not None else 'its default'}")
'''


def slot_name(member: str) -> str:
    """Patroni's slot name for a member name (lower case, [a-z0-9_], at most 63 characters)."""
    return re.sub(r"[^a-z0-9_]", "_", member.lower())[:63]


def _absent(ctx: Ctx, slot: str) -> str:
    """Shell (as postgres): rc 0 when this host has no physical slot *slot*."""
    return (f"out=$({psql(ctx, f'-tAc {shlex.quote(_SLOT_SQL)}')}) && ! printf '%s\\n' \"$out\" | "
            f"grep -qx {shlex.quote(slot)}")


def _as_postgres(cmd: str) -> str:
    return f"sudo -u postgres sh -c {shlex.quote(cmd)}"


def slot_step(sec: Section, ctx: Ctx, member: str,
              on: Callable[[Ctx, list[Host]], list[Host]]) -> Step:
    """`<section>.slot` on the hosts *on* picks (the members that stay): the slot of *member* dropped."""
    slot = slot_name(member)
    args = " ".join(shlex.quote(a) for a in (patronictl(ctx, ""), psql(ctx, f"-tAc {shlex.quote(_SLOT_SQL)}"),
                                              slot, str(SLOT_WAIT)))
    forget = f"{ctx.paths.patroni_venv}/bin/python -c {shlex.quote(_FORGET)} {args}"

    @sec.step("slot", role="postgres", only=on, kind="serial",
              irreversible=f"drops the replication slot {slot}: the WAL it held back is recycled")
    def drop(ctx: Ctx, h: Host) -> list:
        """Drop the removed member's replication slot (and each replica's copy)
        Patroni keeps it for member_slots_ttl (30 min) in case the member comes back; this one does not.
        member_slots_ttl is set to 0 for one HA loop (Patroni drops the slot itself), then restored; refused
        while another member is absent (its slot would go too)."""
        return [Run(_as_postgres(forget), timeout=SLOT_WAIT + 120)]

    @drop.check
    def _drop_check(ctx: Ctx, h: Host) -> str:
        ttl = patronictl(ctx, "show-config") + " | grep -qE '^member_slots_ttl: *0$'"
        return _as_postgres(f"{_absent(ctx, slot)} && ! {{ {ttl}; }}")

    return drop
