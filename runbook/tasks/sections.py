"""Section tasks (`inv etcd.install`, `inv cluster.up`, ...) and the read-only cluster views."""
from __future__ import annotations

import json as jsonlib

from invoke import Collection, Task, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook import console as ui
from runbook.sections import all_steps, section_steps
from runbook.tasks.session import section_install, session

JSON_HELP = "print JSON (stable keys, for scripts and logs) instead of the table"


def etcd_doc(ctx) -> dict:
    """etcd endpoint status as data: the --json document of etcd.status (and the table's rows)."""
    from runbook.cluster.readers import etcd_status

    eps, errs = etcd_status(ctx)
    return {"endpoints": [{"endpoint": e.endpoint, "id": e.id, "version": e.version, "db_size_bytes": e.db_size,
                           "leader": e.leader, "raft_term": e.raft_term, "raft_index": e.raft_index,
                           "errors": list(e.errors)} for e in eps],
            "unreachable": [{"host": host, "endpoint": f"https://{host}:2379", "error": err}
                            for host, err in errs.items()]}


def members_doc(ctx) -> list[dict]:
    """The Patroni members as data (patronictl list): the "members" of cluster.status --json."""
    from runbook.cluster.readers import members

    return [{"name": m.name, "host": m.host, "role": m.role, "state": m.state, "timeline": m.timeline,
             "lag": m.lag, "leader": m.is_leader, "streaming": m.streaming} for m in members(ctx)]


def _etcd_table(doc: dict) -> Table:
    t = Table(title="etcd")
    for c in ("endpoint", "id", "version", "db size", "leader", "raft term", "raft index", "errors"):
        t.add_column(c)
    for e in doc["endpoints"]:
        t.add_row(e["endpoint"], e["id"], e["version"], f"{e['db_size_bytes'] / 1024:.0f} KiB",
                  "[green]yes[/]" if e["leader"] else "no", str(e["raft_term"]), str(e["raft_index"]),
                  ", ".join(e["errors"]))
    for u in doc["unreachable"]:
        t.add_row(u["endpoint"], "-", "-", "-", "-", "-", "-", f"[red]down: {u['error']}[/]")
    return t


def _members_table(ctx, ms: list[dict]) -> Table:
    t = Table(title=f"Patroni cluster {ctx.inventory.cluster.name}")
    for c in ("member", "host", "role", "state", "timeline", "lag"):
        t.add_column(c)
    for m in ms:
        style = "green" if m["leader"] or m["streaming"] else "red"
        t.add_row(m["name"], m["host"], m["role"], f"[{style}]{m['state']}[/]", str(m["timeline"] or ""),
                  str(m["lag"] or 0))
    return t


def print_json(doc: object) -> None:
    """Plain JSON on stdout (no Rich markup, wrapping or colour), keys sorted."""
    print(jsonlib.dumps(doc, indent=2, sort_keys=True))


@task(help={"json": JSON_HELP})
def etcd_status(c, json=False):
    """Show every etcd endpoint: id, version, db size, leader, raft term and index, errors (Rich table)."""
    with session(c, "etcd.status", lock=False) as ctx:
        doc = etcd_doc(ctx)
        if json:
            print_json(doc)
        else:
            ui.console.print(_etcd_table(doc))


@task
def etcd_health(c):
    """Check the health of every etcd member over TLS; non-zero exit when any is unhealthy."""
    from runbook.cluster.commands import etcdctl
    from runbook.cluster.readers import each_etcd, parse_endpoint_health

    with session(c, "etcd.health", lock=False) as ctx:
        bad = []
        for h, r in each_etcd(ctx, lambda h: etcdctl(ctx, h, "endpoint health -w json")):
            if isinstance(r, Exception):
                ui.console.print(f"[red]✗[/] {h.name}: {r}")
                bad.append(h.name)
                continue
            try:
                ok = any(v[0] for v in (parse_endpoint_health(r.stdout) if r.stdout.strip() else {}).values())
            except ValueError:  # not JSON: no verdict, so not healthy
                ok = False
            ui.console.print(f"{'[green]✓[/]' if ok else '[red]✗[/]'} {h.name}: "
                             f"{'healthy' if ok else (r.stderr.strip().splitlines() or ['unhealthy'])[-1]}")
            if not ok:
                bad.append(h.name)
        if bad:
            raise Exit(f"unhealthy etcd member(s): {', '.join(bad)}", code=1)


