"""Command lines for the cluster's own tools, as the runbook runs them on a host: etcdctl with the host's
client certificate, patronictl with the Patroni config, psql on the local socket. Shared by the sections,
the procedures (switchover, audit, drills) and the readers."""
from __future__ import annotations

import json
import shlex

from runbook.cluster.context import Ctx
from runbook.cluster.render import etcd_context, member_name, patroni_context
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



def rest_client(ctx: Ctx, host: Host) -> tuple[str, str, str, str]:
    """(CA, client certificate, key, host:port) with which patronictl asks the host's REST API: the `ctl:` section
    and restapi.connect_address of its Patroni config, named once by runbook.cluster.render.patroni_context."""
    c = patroni_context(ctx.inventory, host, ctx.secrets, ctx.paths)
    return c["ca_file"], c["ctl_cert_file"], c["ctl_key_file"], c["restapi_connect_address"]


# GET some paths of the host's Patroni REST API with patronictl's client certificate, then run a verdict on the
# answers ({path: JSON} as `got`): the distribution's python3, standard library only, isolated (-I -S), ~0.1 s
# where patronictl takes ~1 s (the venv's interpreter, patroni, click and a DCS client of its own). The answers
# come from the DCS as patronictl's do: GET /cluster loads the cluster from the DCS, and a GET /config after it
# reads the cluster that load left (on its own, /config may answer from Patroni's last loop, up to loop_wait old).
_REST = """import http.client, json, ssl, sys
ca, cert, key, address, verdict = sys.argv[1:6]
tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(cert, key)
host, port = address.rsplit(":", 1)
conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=10)
got = {}
for path in sys.argv[6:]:
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"GET {path}: HTTP {r.status}")
    got[path] = json.loads(body)
exec(verdict)
"""


def rest_get(ctx: Ctx, host: Host, paths: list[str], verdict: str) -> str:
    """The command (run it as postgres: the client key is postgres's) that GETs `paths` in turn from the host's
    own REST API and runs `verdict`: Python with `got` = {path: JSON}, `sys` and `json`, whose exit status is
    the command's (an HTTP error, a refused certificate or no answer: rc 1)."""
    args = [*rest_client(ctx, host), verdict, *paths]
    return f"{ctx.paths_for(host).python3} -I -S -c {shlex.quote(_REST)} " + " ".join(shlex.quote(a) for a in args)


def member_ok_rest(ctx: Ctx, host: Host) -> str:
    """member_ok (a running leader or a streaming replica) from the host's own REST API (GET /cluster): the
    member record of the DCS that `patronictl list` prints, without starting patronictl. For the checks; the
    steps' own waits keep member_ok (a step's fingerprint is its rendered actions)."""
    verdict = (f'name = {json.dumps(member_name(host))}\n'
               'm = {x.get("name"): x for x in got["/cluster"].get("members", [])}.get(name) or {}\n'
               'r, s = m.get("role"), m.get("state")\n'
               'sys.exit(0 if r == "leader" and s == "running" or s == "streaming" else 1)')
    return rest_get(ctx, host, ["/cluster"], verdict)
