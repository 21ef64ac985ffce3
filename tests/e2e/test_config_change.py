"""Changing settings of a running cluster through the inventory (issue 18, proofs a and b), under a writer.

(a) max_connections (needs a restart) and work_mem (reload only) set in cluster.patroni.parameters:
    `cluster.up` applies them to the DCS (patroni.dynamic), work_mem is in force everywhere without a
    restart, `patroni.restart --pending` restarts the replica first and moves the primary by a switchover;
    lowered back, the primary restarts first; no acknowledged row is lost.
(b) synchronous_mode_strict turned off in the inventory: `patronictl show-config` shows it off.
Each test puts the inventory's own settings back at the end (the session's cluster is shared).
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import INV, REPO, SCALE, env, ledger

from runbook.cluster.commands import patronictl, psql
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members, wait
from runbook.cluster.render import member_name
from runbook.core.transport import SshTransport
from runbook.procedures.drill import Writer, prepare_table, prove, writer_dsn
from runbook.procedures.pending_restart import members_ext

pytestmark = pytest.mark.e2e


def run(state: Path, inventory_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([INV, *args], cwd=REPO, env=env(state, inventory_path), capture_output=True, text=True,
                       timeout=timeout * SCALE, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def rig(converged, tmp_path_factory):
    """(inventory, state dir, a Ctx on the session's cluster, a directory for changed inventories)."""
    inventory, state = converged
    ctx = Ctx(inventory=inventory, transport=SshTransport(), state_dir=state, bundle_dir=state / "unused")
    yield inventory, state, ctx, tmp_path_factory.mktemp("inventories")
    ctx.transport.close()


def changed_inventory(inventory, where: Path, patroni_block: str) -> Path:
    """The e2e inventory with a cluster.patroni block (its relative key paths made absolute)."""
    text = inventory.path.read_text().replace("cluster:\n", "cluster:\n  patroni:\n" + patroni_block, 1)
    first = inventory.hosts[0]
    for key, value in (("key", first.key), ("known_hosts", first.known_hosts)):
        if value is not None:
            text = re.sub(rf"(?m)^(\s+{key}:).*$", rf"\g<1> {value}", text, count=1)
    path = where / f"hosts-{int(time.time() * 1000)}.yml"
    path.write_text(text)
    return path


def show(ctx: Ctx, host, setting: str) -> str:
    r = ctx.transport.run(host, psql(ctx, f"-tAc 'show {setting}'"), user="postgres", timeout=30)
    return r.stdout.strip() if r.ok else f"error: {r.stderr.strip()}"


def started(ctx: Ctx, host) -> str:
    """pg_postmaster_start_time() as text (ISO, sortable within one time zone)."""
    r = ctx.transport.run(host, psql(ctx, "-tAc \"select to_char(pg_postmaster_start_time() at time zone 'UTC', "
                                          "'YYYY-MM-DD HH24:MI:SS.US')\""), user="postgres", timeout=30)
    assert r.ok, r.stderr
    return r.stdout.strip()


def leader_host(ctx: Ctx):
    return host_of(ctx, next(m.name for m in members(ctx) if m.is_leader))


def restart_events(inventory, state: Path, since: int) -> list[tuple[str, str]]:
    with ledger(state, inventory.cluster.name) as db:
        return [(kind, action) for kind, action in db.execute(
            "select kind, action from events where step = 'patroni.restart' and kind in ('run', 'switchover') "
            "and id > ? order by id", (since,))]


def last_event_id(inventory, state: Path) -> int:
    with ledger(state, inventory.cluster.name) as db:
        return db.execute("select coalesce(max(id), 0) from events").fetchone()[0]


def test_restart_and_reload_settings_through_the_inventory_under_a_writer(rig):
    inventory, state, ctx, where = rig
    pg = inventory.postgres
    lead = leader_host(ctx)
    replica = next(h for h in pg if h.name != lead.name)
    prepare_table(ctx, lead)
    w = Writer(writer_dsn(ctx), f"config-{int(time.time())}")
    w.start()
    assert wait(lambda: len(w.acked) >= 5, 30, 0.2), f"the writer could not write (errors {w.errors})"
    try:
        changed = changed_inventory(inventory, where, "    parameters: {max_connections: 150, work_mem: 8MB}\n")
        dry = run(state, changed, "cluster.up", "--dry").stdout
        assert "-    max_connections: 100\n" in dry and "+    max_connections: 150\n" in dry, dry[-3000:]
        assert "+    work_mem: 8MB\n" in dry
        assert show(ctx, lead, "work_mem") == "4MB"  # a dry run changes nothing
        run(state, changed, "cluster.up")
        # work_mem: a reload is enough, in force on every member; max_connections waits for a restart
        assert wait(lambda: all(show(ctx, h, "work_mem") == "8MB" for h in pg), 60, 2), \
            {h.name: show(ctx, h, "work_mem") for h in pg}
        assert wait(lambda: all(m.pending for m in members_ext(ctx)), 60, 2), members_ext(ctx)
        assert {show(ctx, h, "max_connections") for h in pg} == {"100"}
        before = {h.name: started(ctx, h) for h in pg}
        mark = last_event_id(inventory, state)
        t0 = time.monotonic()
        out = run(state, changed, "patroni.restart", "--pending").stdout
        t_raise = time.monotonic() - t0
        assert "max_connections 100->150 -> replicas first" in out, out
        events = restart_events(inventory, state, mark)
        assert [k for k, _ in events] == ["run", "switchover"], events  # one restart, then the switchover
        assert events[0][1] == f"restart --pending {member_name(replica)}", events
        assert {show(ctx, h, "max_connections") for h in pg} == {"150"}
        after = {h.name: started(ctx, h) for h in pg}
        assert all(after[n] > before[n] for n in after)  # each restarted once ...
        assert after[replica.name] < after[lead.name]  # ... the replica first
        assert leader_host(ctx).name == replica.name  # the primary moved by a switchover
        assert not any(m.pending for m in members_ext(ctx))

        # lowered back (the inventory's own settings): the primary first, in place
        new_lead = leader_host(ctx)
        run(state, inventory.path, "cluster.up")
        assert wait(lambda: all(m.pending for m in members_ext(ctx)), 60, 2), members_ext(ctx)
        before = {h.name: started(ctx, h) for h in pg}
        t0 = time.monotonic()
        out = run(state, inventory.path, "patroni.restart", "--pending").stdout
        t_lower = time.monotonic() - t0
        assert "max_connections 150->100 -> primary first" in out, out
        after = {h.name: started(ctx, h) for h in pg}
        assert all(after[n] > before[n] for n in after)
        assert after[new_lead.name] < after[lead.name]  # the primary first
        assert {show(ctx, h, "max_connections") for h in pg} == {"100"}
        assert {show(ctx, h, "work_mem") for h in pg} == {"4MB"}
        assert not any(m.pending for m in members_ext(ctx))
        time.sleep(1)
    finally:
        assert w.stop(30)
    res = prove(ctx, w)
    print(f"\nconfig change: raise {t_raise:.1f} s (replica, switchover), lower {t_lower:.1f} s (primary, replica); "
          f"rows acknowledged {res['acknowledged']}, present {res['present']}, lost {res['lost']}; longest write "
          f"gap {res['longest_write_gap_s']} s; write errors (retried) {res['write_errors']}")
    assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0


def test_strict_mode_off_through_the_inventory(rig):
    inventory, state, ctx, where = rig

    def dcs() -> dict:
        r = ctx.transport.run(inventory.postgres[0], patronictl(ctx, "show-config"), user="postgres", timeout=30)
        assert r.ok, r.stderr
        return yaml.safe_load(r.stdout)

    assert dcs()["synchronous_mode_strict"] is True
    relaxed = changed_inventory(inventory, where, "    synchronous_mode_strict: false\n")
    dry = run(state, relaxed, "cluster.up", "--dry").stdout
    assert "-synchronous_mode_strict: true\n+synchronous_mode_strict: false\n" in dry, dry[-3000:]
    run(state, relaxed, "cluster.up")
    assert dcs()["synchronous_mode_strict"] is False
    assert "DCS (patronictl show-config)" not in run(state, relaxed, "cluster.up", "--dry").stdout  # in line
    run(state, inventory.path, "cluster.up")  # the inventory's own setting again
    assert dcs()["synchronous_mode_strict"] is True
