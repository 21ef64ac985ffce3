"""Helpers shared by the sections: the bundle on the hosts, certificates, templates, units."""
from __future__ import annotations

import shlex
import threading
from functools import lru_cache
from pathlib import Path

from ..context import Ctx
from ..inventory import Host
from ..render import render
from ..step import Put, Run

REMOTE_BUNDLE = "/opt/runbook-bundle"  # where the push step puts the bundle on every host


def manifest(ctx: Ctx):
    return _manifest(str(ctx.bundle_dir))


@lru_cache(maxsize=4)
def _manifest(bundle_dir: str):
    from ..bundle.manifest import load_manifest

    return load_manifest(Path(bundle_dir))


def remote(entry) -> str:
    return f"{REMOTE_BUNDLE}/{entry.path}"


def sums(entries) -> bytes:
    """sha256sum -c input for bundle entries as they lie on the host."""
    return "".join(f"{e.sha256}  {remote(e)}\n" for e in entries).encode()


def sans(ctx: Ctx, host: Host) -> tuple[list[str], list[str]]:
    dns = [host.name] + ([host.fqdn] if host.fqdn else [])
    if ctx.inventory.cluster.domain:
        dns.append(f"{host.name}.{ctx.inventory.cluster.domain}")
    return dns, [host.address]


_PKI_LOCK = threading.Lock()  # hosts are decided in parallel; the CA is made once, by one of them


def cert_material(ctx: Ctx, host: Host) -> tuple[bytes, bytes, bytes, Path]:
    """(ca.crt, host.crt, host.key, key path) from state/pki; issued on first use, reused while valid."""
    from ..pki import ensure_ca, ensure_host_cert

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
    k = shlex.quote(f"{tls_dir}/{host.name}.key")
    return (f"test \"$(stat -c '%a %U' {k})\" = '600 {owner}' && "
            f"test \"$(stat -c '%a %U' {tls_dir})\" = '750 {owner}' && test -s {tls_dir}/ca.crt")


def template(name: str, path: str, ctx: dict, *, mode: str = "0644", owner: str = "root",
             group: str | None = None, secret: bool = False) -> Put:
    return Put(path, render(name, **ctx).encode(), mode=mode, owner=owner, group=group, secret=secret,
               source=f"templates/{name}")


def unit_actions(unit: str, put: Put) -> list:
    return [put, Run("systemctl daemon-reload"), Run(f"systemctl enable {unit}")]


def unit_undo(unit: str, path: str) -> list:
    return [Run(f"systemctl disable --now {unit} 2>/dev/null || true"), Run(f"rm -f {path}"),
            Run("systemctl daemon-reload")]
