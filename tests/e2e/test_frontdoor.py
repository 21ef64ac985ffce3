"""The front door on real hosts (one address for applications): the session's inventory plus cluster.vip,
so HAProxy and keepalived run on the PostgreSQL hosts (no balancer host) and PgBouncer on each.

A client through VIP:5000 reaches the primary (PgBouncer, TLS, SCRAM via auth_query), VIP:5001 a replica;
`cluster.status` shows which backend each listener points at; the audit passes with the front door's checks;
a switchover under the writer connected to VIP:5000 loses no acknowledged row and the client follows it.
With RUNBOOK_SOAK=1 (`make soak`): a hard power-off of the leader, then of the balancer holding the VIP,
each under the writer on VIP:5000. At the end the front door's services are stopped and the VIP released:
the modules after this one find the cluster as the session's inventory describes it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import INV, REPO, SCALE, env, wait_for

from runbook.inventory import Inventory, load_inventory

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"
SERVICES = ("keepalived", "haproxy", "pgbouncer")


def run(state: Path, inventory: Inventory, *args: str, check: bool = True, timeout: float = 900):
    p = subprocess.run([INV, *args], cwd=REPO, env=env(state, inventory.path), capture_output=True, text=True,
                       timeout=timeout * SCALE, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}")
    return p


def free_vip(base: Inventory) -> str:
    """A free address of the PostgreSQL hosts' /24, from the top (extra hosts of other modules count up)."""
    used = {h.address for h in base.hosts}
    net = ipaddress.ip_network(f"{base.postgres[0].address}/24", strict=False)
    return next(str(a) for a in reversed(list(net.hosts())) if str(a) not in used and int(a) & 0xFF < 250)


def with_vip(base: Inventory, dest: Path) -> Path:
    doc = yaml.safe_load(base.path.read_text())
    for k in ("key", "known_hosts"):
        doc["ssh"][k] = str((base.path.parent / doc["ssh"][k]).resolve())
    doc["cluster"]["vip"] = base.cluster.vip or free_vip(base)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def front(converged, tmp_path_factory):
    """(inventory with cluster.vip, state): the converged cluster with the front door installed by cluster.up."""
    from runbook.core.transport import SshTransport

    base, state = converged
    inventory = load_inventory(with_vip(base, tmp_path_factory.mktemp("frontdoor") / "hosts-vip.yml"))
    t0 = time.monotonic()
    out = run(state, inventory, "cluster.up", timeout=900).stdout
    print(f"\nfront door installed by cluster.up in {time.monotonic() - t0:.1f}s")
    assert "pooler.config" in out and "balancer.settled" in out, out[-3000:]
    yield inventory, state
    if base.cluster.vip is None:  # the session's inventory has no front door: leave none running
        t = SshTransport()
        try:
            for h in inventory.balancers:
                t.run(h, f"systemctl disable --now {' '.join(SERVICES)}", timeout=60)
        finally:
            t.close()
        run(state, base, "cluster.up", timeout=900)  # pg_hba as the session's inventory has it


def _dsn(inventory: Inventory, state: Path, port: int) -> str:
    from runbook.credentials.secrets import load_secrets

    admin = load_secrets(state)["admin"]
    return (f"host={inventory.cluster.vip} port={port} dbname=postgres user={admin['username']} "
            f"password={admin['password']} sslmode=verify-ca sslrootcert={state / 'pki' / 'ca.crt'} connect_timeout=3")


def ask(inventory: Inventory, state: Path, port: int, sql: str = "select pg_is_in_recovery()"):
    import psycopg

    with psycopg.connect(_dsn(inventory, state, port), prepare_threshold=None) as conn:
        row = conn.execute(sql).fetchone()
        tls = conn.pgconn.ssl_in_use
    return row[0] if row else None, tls


def status(state: Path, inventory: Inventory) -> dict:
    return json.loads(run(state, inventory, "cluster.status", "--json").stdout)


def leader_host(doc: dict) -> str:
    return next(m["name"] for m in doc["members"] if m["leader"]).removeprefix("patroni_")


