"""Certificates on the hosts: the SANs of a host, its certificates per purpose from state/pki, the files a
section puts. A host holds, in its service's TLS directory, ``ca.crt`` (and ``peer-ca.crt`` on etcd hosts) and
``<purpose>.crt``/``<purpose>.key`` for each purpose of its role (runbook.credentials.purposes)."""
from __future__ import annotations

import shlex
from collections.abc import Callable

from runbook.cluster.context import Ctx
from runbook.core.step import Put, Run
from runbook.credentials.pki import Leaf
from runbook.credentials.purposes import PEER_CA, Purpose, for_role
from runbook.inventory import Host, Inventory

def sans(ctx: Ctx, host: Host) -> tuple[list[str], list[str]]:
    dns = [host.name] + ([host.fqdn] if host.fqdn else [])
    if ctx.inventory.cluster.domain:
        dns.append(f"{host.name}.{ctx.inventory.cluster.domain}")
    return dns, [host.address]


def leaf(ctx: Ctx, host: Host, which: Purpose | str) -> Leaf:
    """*host*'s certificate for a purpose, from state/pki: issued on first use, reused while valid.
    A dry run or an export issues nothing on disk (ctx.pki keeps what is missing in memory)."""
    dns, ips = sans(ctx, host)
    return ctx.pki.leaf(host.name, which, dns, ips)


def host_purposes(host: Host, inventory: Inventory | None = None) -> list[Purpose]:
    """Every purpose *host* holds a certificate for, by its roles (each once); with *inventory*, only the
    purposes it turns on (the front door's with cluster.vip, pgBackRest's with a backup host)."""
    return list({p.name: p for role in host.roles for p in for_role(role, inventory)}.values())


# Who serves a server certificate: (systemd unit, reload command or None, [(port, starttls)]).
# etcd re-reads its leaf certificates and keys on every new handshake: nothing to reload, only to prove.
# Patroni re-reads its REST API certificate on SIGHUP and passes the reload on to PostgreSQL, which
# then re-reads its ssl_* files: one `systemctl reload patroni` serves both ports.
SERVED_BY: dict[str, tuple[str, str | None, list[tuple[int, str | None]]]] = {
    "etcd-server": ("etcd", None, [(2379, None)]),
    "etcd-peer": ("etcd", None, [(2380, None)]),
    "rest-server": ("patroni", "systemctl reload patroni", [(8008, None)]),
    "pg-server": ("patroni", "systemctl reload patroni", [(5432, "postgres")]),
}
SERVE_WAIT = 30  # seconds for a reloaded service to hand out the new certificate
Served = tuple[str, str | None, list[tuple[int, str | None]]]
# Served certificates whose port the inventory decides: purpose -> ctx -> (unit, reload, ports).
SERVED_LATER: dict[str, Callable[[Ctx], Served]] = {
    "pgbouncer-server": lambda ctx: ("pgbouncer", "systemctl reload pgbouncer",
                                     [(ctx.inventory.cluster.ports.pgbouncer, "postgres")]),
    # pgBackRest's server reads its certificate when it starts; a restart breaks no backup that is not running
    "pgbackrest": lambda ctx: ("pgbackrest-server", "systemctl restart pgbackrest-server", [(8432, None)]),
}


def served_by(ctx: Ctx, name: str) -> Served | None:
    """(unit, reload command, [(port, starttls)]) of the service serving purpose *name*; None for a client."""
    if name in SERVED_BY:
        return SERVED_BY[name]
    return SERVED_LATER[name](ctx) if name in SERVED_LATER else None


def cert_files(tls_dir: str, which: Purpose, host: str = "") -> tuple[str, str]:
    """(certificate, key) paths of a purpose on a host."""
    crt, key = which.file_names(host)
    return f"{tls_dir}/{crt}", f"{tls_dir}/{key}"


