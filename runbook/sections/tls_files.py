"""Certificates on the hosts: the SANs of a host, its material from state/pki, the files a section puts."""
from __future__ import annotations

import shlex
import threading
from pathlib import Path

from runbook.core.context import Ctx
from runbook.core.step import Put, Run
from runbook.inventory import Host


def sans(ctx: Ctx, host: Host) -> tuple[list[str], list[str]]:
    dns = [host.name] + ([host.fqdn] if host.fqdn else [])
    if ctx.inventory.cluster.domain:
        dns.append(f"{host.name}.{ctx.inventory.cluster.domain}")
    return dns, [host.address]


_PKI_LOCK = threading.Lock()  # hosts are decided in parallel; the CA is made once, by one of them


def cert_material(ctx: Ctx, host: Host) -> tuple[bytes, bytes, bytes, Path]:
    """(ca.crt, host.crt, host.key, key path) from state/pki; issued on first use, reused while valid."""
    from runbook.credentials.pki import ensure_ca, ensure_host_cert

    dns, ips = sans(ctx, host)
    with _PKI_LOCK:
        ca = ensure_ca(ctx.pki_dir)
        crt, key, _ = ensure_host_cert(ctx.pki_dir, ca, host.name, dns, ips)
    return ca.cert_path.read_bytes(), crt.read_bytes(), key.read_bytes(), key


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
    """What the files' derived check (content, mode, owner of each) cannot say: the directory's mode."""
    return f"test \"$(stat -c '%a %U' {shlex.quote(tls_dir)})\" = '750 {owner}'"