@task(help={"json": JSON_HELP + ": {cluster, etcd: {endpoints, unreachable}, members, frontdoor, error}"})
def cluster_status(c, json=False):
    """Show the etcd endpoint table, the Patroni members (role, state, timeline, lag) and, with cluster.vip,
    the front door: which balancer holds the VIP and which backend each HAProxy listener sends clients to."""
    from concurrent.futures import ThreadPoolExecutor

    from runbook.procedures.frontdoor import frontdoor_doc, frontdoor_table

    with session(c, "cluster.status", lock=False) as ctx, ThreadPoolExecutor(1) as pool:
        asked = pool.submit(members_doc, ctx)  # patronictl on a postgres host while etcd is asked
        doc: dict = {"cluster": ctx.inventory.cluster.name, "etcd": etcd_doc(ctx), "members": None, "error": None}
        if not json:
            ui.console.print(_etcd_table(doc["etcd"]))
        try:
            doc["members"] = asked.result()
        except RuntimeError as exc:
            doc["error"] = str(exc)
        doc["frontdoor"] = frontdoor_doc(ctx) if ctx.inventory.balancers else None
        if json:
            print_json(doc)
        elif doc["members"] is not None:
            ui.console.print(_members_table(ctx, doc["members"]))
        if doc["frontdoor"] and not json:
            ui.console.print(frontdoor_table(doc["frontdoor"]))
        if doc["error"]:
            raise Exit(f"error: {doc['error']}", code=1)


def _task(t: object) -> Task:
    """invoke's @task is typed as returning a bare Callable; it returns a Task."""
    assert isinstance(t, Task), t
    return t


def section_collection(name: str, doc: str) -> Collection:
    col = Collection(name)
    # A section needs the bundle on its hosts: the (idempotent, cheap when done) push steps come first.
    # the roles it is about (etcd.names also writes /etc/hosts everywhere: not a reason to name node01); asked
    # when the task runs: the section modules (templates, PKI) are not imported to build the collection
    def roles() -> set[str]:
        return {s.role for s in section_steps(name) if s.role not in ("local", "all")}

    col.add_task(section_install(name, lambda: section_steps("bundle") + section_steps(name), doc, roles),
                 name="install", default=False)
    return col


def collections() -> list[Collection]:
    etcd = section_collection("etcd", "Install the etcd section (names, binaries, user, PKI, TLS, config, unit, "
                                      "start, ectl, existing) on the etcd hosts; resumable.")
    etcd.add_task(_task(etcd_status), name="status")
    etcd.add_task(_task(etcd_health), name="health")
    postgres = section_collection("postgres", "Install the PostgreSQL section (packages from the bundle, default "
                                              "cluster off, home, PGDATA, TLS) on the postgres hosts; resumable.")
    patroni = section_collection("patroni", "Install the Patroni section (venv, wheels, profile, config, validate, "
                                            "unit, ordered start) on the postgres hosts; resumable.")
    from runbook.tasks.procedures import reload, restart, switchover

    for t in (switchover, restart, reload):
        patroni.add_task(_task(t))
    pooler = section_collection("pooler", "Install PgBouncer on the postgres hosts (lookup role and function on the "
                                          "leader, config, TLS, login proof); needs cluster.vip; resumable.")
    balancer = section_collection("balancer", "Install HAProxy and keepalived on the balancer hosts (the postgres "
                                              "hosts when none is named); needs cluster.vip; resumable.")
    cluster = Collection("cluster")
    cluster.add_task(section_install("cluster.up", all_steps,
                                     "Run the whole runbook in order (push bundle, etcd, postgres, patroni, "
                                     "verify, and with cluster.vip: pooler, balancer); after a failure or "
                                     "interruption, run it again to resume."),
                     name="up")
    cluster.add_task(cluster_status, name="status")
    cluster.add_task(section_install("cluster.verify", lambda: section_steps("cluster"),
                                     "Write a row on the leader and read it on every replica."), name="verify")
    return [etcd, postgres, patroni, pooler, balancer, cluster]
