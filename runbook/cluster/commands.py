"""Command lines for the cluster's own tools, as the runbook runs them on a host: etcdctl with the host's
client certificate, patronictl with the Patroni config, psql on the local socket. Shared by the sections,
the procedures (switchover, audit, drills) and the readers."""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.cluster.render import etcd_context, member_name
from runbook.inventory import Host


def etcdctl(ctx: Ctx, host: Host, args: str, endpoints: str | None = None) -> str:
    """etcdctl on an etcd host with its etcd root client certificate (CN=root; the ectl wrapper, usable
    before it exists)."""
    c = etcd_context(ctx.inventory, host, ctx.paths)
    ep = endpoints or f"https://{host.name}:2379"
    return (f"ETCDCTL_API=3 {c['etcd_bin_dir']}/etcdctl --cacert={c['trusted_ca_file']} --cert={c['ctl_cert_file']} "
            f"--key={c['ctl_key_file']} --endpoints={ep} --command-timeout=5s {args}")


def patronictl(ctx: Ctx, args: str) -> str:
    return f"{ctx.paths.patroni_venv}/bin/patronictl -c {ctx.paths.patroni_conf} {args}"


def member_ok(ctx: Ctx, host: Host, leader: bool = False) -> str:
    """rc 0 when the member is the running leader (leader=True) or a running leader / streaming replica."""
    accept = "r == 'Leader' and s == 'running'" + ("" if leader else " or s == 'streaming'")
    py = ("import json,sys; m={x['Member']: x for x in json.load(sys.stdin)}.get(sys.argv[1]) or {}; "
          f"r, s = m.get('Role', ''), m.get('State', ''); sys.exit(0 if {accept} else 1)")
    return (f"{patronictl(ctx, 'list -f json')} | {ctx.paths.patroni_venv}/bin/python -c "
            f"{shlex.quote(py)} {member_name(host)}")


def psql(ctx: Ctx, args: str) -> str:
    return (f"{ctx.paths.pg_bin_dir(ctx.inventory.cluster.postgres_major)}/psql -X -q -h {ctx.paths.socket_dir} "
            f"-d postgres {args}")
