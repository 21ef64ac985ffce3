"""Certificates on the hosts: the SANs of a host, its material from state/pki, the files a section puts."""
from __future__ import annotations

import shlex
from pathlib import Path

from runbook.cluster.context import Ctx
from runbook.core.step import Put, Run
from runbook.inventory import Host


def sans(ctx: Ctx, host: Host) -> tuple[list[str], list[str]]:
    dns = [host.name] + ([host.fqdn] if host.fqdn else [])
    if ctx.inventory.cluster.domain:
        dns.append(f"{host.name}.{ctx.inventory.cluster.domain}")
    return dns, [host.address]


def cert_material(ctx: Ctx, host: Host) -> tuple[bytes, bytes, bytes, Path]:
    """(ca.crt, host.crt, host.key, key path) from state/pki; issued on first use, reused while valid.
    A dry run or an export issues nothing on disk (ctx.pki keeps what is missing in memory)."""
    dns, ips = sans(ctx, host)
    crt, key, key_path = ctx.pki.host(host.name, dns, ips)
    return ctx.pki.ca_pem(), crt, key, key_path


# Who serves the files a service user owns: (systemd unit, reload command or None, [(port, starttls)]).
# etcd re-reads its leaf certificate and key on every new handshake: nothing to reload, only to prove.
# Patroni re-reads its REST API certificate on SIGHUP and passes the reload on to PostgreSQL, which
# then re-reads its ssl_* files: one `systemctl reload patroni` serves both ports.
SERVED_BY: dict[str, tuple[str, str | None, list[tuple[int, str | None]]]] = {
    "etcd": ("etcd", None, [(2379, None)]),
    "postgres": ("patroni", "systemctl reload patroni", [(8008, None), (5432, "postgres")]),
}
SERVE_WAIT = 30  # seconds for a reloaded service to hand out the new certificate


def tls_files(ctx: Ctx, host: Host, tls_dir: str, owner: str) -> list:
    """The CA, the host's certificate and its key (0600, service user) in a 0750 directory; when the
    service reading them is running, it is reloaded if it still serves another certificate, and a fresh
    handshake on each of its ports must show the certificate of the file."""
    ca, crt, key, key_path = cert_material(ctx, host)
    actions = [
        Run(f"install -d -m 0750 -o {owner} -g {owner} {tls_dir}"),
        Put(f"{tls_dir}/ca.crt", ca, mode="0644", owner=owner),
        Put(f"{tls_dir}/{host.name}.crt", crt, mode="0644", owner=owner),
        Put(f"{tls_dir}/{host.name}.key", key, mode="0600", owner=owner, secret=True,
            local_copy=str(key_path)),
    ]
    if owner in SERVED_BY:
        actions.append(Run(serve_new_cert(host, f"{tls_dir}/{host.name}.crt", *SERVED_BY[owner]),
                           timeout=SERVE_WAIT + 60))
    return actions


def serve_new_cert(host: Host, crt: str, unit: str, reload: str | None, ports: list[tuple[int, str | None]]) -> str:
    """Shell: nothing when `unit` is not running (a first install); else reload it when a port serves a
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