def test_client_through_the_vip_reaches_the_primary_and_a_replica(front):
    inventory, state = front
    assert ask(inventory, state, inventory.cluster.ports.rw) == (False, True)  # the primary, over TLS
    assert ask(inventory, state, inventory.cluster.ports.ro) == (True, True)  # a replica, over TLS
    # through PgBouncer's local socket: PostgreSQL sees no TCP peer
    assert ask(inventory, state, inventory.cluster.ports.rw, "select inet_server_addr() is null")[0] is True


def test_status_shows_the_vip_holder_and_each_listeners_backend(front):
    inventory, state = front
    doc = status(state, inventory)
    fd = doc["frontdoor"]
    assert fd["vip"] == inventory.cluster.vip
    assert sum(b["holds_vip"] for b in fd["balancers"]) == 1, fd
    lead = leader_host(doc)
    for b in fd["balancers"]:
        assert b["listeners"]["postgres_rw"]["up"] == [lead], fd
        assert b["listeners"]["postgres_ro"]["up"] == [h.name for h in inventory.postgres if h.name != lead], fd
    from runbook.procedures.frontdoor import frontdoor_table
    from runbook.console import console

    with console.capture() as cap:  # the table cluster.status prints from the same document
        console.print(frontdoor_table(fd))
    assert "holds it" in cap.get() and lead in cap.get()


def test_audit_passes_with_the_front_door(front):
    inventory, state = front
    out = run(state, inventory, "cluster.audit", "--verbose", timeout=300).stdout
    assert "no findings" in out, out[-3000:]
    assert "PgBouncer refuses a client without TLS" in out and "lookup role pgbouncer_auth" in out


def frontdoor_doc(ctx) -> dict:
    from runbook.procedures.frontdoor import frontdoor_doc as doc

    return doc(ctx)


def drill_ctx(inventory: Inventory, state: Path):
    """An in-process context on the session's state for the drills: `inv drill.*` runs only against the lab
    of the inventory the lab was made from, and this module's inventory is a copy with cluster.vip."""
    from runbook.cluster.context import Ctx
    from runbook.core.ledger import Ledger
    from runbook.core.transport import SshTransport

    ctx = Ctx(inventory=inventory, transport=SshTransport(), state_dir=state, bundle_dir=REPO / "bundle")
    ctx.ledger = Ledger(state / f"{inventory.cluster.name}.db", redact=ctx.redact)
    return ctx


def show(title: str, res: dict) -> None:
    print(f"\n{title}: longest write gap {res['longest_write_gap_s']} s; rows acknowledged {res['acknowledged']}, "
          f"present {res['present']}, lost {res['lost']}; write errors (retried) {res['write_errors']}"
          + (f" {res['write_error_kinds']}" if res["write_errors"] else ""))


def pooler_pids(ctx, inventory: Inventory) -> dict[str, str]:
    return {h.name: ctx.transport.run(h, "systemctl show -p MainPID --value pgbouncer").stdout.strip()
            for h in inventory.postgres}


def under_writer(ctx, name: str, *commands: tuple[str, ...], state: Path,
                 inventory: Inventory) -> tuple[dict, float, str]:
    """Run `inv` *commands* one after the other while a writer goes through VIP:5000: (proof, seconds, output)."""
    from runbook.cluster.readers import host_of, members
    from runbook.procedures.drill import one_leader, prepare_table, prove, start_writer, writes_go_on
    from runbook.procedures.frontdoor import frontdoor_dsn

    prepare_table(ctx, host_of(ctx, one_leader(members(ctx)).name))
    w = start_writer(ctx, name, frontdoor_dsn(ctx))
    out = ""
    try:
        t0 = time.monotonic()
        for args in commands:
            out += run(state, inventory, *args, timeout=600).stdout
        seconds = time.monotonic() - t0
        writes_go_on(w, 20, 30)
    finally:
        w.stop(30)
    return prove(ctx, w), seconds, out


