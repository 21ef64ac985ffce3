"""What each certificate is for: one Purpose per TLS role, each with its own key, owner and extended key usage.

A host holds only the purposes of its roles, so the key a PostgreSQL superuser can read (owner postgres) is
an etcd *client* certificate for the ``patroni`` etcd user, never an etcd peer or an etcd root certificate:

    purpose       role      EKU             CN                 SANs  owner     CA       read by
    etcd-peer     etcd      server+client   <host>             yes   etcd      peer CA  etcd (raft, 2380)
    etcd-server   etcd      server+client*  <host>             yes   etcd      CA       etcd (clients, 2379)
    etcd-root     etcd      client          root               no    root      CA       etcdctl/ectl as root
    etcd-client   postgres  client          (none)             no    postgres  CA       Patroni's etcd3 client
    rest-server   postgres  server          <host>             yes   postgres  CA       Patroni REST API (8008)
    rest-client   postgres  client          patroni-rest       no    postgres  CA       patronictl, member calls
    pg-server     postgres  server          <host>             yes   postgres  CA       PostgreSQL ssl (5432)

etcd-client has no CN at all (subject O=pg-ha-runbook, OU=etcd-client): with client-cert-auth, RBAC and the
/v3 JSON gateway (which Patroni's etcd3 client speaks) all on, etcd answers HTTP 400 "CommonName of client
sending a request against gateway will be ignored" to any client certificate with a CN, because it cannot
carry a CN identity through the gateway. Patroni therefore logs in as the etcd user `patroni` by password;
over gRPC the CN-less certificate alone is no etcd user ("user name is empty").

(*) etcd's gRPC gateway (the /v3 JSON API Patroni uses) dials etcd itself with the server certificate as
its client certificate, so etcd-server needs clientAuth too; etcd ignores the CN of gateway requests, and
no etcd user is named after a host, so that CN grants nothing.

Peers accept only peer certificates because peer traffic trusts a separate peer CA (state/pki/peer-ca.*)
that signs nothing else: no certificate of the main CA, whatever its CN, can join raft. (etcd's
peer-cert-allowed-cn would instead bind peer rights to one CN string of the main CA: one mis-issued CN
away from a peer.) The price: a CA rotation has two CAs to rotate.

Other sections register their own purposes (pgBackRest, HAProxy, PgBouncer) with ``register``.
"""
from __future__ import annotations

from dataclasses import dataclass

SERVER, CLIENT = "server", "client"
MAIN_CA, PEER_CA = "ca", "peer-ca"


@dataclass(frozen=True)
class Purpose:
    """One kind of certificate. ``cn`` None = the host's name; ``sans`` = host name, FQDN and address."""

    name: str
    role: str                 # the inventory role whose hosts hold it (etcd, postgres, ...)
    eku: tuple[str, ...]      # SERVER and/or CLIENT
    owner: str                # owner of the key file on the host (mode 0600)
    cn: str | None = None     # "" = no CN at all (subject O=pg-ha-runbook, OU=<purpose>)
    sans: bool = False
    ca: str = MAIN_CA         # MAIN_CA or PEER_CA
    service: str = ""         # what reads it, for status tables and messages
    tls_dir: str | None = None  # where it lives on the host; None: /etc/etcd/tls (etcd) or Patroni's TLS dir

    def common_name(self, host: str) -> str:
        return host if self.cn is None else self.cn


PURPOSES: dict[str, Purpose] = {}


def register(p: Purpose) -> Purpose:
    """Add a purpose (idempotent for an identical one); a different one under a taken name is an error."""
    if p.name in PURPOSES and PURPOSES[p.name] != p:
        raise ValueError(f"certificate purpose {p.name!r} is already registered differently")
    if not set(p.eku) <= {SERVER, CLIENT} or not p.eku:
        raise ValueError(f"purpose {p.name}: eku must be a non-empty subset of (server, client)")
    PURPOSES[p.name] = p
    return p


ETCD_PEER = register(Purpose("etcd-peer", "etcd", (SERVER, CLIENT), "etcd", sans=True, ca=PEER_CA,
                             service="etcd peer (2380)"))
ETCD_SERVER = register(Purpose("etcd-server", "etcd", (SERVER, CLIENT), "etcd", sans=True,
                               service="etcd client API (2379)"))
ETCD_ROOT = register(Purpose("etcd-root", "etcd", (CLIENT,), "root", cn="root", service="etcdctl as etcd root"))
ETCD_CLIENT = register(Purpose("etcd-client", "postgres", (CLIENT,), "postgres", cn="",
                               service="Patroni etcd3 client"))
REST_SERVER = register(Purpose("rest-server", "postgres", (SERVER,), "postgres", sans=True,
                               service="Patroni REST API (8008)"))
REST_CLIENT = register(Purpose("rest-client", "postgres", (CLIENT,), "postgres", cn="patroni-rest",
                               service="patronictl / REST client"))
PG_SERVER = register(Purpose("pg-server", "postgres", (SERVER,), "postgres", sans=True,
                             service="PostgreSQL (5432)"))


def for_role(role: str) -> list[Purpose]:
    """The purposes a host of *role* holds, in registration order."""
    return [p for p in PURPOSES.values() if p.role == role]


def get(name: str) -> Purpose:
    try:
        return PURPOSES[name]
    except KeyError:
        raise ValueError(f"unknown certificate purpose {name!r}; known: {', '.join(PURPOSES)}") from None