def leaf_actions(ctx: Ctx, host: Host, tls_dir: str, which: Purpose | str, prove: bool = True) -> list:
    """One purpose's certificate (0644) and key (0600, the purpose's owner); with *prove*, when the service
    serving it is running, it is reloaded if it still serves another certificate and a fresh handshake on
    each of its ports must show the certificate of the file. The helper other sections call for their own
    purposes (pgBackRest, HAProxy, PgBouncer): register a Purpose, then put its files with this."""
    lf = leaf(ctx, host, which)
    p = lf.purpose
    crt, key = cert_files(tls_dir, p, host.name)
    acts: list = [Put(crt, lf.cert_pem, mode="0644", owner=p.owner),
            Put(key, lf.key_pem, mode="0600", owner=p.owner, secret=True, local_copy=str(lf.key_path))]
    served = served_by(ctx, p.name)
    if prove and served:
        acts.append(Run(serve_new_cert(host, crt, *served), timeout=SERVE_WAIT + 60))
    return acts


def tls_files(ctx: Ctx, host: Host, tls_dir: str, owner: str, role: str | None = None) -> list:
    """The CA(s) and the certificate and key of every purpose of *role* (default: the owner's service role)
    in a 0750 directory owned by the service user *owner*; each served certificate is proven served."""
    role = role or ("etcd" if owner == "etcd" else "postgres")
    ps = [p for p in for_role(role, ctx.inventory) if p.tls_dir is None]  # the others: their section puts them
    actions: list = [Run(f"install -d -m 0750 -o {owner} -g {owner} {tls_dir}"),
                     Put(f"{tls_dir}/ca.crt", ctx.pki.ca_pem(), mode="0644", owner=owner)]
    if any(p.ca == PEER_CA for p in ps):
        actions.append(Put(f"{tls_dir}/peer-ca.crt", ctx.pki.ca_pem(PEER_CA), mode="0644", owner=owner))
    for p in ps:
        actions += leaf_actions(ctx, host, tls_dir, p)
    return actions


def serve_new_cert(host: Host, crt: str, unit: str, reload: str | None, ports: list[tuple[int, str | None]]) -> str:
    """Shell: nothing when `unit` is not running or serves TLS on none of its ports (a first install, its own
    section not yet run); else reload it when a port serves a
    certificate other than `crt`, then wait (bounded) until fresh handshakes serve `crt` (SHA-256
    fingerprints) on every port that answers TLS, at least one; rc 1 with the fingerprints when not."""
    specs = " ".join(f"{p}:{st}" if st else str(p) for p, st in ports)
    lines = [
        "fp() { openssl x509 -noout -fingerprint -sha256 2>/dev/null | cut -d= -f2; }",
        'served() { case $1 in *:*) o="-starttls ${1#*:}";; *) o="";; esac; '
        f"timeout 5 openssl s_client $o -connect {host.address}:${{1%%:*}} </dev/null 2>/dev/null | fp; }}",
        f'show() {{ for p in {specs}; do s=$(served $p); echo "  {host.address}:${{p%%:*}} serves ${{s:-nothing}}"; '
        "done; }",
        f"systemctl is-active -q {unit} || {{ echo '{unit} is not running: nothing to reload'; exit 0; }}",
        f"want=$(fp < {crt})",
        # running but serving no TLS on its ports at all: not configured by its own section yet (a package's
        # service started with its default config, e.g. PgBouncer on localhost): nothing to reload
        f'up=0; for p in {specs}; do [ -n "$(served $p)" ] && up=1; done; [ $up -eq 1 ] || {{ echo "{unit} '
        f'serves no TLS on {host.address}:{specs} yet (its own section configures it): nothing to reload"; exit 0; }}',
        f'stale() {{ n=0; for p in {specs}; do s=$(served $p); [ -z "$s" ] && continue; n=$((n+1)); '
        '[ "$s" = "$want" ] || return 0; done; [ $n -eq 0 ]; }',
        f"if stale; then echo '{unit} serves another certificate than {crt}: reloading'; {reload or ':'}; fi",
        f'for i in $(seq {SERVE_WAIT}); do stale || {{ echo "{crt} $want, fresh handshakes:"; show; exit 0; }}; '
        "sleep 1; done",
        f'{{ echo "{host.name}: {SERVE_WAIT} s after {reload or "the file changed"}, {unit} does not serve {crt} '
        '($want):"; show; echo "see the service log; a restart in a maintenance window loads the file"; } >&2',
        "exit 1",
    ]
    return "\n".join(lines)


def tls_check(tls_dir: str, host: Host, owner: str) -> str:
    """What the files' derived check (content, mode, owner of each) cannot say: the directory's mode."""
    return f"test \"$(stat -c '%a %U' {shlex.quote(tls_dir)})\" = '750 {owner}'"
