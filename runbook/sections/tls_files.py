"""Certificates on the hosts: the SANs of a host, its material from state/pki, the files a section puts."""
from __future__ import annotations

import shlex
from pathlib import Path

from runbook.core.context import Ctx
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


def tls_files(ctx: Ctx, host: Host, tls_dir: str, owner: str) -> list:
    """The CA, the host's certificate and its key (0600, service user) in a 0750 directory."""
    ca, crt, key, key_path = cert_material(ctx, host)
    return [
        Run(f"install -d -m 0750 -o {owner} -g {owner} {tls_dir}"),
        Put(f"{tls_dir}/ca.crt", ca, mode="0644", owner=owner),
        Put(f"{tls_dir}/{host.name}.crt", crt, mode="0644", owner=owner),
        Put(f"{tls_dir}/{host.name}.key", key, mode="0600", owner=owner, secret=True,
            local_copy=str(key_path)),
    ]


def tls_check(tls_dir: str, host: Host, owner: str) -> str:
    k = shlex.quote(f"{tls_dir}/{host.name}.key")
    return (f"test \"$(stat -c '%a %U' {k})\" = '600 {owner}' && "
            f"test \"$(stat -c '%a %U' {tls_dir})\" = '750 {owner}' && test -s {tls_dir}/ca.crt")