def test_switchover_through_the_vip_loses_nothing_and_the_client_follows(front):
    from runbook.cluster.readers import members
    from runbook.procedures.drill import switchover_drill
    from runbook.procedures.frontdoor import frontdoor_dsn

    inventory, state = front
    ctx = drill_ctx(inventory, state)
    try:
        before = next(m.name for m in members(ctx) if m.is_leader).removeprefix("patroni_")
        res = switchover_drill(ctx, 1, frontdoor_dsn(ctx))
        show("front door switchover (writer on VIP:5000)", res)
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0, res
        after = res["final_primary"]
        assert after != before
        # the read-write listener follows: every balancer sends clients to the new primary only
        wait_for(lambda: all(b["listeners"]["postgres_rw"]["up"] == [after]
                             for b in frontdoor_doc(ctx)["balancers"]), 30)
    finally:
        ctx.transport.close()
    assert ask(inventory, state, inventory.cluster.ports.rw) == (False, True)


def test_front_door_secrets_rotate_under_a_writer_through_the_vip(front):
    """`secrets.rotate --role pooler` then `--role vrrp` while a writer goes through VIP:5000: PgBouncer and
    keepalived reload (no restart: the writer's connection stays), one balancer holds the VIP, nothing lost."""
    from runbook.credentials.secrets import load_secrets

    inventory, state = front
    ctx = drill_ctx(inventory, state)
    old = load_secrets(state)
    pids = pooler_pids(ctx, inventory)
    try:
        res, seconds, _ = under_writer(ctx, "frontdoor-rotate", ("secrets.rotate", "--role", "pooler"),
                                       ("secrets.rotate", "--role", "vrrp"), state=state, inventory=inventory)
        after = pooler_pids(ctx, inventory)
        doc = frontdoor_doc(ctx)
    finally:
        ctx.transport.close()
    new = load_secrets(state)
    show(f"front door secrets rotated in {seconds:.1f} s (writer on VIP:5000)", res)
    assert all(new[k]["password"] != old[k]["password"] for k in ("pooler", "vrrp"))
    assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0, res
    assert after == pids  # reloaded, not restarted
    assert sum(b["holds_vip"] for b in doc["balancers"]) == 1, doc
    assert ask(inventory, state, inventory.cluster.ports.rw) == (False, True)  # a new connection logs in


def test_front_door_certificates_rotate_under_a_writer_through_the_vip(front):
    """`pki.rotate --service pgbouncer-server,haproxy-client` while a writer goes through VIP:5000: each
    PgBouncer reloads (not restarted) and serves its new certificate; each HAProxy reloads and its health
    checks pass with the new client pair (the read-write listener still routes to the leader); nothing lost."""
    from runbook.cluster.readers import host_of, members
    from runbook.procedures.drill import one_leader

    inventory, state = front
    rows = lambda: {(r["host"], r["service"]): r for r in json.loads(  # noqa: E731
        run(state, inventory, "pki.status", "--json").stdout)["rows"]}
    before = rows()
    ctx = drill_ctx(inventory, state)
    pids = pooler_pids(ctx, inventory)
    try:
        res, seconds, out = under_writer(ctx, "frontdoor-pki",
                                         ("pki.rotate", "--service", "pgbouncer-server,haproxy-client"),
                                         state=state, inventory=inventory)
        after_pids = pooler_pids(ctx, inventory)
        served = {h.name: ctx.transport.run(
            h, f"timeout 5 openssl s_client -starttls postgres -connect {h.address}:{inventory.cluster.ports.pgbouncer}"
               " </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256", timeout=30).stdout.strip()
            for h in inventory.postgres}
        on_file = {h.name: ctx.transport.run(
            h, f"openssl x509 -noout -fingerprint -sha256 -in {before[(h.name, 'pgbouncer-server')]['path']}",
            timeout=30).stdout.strip() for h in inventory.postgres}
        time.sleep(3)  # past `fall` (2 x 1 s) of checks made with the new pair
        doc = frontdoor_doc(ctx)
        lead = host_of(ctx, one_leader(members(ctx)).name).name
    finally:
        ctx.transport.close()
    show(f"front door certificates rotated in {seconds:.1f} s (writer on VIP:5000)", res)
    after = rows()
    rotated = [k for k in before if k[1] in ("pgbouncer-server", "haproxy-client")]
    assert len(rotated) == 2 * len(inventory.postgres), rotated
    assert all(after[k]["sha256"] != before[k]["sha256"] and after[k]["matches"] for k in rotated), out[-2000:]
    assert all(after[k]["sha256"] == before[k]["sha256"] for k in before if k not in rotated)
    assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0, res
    assert after_pids == pids  # PgBouncer reloaded, not restarted
    assert all(served[n] and served[n] == on_file[n] for n in served), (served, on_file)
    assert all(b["listeners"]["postgres_rw"]["up"] == [lead] for b in doc["balancers"]), doc
    assert ask(inventory, state, inventory.cluster.ports.rw) == (False, True)  # a new client: new certificate


