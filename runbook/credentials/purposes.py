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

Other sections register their own purposes with ``register`` (each its own key, in its own directory):

    haproxy-client    balancer  client         haproxy            no   root      CA  HAProxy's REST API checks
    pgbouncer-server  postgres  server         <host>             yes  postgres  CA  PgBouncer TLS (6432)
    pgbackrest        postgres, backup, restore  server+client  <host>-pgbackrest  yes  postgres  CA  pgBackRest
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    also: tuple[str, ...] = ()  # further roles whose hosts hold it (pgBackRest: postgres, backup, restore)
    files: tuple[str, str] | None = None  # (certificate, key) file names in tls_dir; None: <name>.crt/.key
    only: Callable[[Any], bool] | None = None  # inventory -> bool: held at all (e.g. only with a backup host)

    def common_name(self, host: str) -> str:
        """The subject CN on *host*: the host's name (cn None), or cn with ``{host}`` filled in."""
        return host if self.cn is None else self.cn.format(host=host)

    def file_names(self, host: str) -> tuple[str, str]:
        """(certificate, key) file names in the purpose's TLS directory on *host*."""
        if self.files is None:
            return f"{self.name}.crt", f"{self.name}.key"
        return self.files[0].format(host=host), self.files[1].format(host=host)

    def roles(self) -> tuple[str, ...]:
        return (self.role, *self.also)


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

# Registered beside the others (so that pki.status, pki.rotate and cluster.audit know them whatever sections
# are imported); each is held only when the inventory turns its service on.
HAPROXY_TLS_DIR = "/etc/haproxy/tls"
PGBACKREST_TLS_DIR = "/etc/pgbackrest/tls"
HAPROXY_CLIENT = register(Purpose("haproxy-client", "balancer", (CLIENT,), "root", cn="haproxy",
                                  service="HAProxy checks of the REST API", tls_dir=HAPROXY_TLS_DIR,
                                  files=("client.pem", "client.pem.key"),
                                  only=lambda inv: inv.cluster.vip is not None))
PGBOUNCER_SERVER = register(Purpose("pgbouncer-server", "postgres", (SERVER,), "postgres", sans=True,
                                    service="PgBouncer (clients' TLS)",
                                    only=lambda inv: inv.cluster.vip is not None))
PGBACKREST = register(Purpose("pgbackrest", "postgres", (SERVER, CLIENT), "postgres", cn="{host}-pgbackrest",
                              sans=True, service="pgBackRest server and client (TLS)", tls_dir=PGBACKREST_TLS_DIR,
                              also=("backup", "restore"), files=("{host}-pgbackrest.crt", "{host}-pgbackrest.key"),
                              only=lambda inv: inv.backup is not None))


def for_role(role: str, inventory: Any = None) -> list[Purpose]:
    """The purposes a host of *role* holds, in registration order; with *inventory*, only those it enables."""
    return [p for p in PURPOSES.values()
            if role in p.roles() and (inventory is None or p.only is None or p.only(inventory))]


def get(name: str) -> Purpose:
    try:
        return PURPOSES[name]
    except KeyError:
        raise ValueError(f"unknown certificate purpose {name!r}; known: {', '.join(PURPOSES)}") from None
