"""The front door as the operator sees it: which balancer holds the VIP, where each HAProxy listener sends
clients (cluster.status), and the DSN an application (or the drill writer) uses: VIP:rw through PgBouncer."""
from __future__ import annotations

from rich.table import Table

from runbook.cluster.context import Ctx
from runbook.sections.balancer import RO, RW
from runbook.sections.frontdoor import SHOW_STAT, parse_show_stat, up


def frontdoor_doc(ctx: Ctx) -> dict:
    """{vip, ports, balancers: [{host, holds_vip, haproxy: {listener: {up: [...], down: [...]}}, error}]}."""
    c = ctx.inventory.cluster
    out = []
    for h in ctx.inventory.balancers:
        row: dict = {"host": h.name, "holds_vip": None, "listeners": {}, "error": None}
        try:
            ip = ctx.transport.run(h, f"ip -4 -o addr show to {c.vip}/32", timeout=20)
            row["holds_vip"] = bool(ip.ok and ip.stdout.strip())
            r = ctx.transport.run(h, SHOW_STAT, timeout=20)
            if not r.ok:
                row["error"] = (r.stderr.strip().splitlines() or ["no answer on the stats socket"])[-1]
            stats = parse_show_stat(r.stdout) if r.ok else {}
            for name in (RW, RO):
                servers = stats.get(name, {})
                row["listeners"][name] = {"up": up(servers), "down": sorted(set(servers) - set(up(servers)))}
        except Exception as exc:  # an unreachable balancer is shown as such; the others still are
            row["error"] = str(exc).splitlines()[0]
        out.append(row)
    return {"vip": c.vip, "ports": {"rw": c.ports.rw, "ro": c.ports.ro, "pgbouncer": c.ports.pgbouncer},
            "balancers": out}


def frontdoor_table(doc: dict) -> Table:
    p = doc["ports"]
    t = Table(title=f"front door {doc['vip']} (clients reach PgBouncer :{p['pgbouncer']} on the backends)")
    for col in ("balancer", "VIP", f"read-write :{p['rw']} ->", f"read-only :{p['ro']} ->", "errors"):
        t.add_column(col)
    for b in doc["balancers"]:
        rw, ro = b["listeners"].get(RW, {}), b["listeners"].get(RO, {})
        t.add_row(b["host"], "[green]holds it[/]" if b["holds_vip"] else "-",
                  _targets(rw, exactly_one=True), _targets(ro), b["error"] or "")
    return t


def _targets(listener: dict, exactly_one: bool = False) -> str:
    ups = listener.get("up", [])
    ok = len(ups) == 1 if exactly_one else bool(ups)
    text = ", ".join(ups) or "no backend UP"
    return f"[green]{text}[/]" if ok else f"[red]{text}[/]"


def frontdoor_dsn(ctx: Ctx, port: int | None = None, **extra: str) -> str:
    """libpq DSN through the VIP (HAProxy -> PgBouncer, TLS end to end to PgBouncer, verify-ca: the host
    certificates do not name the VIP) for the admin role; read-write port unless told otherwise."""
    c = ctx.inventory.cluster
    parts = {"host": c.vip, "port": str(port or c.ports.rw), "dbname": "postgres",
             "user": ctx.secrets["admin"]["username"], "password": ctx.secrets["admin"]["password"],
             "sslmode": "verify-ca", "sslrootcert": str(ctx.pki_dir / "ca.crt"), "connect_timeout": "3",
             "keepalives": "1", "keepalives_idle": "2", "keepalives_interval": "1", "keepalives_count": "3",
             "tcp_user_timeout": "5000", "application_name": "runbook-frontdoor", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())
