"""Balancer section: HAProxy and keepalived on the balancer hosts (the PostgreSQL hosts when the inventory
names none), when cluster.vip turns the front door on.

HAProxy's read-write listener sends clients to the PgBouncer of the host whose Patroni answers /primary, the
read-only one to the replicas answering /replica?lag=...; both health checks speak TLS with a client
certificate. keepalived holds the VIP on one balancer whose HAProxy is healthy: unicast VRRP, PASS
authentication, every instance BACKUP with nopreempt (a recovered host never takes the VIP back)."""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.core.step import Local, Put, Run, Section, wait_for
from runbook.inventory import Host
from runbook.sections.bundle_files import dpkg_install, manifest, remote, sums
from runbook.sections.frontdoor import (
    HAPROXY_TLS_DIR,
    REST_PORT,
    SHOW_STAT,
    STATS_SOCKET,
    rest_client_actions,
    router_id,
    secret,
)
from runbook.sections.units import template

section = Section("balancer", 70, "HAProxy and keepalived: one floating address in front of the cluster")
HAPROXY_CONF = "/etc/haproxy/haproxy.cfg"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
CHECK_SCRIPT = "/etc/keepalived/check_haproxy.sh"
CLIENT_PEM = f"{HAPROXY_TLS_DIR}/client.pem"  # purpose haproxy-client; HAProxy loads the key from client.pem.key
PACKAGES = ("haproxy", "keepalived")
RW, RO = "postgres_rw", "postgres_ro"
WAIT = 30  # seconds for health checks to settle / the VIP to be placed


def haproxy_context(ctx: Ctx, host: Host) -> dict:
    """Context of templates/haproxy/haproxy.cfg.j2 for balancer `host`."""
    c = ctx.inventory.cluster
    return {"conf": HAPROXY_CONF, "host": host.name, "stats_socket": STATS_SOCKET, "maxconn": 2000,
            "listeners": [{"name": RW, "port": c.ports.rw, "uri": "/primary", "balance": None},
                          {"name": RO, "port": c.ports.ro, "uri": f"/replica?lag={c.max_replica_lag}",
                           "balance": "roundrobin"}],
            "servers": [{"name": h.name, "address": h.address} for h in ctx.inventory.postgres],
            "pgbouncer_port": c.ports.pgbouncer, "rest_port": REST_PORT,
            "ca_file": f"{HAPROXY_TLS_DIR}/ca.crt", "client_pem": CLIENT_PEM}


def keepalived_context(ctx: Ctx, host: Host, auth_pass: str) -> dict:
    """Context of templates/keepalived/*.j2 for balancer `host`: unicast peers are the other balancers."""
    c = ctx.inventory.cluster
    balancers = ctx.inventory.balancers
    rank = [h.name for h in balancers].index(host.name)
    return {"conf": KEEPALIVED_CONF, "host": host.name, "check_script": CHECK_SCRIPT, "stats_socket": STATS_SOCKET,
            "instance": f"VI_{c.name}", "interface": c.vip_interface, "router_id": router_id(c.name),
            "priority": 150 - 10 * rank, "address": host.address,
            "peers": [h.address for h in balancers if h.name != host.name], "auth_pass": auth_pass,
            "vip": c.vip, "prefix": c.vip_prefix}


@section.step("packages", role="balancer")
def packages(ctx: Ctx, host: Host) -> list:
    """Packages: haproxy and keepalived from the bundle's .deb files (the balancer closure), offline"""
    debs = manifest(ctx).debs(host.os, "balancer")
    return [Run("sha256sum --quiet -c -", stdin=sums(debs)), dpkg_install(" ".join(remote(e) for e in debs))]


@packages.check
def _packages_check(ctx: Ctx, host: Host) -> str:
    return " && ".join(f"dpkg-query -W -f='${{Status}}' {p} | grep -q 'install ok installed'" for p in PACKAGES)


@packages.undo
def _packages_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"DEBIAN_FRONTEND=noninteractive dpkg -r {' '.join(PACKAGES)} >/dev/null 2>&1 || true")]


@section.step("tls", role="balancer")
def tls(ctx: Ctx, host: Host) -> list:
    """TLS: the CA and the client certificate HAProxy's health checks show Patroni's REST API
    (/etc/haproxy/tls: the certificate, its key 0600 root)"""
    return [Run(f"install -d -m 0700 {HAPROXY_TLS_DIR}"),
            Put(f"{HAPROXY_TLS_DIR}/ca.crt", ctx.pki.ca_pem()),
            *rest_client_actions(ctx, host)]


@tls.check
def _tls_check(ctx: Ctx, host: Host) -> str:
    return f"test \"$(stat -c '%a %U' {HAPROXY_TLS_DIR})\" = '700 root'"


def rw_routes() -> str:
    """Shell: rc 0 when the read-write listener has exactly one server UP (stats socket)."""
    py = ("import sys; rows=[l.split(',') for l in sys.stdin.read().splitlines()]; "
          f"n=sum(1 for r in rows if len(r) > 17 and r[0] == '{RW}' and r[1] not in ('FRONTEND', 'BACKEND') "
          "and r[17].startswith('UP')); sys.exit(0 if n == 1 else 1)")
    return f"{SHOW_STAT} | python3 -c {shlex.quote(py)}"


