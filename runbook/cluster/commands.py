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
#
# Each answer is ACKed at once (TCP_QUICKACK once the request is sent and again once the headers are in):
# Patroni's server writes its TLS session tickets, its headers and its body as separate small segments with
# Nagle's algorithm on, so each one after the first waits for our ACK, which Linux delays ~40 ms. With it, a
# GET takes ~3 ms instead of ~44 ms.
_REST = """import http.client, json, socket, ssl, sys
ca, cert, key, address, verdict = sys.argv[1:6]
tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(cert, key)
host, port = address.rsplit(":", 1)
conn = http.client.HTTPSConnection(host, int(port), context=tls, timeout=10)
def ack_now(s):
    if s is not None and hasattr(socket, "TCP_QUICKACK"):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
got, failed = {}, []
for path in sys.argv[6:]:
    conn.request("GET", path)
    s = conn.sock
    ack_now(s)
    r = conn.getresponse()
    ack_now(s)
    body = r.read()
    if r.status != 200:
        failed.append(f"GET {path}: HTTP {r.status}")
        continue
    got[path] = json.loads(body)
exec(verdict)
"""
_ALL_ANSWERED = "if failed:\n    sys.exit(failed[0])\n"

# Several verdicts on one set of answers (rest_verdicts): each in its own namespace, its exit status printed on
# a line of its own; a path that did not answer 200 is missing from `got` (a verdict that reads it fails).
_EACH = """for _name, _src in VERDICTS:
    try:
        exec(_src, dict(globals()))  # what rest_get's verdict sees: got, sys, json
        _rc = 0
    except SystemExit as e:
        _rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        _rc = 1
    print("RUNBOOK-VERDICT", _name, _rc, flush=True)
"""


def rest_get(ctx: Ctx, host: Host, paths: list[str], verdict: str) -> str:
    """The command (run it as postgres: the client key is postgres's) that GETs `paths` in turn from the host's
    own REST API and runs `verdict`: Python with `got` = {path: JSON}, `sys` and `json`, whose exit status is
    the command's (an HTTP error, a refused certificate or no answer: rc 1)."""
    return _rest(ctx, host, paths, _ALL_ANSWERED + verdict)


def _rest(ctx: Ctx, host: Host, paths: list[str], verdict: str) -> str:
    args = [*rest_client(ctx, host), verdict, *paths]
    return f"{ctx.paths_for(host).python3} -I -S -c {shlex.quote(_REST)} " + " ".join(shlex.quote(a) for a in args)


def rest_verdicts(ctx: Ctx, host: Host, paths: list[str], verdicts: dict[str, str]) -> str:
    """One REST reader for several checks: GETs `paths` once, then runs each named verdict (as rest_get's, but
    `got` holds only the paths that answered 200) and prints `RUNBOOK-VERDICT <name> <rc>` for each; a check
    reads its own with verdict_ok(name). rc 1 when the API did not answer at all."""
    return _rest(ctx, host, paths, f"VERDICTS = {list(verdicts.items())!r}\n" + _EACH)


def verdict_ok(name: str) -> str:
    """The filter that passes (rc 0) when rest_verdicts' stdout says verdict `name` passed."""
    return f"grep -qx 'RUNBOOK-VERDICT {name} 0'"


def member_verdict(host: Host) -> str:
    """The verdict of member_ok_rest: rc 0 when the host's member is a running leader or a streaming replica."""
    return (f'name = {json.dumps(member_name(host))}\n'
            'm = {x.get("name"): x for x in got["/cluster"].get("members", [])}.get(name) or {}\n'
            'r, s = m.get("role"), m.get("state")\n'
            'sys.exit(0 if r == "leader" and s == "running" or s == "streaming" else 1)')


def member_ok_rest(ctx: Ctx, host: Host) -> str:
    """member_ok (a running leader or a streaming replica) from the host's own REST API (GET /cluster): the
    member record of the DCS that `patronictl list` prints, without starting patronictl. For the checks; the
    steps' own waits keep member_ok (a step's fingerprint is its rendered actions)."""
    return rest_get(ctx, host, ["/cluster"], member_verdict(host))
