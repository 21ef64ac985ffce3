"""cluster.audit's wrong-purpose probes: a certificate of the cluster's own CA but of the wrong purpose, presented
where it must not open anything, from a PostgreSQL host (whose keys a PostgreSQL superuser can read):

    presented                        to                                  must be
    pg-server (serverAuth only)      etcd's client API (2379)            refused: not a client certificate
    etcd-client (main CA)            etcd's peer port (2380)             refused: peers trust the peer CA only
    pg-server (serverAuth only)      Patroni's REST API (8008)           refused: not a client certificate

The probe sends one HTTPS GET per target (etcd /version, peer /members, REST /patroni), verifying nothing
of the server (only whether it takes the certificate), and reports the HTTP status when it got one. An
answer at all is a finding: the service let that certificate in. A refusal is a TLS alert, a reset or a
closed connection during or right after the handshake. No secret is sent.
"""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.inventory import Host

# argv: name url cert key, repeated; stdout: one `name|verdict` line each (refused:..., answered:<status>)
PROBE = r"""import ssl, sys, urllib.error, urllib.request
args = sys.argv[1:]
for i in range(0, len(args), 4):
    name, url, crt, key = args[i:i + 4]
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE  # only whether the server takes this client certificate
    try:
        c.load_cert_chain(crt, key)
    except (OSError, ssl.SSLError) as e:
        print(f"{name}|error:cannot load {crt}: {e}")
        continue
    try:
        r = urllib.request.urlopen(url, context=c, timeout=10)
        print(f"{name}|answered:{r.status}")
    except urllib.error.HTTPError as e:
        print(f"{name}|answered:{e.code}")
    except (ssl.SSLError, ConnectionError, urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        print(f"{name}|refused:{type(reason).__name__} {str(reason)[:100]}".replace("\n", " "))
"""


def probes(ctx: Ctx, prober: Host) -> list[tuple[str, str, str, str]]:
    """(what, url, certificate, key) presented from *prober*: each must be refused."""
    tls = ctx.paths.patroni_tls_dir
    etcd = ctx.inventory.etcd[0]
    rest = next((h for h in ctx.inventory.postgres if h.name != prober.name), prober)
    pair = lambda p: (f"{tls}/{p}.crt", f"{tls}/{p}.key")  # noqa: E731
    return [(f"etcd client API ({etcd.name}:2379) refuses a PostgreSQL server certificate",
             f"https://{etcd.address}:2379/version", *pair("pg-server")),
            (f"etcd peer port ({etcd.name}:2380) refuses Patroni's etcd client certificate",
             f"https://{etcd.address}:2380/members", *pair("etcd-client")),
            (f"REST API ({rest.name}:8008) refuses a PostgreSQL server certificate as a client",
             f"https://{rest.address}:8008/patroni", *pair("pg-server"))]


def parse(out: str) -> dict[str, str]:
    got = {}
    for line in out.splitlines():
        name, sep, verdict = line.partition("|")
        if sep:
            got[name] = verdict
    return got


def verdict(what: str, answer: str) -> list[str]:
    """[] when the wrong-purpose certificate was refused; else the finding."""
    if answer.startswith("refused:"):
        return []
    if answer.startswith("answered:"):
        return [f"{what.split(' refuses ')[0]} accepted a certificate of the wrong purpose "
                f"({what.split(' refuses ')[1]}): HTTP {answer.split(':', 1)[1]}"]
    return [f"the probe gave no verdict: {answer or 'no answer'}"]


def audit_wrong_purposes(ctx: Ctx) -> list:
    """The probes, run as postgres on the first PostgreSQL host that answers; one Check per probe."""
    from runbook.procedures.audit import Check

    from runbook.procedures.audit_probes import first_answer

    def command(prober: Host) -> str:
        return f"{ctx.paths.patroni_venv}/bin/python - " + " ".join(shlex.quote(a) for p in probes(ctx, prober)
                                                                  for a in p)
    r, prober, errors = first_answer(ctx, list(ctx.inventory.postgres), command, PROBE.encode(), timeout=90)
    if r is None or prober is None:
        return [Check("local", "wrong-purpose certificates are refused",
                      [f"no PostgreSQL host could run the probe: {'; '.join(errors) or 'none'}"])]
    got = parse(r.stdout)
    return [Check(prober.name, what, verdict(what, got.get(what, ""))) for what, *_ in probes(ctx, prober)]
