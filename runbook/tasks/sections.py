"""Section tasks (`inv etcd.install`, `inv cluster.up`, ...) and the read-only cluster views."""
from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook import console as ui
from runbook.sections import all_steps, section_steps
from runbook.tasks.session import section_install, session


def _etcd_table(ctx) -> Table:
    from runbook.cluster.readers import etcd_status

    eps, errs = etcd_status(ctx)
    t = Table(title="etcd")
    for c in ("endpoint", "id", "version", "db size", "leader", "raft term", "raft index", "errors"):
        t.add_column(c)
    for e in eps:
        t.add_row(e.endpoint, e.id, e.version, f"{e.db_size / 1024:.0f} KiB", "[green]yes[/]" if e.leader else "no",
                  str(e.raft_term), str(e.raft_index), ", ".join(e.errors))
    for host, err in errs.items():
        t.add_row(f"https://{host}:2379", "-", "-", "-", "-", "-", "-", f"[red]down: {err}[/]")
    return t, eps, errs


def _members_table(ctx) -> Table:
    from runbook.cluster.readers import members

    t = Table(title=f"Patroni cluster {ctx.inventory.cluster.name}")
    for c in ("member", "host", "role", "state", "timeline", "lag"):
        t.add_column(c)
    ms = members(ctx)
    for m in ms:
        style = "green" if m.is_leader or m.streaming else "red"
        t.add_row(m.name, m.host, m.role, f"[{style}]{m.state}[/]", str(m.timeline or ""), str(m.lag or 0))
    return t, ms


@task
def etcd_status(c):
    """Show every etcd endpoint: id, version, db size, leader, raft term and index, errors (Rich table)."""
    with session(c, "etcd.status", lock=False) as ctx:
        t, _, _ = _etcd_table(ctx)
        ui.console.print(t)


@task
def etcd_health(c):
    """Check the health of every etcd member over TLS; non-zero exit when any is unhealthy."""
    from runbook.cluster.commands import etcdctl
    from runbook.cluster.readers import parse_endpoint_health

    with session(c, "etcd.health", lock=False) as ctx:
        bad = []
        for h in ctx.inventory.etcd:
            try:
                r = ctx.transport.run(h, etcdctl(ctx, h, "endpoint health -w json"), timeout=20)
                health = parse_endpoint_health(r.stdout) if r.stdout.strip() else {}
            except Exception as exc:
                health = {}
                r = None
                ui.console.print(f"[red]✗[/] {h.name}: {exc}")
            ok = any(v[0] for v in health.values())
            if r is not None:
                ui.console.print(f"{'[green]✓[/]' if ok else '[red]✗[/]'} {h.name}: "
                                 f"{'healthy' if ok else (r.stderr.strip().splitlines() or ['unhealthy'])[-1]}")
            if not ok:
                bad.append(h.name)
        if bad:
            raise Exit(f"unhealthy etcd member(s): {', '.join(bad)}", code=1)


@task
def cluster_status(c):
    """Show the etcd endpoint table and the Patroni members (role, state, timeline, lag)."""
    with session(c, "cluster.status", lock=False) as ctx:
        t, _, _ = _etcd_table(ctx)
        ui.console.print(t)
        try:
            mt, _ = _members_table(ctx)
            ui.console.print(mt)
        except RuntimeError as exc:
            raise Exit(f"error: {exc}", code=1) from None


def section_collection(name: str, doc: str) -> Collection:
    col = Collection(name)
    # A section needs the bundle on its hosts: the (idempotent, cheap when done) push steps come first.
    # the roles it is about (etcd.names also writes /etc/hosts everywhere: not a reason to name node01)
    roles = {s.role for s in section_steps(name) if s.role not in ("local", "all")}
    col.add_task(section_install(name, lambda: section_steps("bundle") + section_steps(name), doc, roles),
                 name="install", default=False)
    return col


def collections() -> list[Collection]:
    etcd = section_collection("etcd", "Install the etcd section (names, binaries, user, PKI, TLS, config, unit, "
                                      "start, ectl, existing) on the etcd hosts; resumable.")
    etcd.add_task(etcd_status, name="status")
    etcd.add_task(etcd_health, name="health")
    postgres = section_collection("postgres", "Install the PostgreSQL section (packages from the bundle, default "
                                              "cluster off, home, PGDATA, TLS) on the postgres hosts; resumable.")
    patroni = section_collection("patroni", "Install the Patroni section (venv, wheels, profile, config, validate, "
                                            "unit, ordered start) on the postgres hosts; resumable.")
    from runbook.tasks.procedures import reload, restart, switchover

    patroni.add_task(switchover)
    patroni.add_task(restart)
    patroni.add_task(reload)
    cluster = Collection("cluster")
    cluster.add_task(section_install("cluster.up", all_steps,
                                     "Run the whole runbook in order (push bundle, etcd, postgres, patroni, "
                                     "verify); after a failure or interruption, run it again to resume."),
                     name="up")
    cluster.add_task(cluster_status, name="status")
    cluster.add_task(section_install("cluster.verify", lambda: section_steps("cluster"),
                                     "Write a row on the leader and read it on every replica."), name="verify")
    return [etcd, postgres, patroni, cluster]