if SOAK:  # `make soak` only (minutes each): the main CA replaced, then the power-off drills through the VIP
    def test_soak_ca_rotation_with_the_front_door_under_a_writer_through_the_vip(front):
        """`pki.rotate-ca --ca main` with HAProxy, keepalived and PgBouncer running: the writer on VIP:5000
        loses nothing, PgBouncer is reloaded (never restarted), HAProxy's checks pass with the new CA and its
        new client pair, and a new client verifying with the new CA alone logs in on both listeners."""
        from runbook.cluster.readers import host_of, members
        from runbook.procedures.drill import one_leader

        inventory, state = front
        ctx = drill_ctx(inventory, state)
        old_ca = (state / "pki" / "ca.crt").read_bytes()
        pids = pooler_pids(ctx, inventory)
        try:
            res, seconds, out = under_writer(ctx, "frontdoor-ca", ("pki.rotate-ca", "--ca", "main", "--yes"),
                                             state=state, inventory=inventory)
            after_pids = pooler_pids(ctx, inventory)
            time.sleep(3)  # past `fall` of HAProxy's checks
            doc = frontdoor_doc(ctx)
            lead = host_of(ctx, one_leader(members(ctx)).name).name
        finally:
            ctx.transport.close()
        show(f"front door: main CA replaced in {seconds:.1f} s (writer on VIP:5000)", res)
        assert (state / "pki" / "ca.crt").read_bytes() != old_ca
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0, res
        assert after_pids == pids, (pids, after_pids)
        assert all(b["listeners"]["postgres_rw"]["up"] == [lead] for b in doc["balancers"]), doc
        assert sum(b["holds_vip"] for b in doc["balancers"]) == 1, doc
        assert ask(inventory, state, inventory.cluster.ports.rw) == (False, True)
        assert ask(inventory, state, inventory.cluster.ports.ro) == (True, True)
        findings = json.loads(run(state, inventory, "pki.status", "--json").stdout)["findings"]
        assert findings == [], findings

    def test_soak_failover_by_power_off_of_the_leader_through_the_vip(front):
        from runbook.procedures.drill import failover_drill
        from runbook.procedures.frontdoor import frontdoor_dsn

        inventory, state = front
        ctx = drill_ctx(inventory, state)
        try:
            res = failover_drill(ctx, 5, 240, frontdoor_dsn(ctx))
        finally:
            ctx.transport.close()
        show(f"front door failover ({res['killed']}, the leader, powered off)", res)
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0 and res["rejoined"], res

    def test_soak_power_off_of_the_vip_holder(front):
        from runbook.procedures.frontdoor_drill import vip_drill

        inventory, state = front
        ctx = drill_ctx(inventory, state)
        try:
            res = vip_drill(ctx, 5, 240)
        finally:
            ctx.transport.close()
        show(f"front door: {res['killed']} (VIP holder) powered off, VIP on {res['vip_moved_to']} after "
             f"{res['vip_moved_s']} s", res)
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0 and res["settled"], res
        assert res["vip_moved_to"] != res["killed"]