def checks_pass_after_reload() -> str:
    """Shell proving HAProxy took a new client pair: reload it (a new worker reads client.pem), let its checks
    run past `fall` (2 x 1 s: a REST API refusing the pair marks every backend DOWN by then), then a bounded
    wait until the read-write listener has exactly one backend UP, i.e. the REST APIs accept the pair."""
    return f"systemctl reload-or-restart haproxy && sleep 3 && {wait_for(rw_routes(), WAIT)}"


@section.step("haproxy", role="balancer")
def haproxy(ctx: Ctx, host: Host) -> list:
    """HAProxy: read-write and read-only listeners (Patroni /primary, /replica?lag= over TLS with a client
    certificate, on-marked-down shutdown-sessions), validated with haproxy -c, reloaded, then a bounded wait
    until the read-write listener has exactly one backend UP"""
    return [template("haproxy/haproxy.cfg.j2", HAPROXY_CONF, haproxy_context(ctx, host)),
            Run(f"haproxy -c -q -f {HAPROXY_CONF}"),
            Run("systemctl enable haproxy && systemctl reload-or-restart haproxy"),
            Run(wait_for(rw_routes(), WAIT), timeout=WAIT + 30)]


@haproxy.check
def _haproxy_check(ctx: Ctx, host: Host) -> str:
    return f"systemctl is-active -q haproxy && {rw_routes()}"


@haproxy.undo
def _haproxy_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl reload-or-restart haproxy 2>/dev/null || true")]  # after the file is restored


@section.step("keepalived", role="balancer")
def keepalived(ctx: Ctx, host: Host) -> list:
    """keepalived: VRRP with unicast peers and PASS authentication, the VIP where HAProxy is healthy (track
    script), nopreempt; config checked with keepalived -t, then reloaded (a holder keeps the VIP)"""
    c = keepalived_context(ctx, host, secret(ctx, "vrrp")["password"])
    return [Run("install -d -m 0755 /etc/keepalived"),
            template("keepalived/check_haproxy.sh.j2", CHECK_SCRIPT, c, mode="0755"),
            template("keepalived/keepalived.conf.j2", KEEPALIVED_CONF, c, mode="0600", secret=True),
            Run(f"keepalived -t -f {KEEPALIVED_CONF} -l"),
            Run("systemctl enable keepalived && systemctl reload-or-restart keepalived")]


@keepalived.check
def _keepalived_check(ctx: Ctx, host: Host) -> str:
    return "systemctl is-active -q keepalived"


@keepalived.undo
def _keepalived_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl disable --now keepalived 2>/dev/null || true")]


# -- cluster-wide checks (local steps: they ask every balancer) -------------------------------------
def vip_holders(ctx: Ctx) -> list[str]:
    """The balancers holding the VIP now (`ip -o addr show to VIP`)."""
    vip = ctx.inventory.cluster.vip
    out = []
    for h in ctx.inventory.balancers:
        r = ctx.transport.run(h, f"ip -4 -o addr show to {vip}/32", timeout=20)
        if r.ok and r.stdout.strip():
            out.append(h.name)
    return out


def rw_targets(ctx: Ctx) -> dict[str, list[str]]:
    """balancer -> the servers its read-write listener sends clients to (UP)."""
    from runbook.sections.frontdoor import parse_show_stat, up

    out = {}
    for h in ctx.inventory.balancers:
        r = ctx.transport.run(h, SHOW_STAT, timeout=20)
        out[h.name] = up(parse_show_stat(r.stdout).get(RW, {})) if r.ok else []
    return out


def _settled(ctx: Ctx) -> str | None:
    """None when exactly one balancer holds the VIP and every read-write listener has the same one backend UP."""
    holders = vip_holders(ctx)
    if len(holders) != 1:
        return f"the VIP {ctx.inventory.cluster.vip} is held by {len(holders)} hosts ({', '.join(holders) or 'none'})"
    targets = rw_targets(ctx)
    bad = {b: t for b, t in targets.items() if len(t) != 1}
    if bad or len({t[0] for t in targets.values()}) != 1:
        return "read-write backends UP per balancer: " + "; ".join(f"{b}: {', '.join(t) or 'none'}"
                                                                   for b, t in targets.items())
    return None


def _first_balancer(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """Recorded once, on the first balancer: the check asks every balancer from the control machine."""
    return hosts[:1]


@section.step("settled", role="balancer", only=_first_balancer, always_check=True)
def settled(ctx: Ctx, host: Host) -> list:
    """Front door settled: the VIP on exactly one balancer, every read-write listener with one backend UP
    (the same one); a bounded wait"""
    from runbook.cluster.readers import wait

    def run() -> str:
        why: list[str] = []

        def ok() -> bool:
            why.append(_settled(ctx) or "")
            return not why[-1]

        if not wait(ok, WAIT, 1):
            raise RuntimeError(f"not settled after {WAIT} s: {why[-1]}")
        return f"VIP {ctx.inventory.cluster.vip} on {vip_holders(ctx)[0]}"

    return [Local("wait until one balancer holds the VIP and every read-write listener has one backend UP", run)]


@settled.check
def _settled_check(ctx: Ctx, host: Host) -> bool:
    return _settled(ctx) is None


@settled.undo
def _settled_undo(ctx: Ctx, host: Host) -> list:
    return []  # a probe: nothing to revert
