"""Jinja2 rendering of templates/ and the context builders for etcd and Patroni hosts.

Templates are strict (an undefined variable is an error, never an empty string). A context
builder returns a plain dict; one dict serves every template of its component:

    etcd_context    -> etcd/etcd.conf.yml.j2, systemd/etcd.service.j2, etcd/ectl.sh.j2
    patroni_context -> patroni/config.yml.j2, systemd/patroni.service.j2,
                       patroni/profile.sh.j2, patroni/post_bootstrap.sh.j2
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from runbook.inventory import Host, Inventory
from runbook.inventory.distros import DEFAULT_OS, Distro, distro

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
MEMBER_PREFIX = "patroni_"  # the walk-through's member names: patroni_node01, patroni_node02
_SAFE_PASSWORD = re.compile(r"^[A-Za-z0-9_-]{16,}$")
_SAFE_USER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Paths:
    """Where things live on the hosts; defaults are the walk-through's.

    The one place for what depends on the PostgreSQL major or the distribution (``os``, see
    runbook.inventory.distros): binaries, PGDATA, the distribution's default cluster and its service,
    python3 and its venv module. ``Paths.of(host, major)`` is a host's; ``Ctx.paths`` the cluster's."""

    etcd_bin_dir: str = "/usr/bin"
    etcd_conf: str = "/etc/etcd/etcd.conf.yml"
    etcd_data_dir: str = "/var/lib/etcd/default"
    # The walk-through used /etc/default/etcd/.tls, but /etc/default/etcd is conventionally a file.
    etcd_tls_dir: str = "/etc/etcd/tls"
    etcd_unit: str = "/etc/systemd/system/etcd.service"
    ectl: str = "/usr/local/bin/ectl"
    patroni_venv: str = "/opt/patroni"
    patroni_tls_dir: str = "/opt/patroni/.tls"
    patroni_conf: str = "/etc/patroni/config.yml"
    patroni_unit: str = "/etc/systemd/system/patroni.service"
    patroni_profile: str = "/etc/profile.d/patroni.sh"
    post_bootstrap: str = "/etc/patroni/post_bootstrap.sh"
    pgdata_fmt: str = "/data/{major}"
    pg_bin_dir_fmt: str = "/usr/lib/postgresql/{major}/bin"
    log_dir: str = "/data/log"
    patroni_log_dir: str = "/data/log/patroni"
    pgpass: str = "/home/postgres/.pgpass_patroni"
    socket_dir: str = "/var/run/postgresql"
    pg_major: int | None = None  # default for pgdata()/pg_bin_dir() called without a major
    os: str = DEFAULT_OS  # the host's distribution (runbook.inventory.distros)
    python3: str = "python3"  # the distribution's python3 (on PATH): the venv is made with it

    @classmethod
    def of(cls, host: Host, major: int) -> "Paths":
        """The paths of *host* (its own distribution) for PostgreSQL *major*."""
        return cls(pg_major=major, os=host.os)

    @property
    def distro(self) -> Distro:
        return distro(self.os)

    @property
    def venv_package(self) -> str:
        """The package that brings python3's venv module (and ensurepip): not in a bare install."""
        return "python3-venv"

    @property
    def python_tag(self) -> str:
        """The wheel tag of the host's python3 (cp311 on Debian 12, cp313 on Debian 13)."""
        return self.distro.cpython

    def pg_package(self, major: int | None = None) -> str:
        """The distribution's server package: postgresql-<major>."""
        return f"postgresql-{self._major(major)}"

    def default_cluster(self, major: int | None = None) -> str:
        """The cluster the package's postinst creates: '<major> main' (as pg_lsclusters -h prints it)."""
        return f"{self._major(major)} main"

    def default_service(self, major: int | None = None) -> str:
        """The distribution's unit for its default cluster: postgresql@<major>-main."""
        return f"postgresql@{self._major(major)}-main"

    def _major(self, major: int | None) -> int:
        m = self.pg_major if major is None else major
        if m is None:
            raise ValueError("PostgreSQL major unknown: pass it, or build Paths(pg_major=...)")
        return m

    def pgdata(self, major: int | None = None) -> str:
        """PGDATA (and Patroni's config_dir): /data/<major>."""
        return self.pgdata_fmt.format(major=self._major(major))

    def pg_bin_dir(self, major: int | None = None) -> str:
        """Debian's PostgreSQL binaries: /usr/lib/postgresql/<major>/bin."""
        return self.pg_bin_dir_fmt.format(major=self._major(major))


def _yaml_str(value: object) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML): safe for any password/path."""
    return json.dumps(str(value))


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        # compiled templates kept between runs (per user, 0700, keyed by the source's checksum): compiling
        # them costs more than the rest of a no-op cluster.up
        bytecode_cache=jinja2.FileSystemBytecodeCache(),
    )
    env.filters["q"] = _yaml_str
    return env


def render(name: str, /, **ctx: Any) -> str:
    """Render templates/<name> with *ctx*; an undefined variable raises jinja2.UndefinedError."""
    return environment().get_template(name).render(**ctx)


def template_names() -> list[str]:
    return sorted(environment().list_templates(extensions=["j2"]))


def member_name(host: Host) -> str:
    """The Patroni member name of *host* (``patroni_node01``, as in the walk-through)."""
    return f"{MEMBER_PREFIX}{host.name}"


def _require(host: Host, role: str) -> None:
    if not host.has(role):
        raise ValueError(f"host {host.name} has no {role!r} role (roles: {', '.join(host.roles)})")


# --------------------------------------------------------------------------- etcd

def etcd_context(inv: Inventory, host: Host, paths: Paths = Paths(), *,
                 initial_cluster_state: str = "new", cluster_token: str = "etcd_scope",
                 election_timeout: int = 5000, heartbeat_interval: int = 500) -> dict[str, Any]:
    """Context for the etcd config, unit and ectl wrapper of *host*.

    initial_cluster_state is 'new' for the first start of a fresh cluster and 'existing'
    afterwards (the walk-through's /etc/default/etcd edit is ignored with --config-file).
    """
    _require(host, "etcd")
    if initial_cluster_state not in ("new", "existing"):
        raise ValueError(f"initial_cluster_state must be 'new' or 'existing', not {initial_cluster_state!r}")
    tls = paths.etcd_tls_dir
    members = inv.etcd
    return {
        "name": host.name,
        "address": host.address,
        "data_dir": paths.etcd_data_dir,
        "listen_peer_urls": "https://0.0.0.0:2380",
        "listen_client_urls": "https://0.0.0.0:2379",
        "advertise_client_urls": f"https://{host.name}:2379",
        "initial_advertise_peer_urls": f"https://{host.name}:2380",
        "initial_cluster_token": cluster_token,
        "initial_cluster": ",".join(f"{m.name}=https://{m.name}:2380" for m in members),
        "initial_cluster_state": initial_cluster_state,
        "election_timeout": election_timeout,
        "heartbeat_interval": heartbeat_interval,
        # etcd keeps every revision unless told otherwise (retention 0 = off) until NOSPACE stops writes
        "auto_compaction_mode": "periodic",
        "auto_compaction_retention": inv.cluster.etcd_auto_compaction_retention,
        "quota_backend_bytes": inv.cluster.etcd_quota_backend_bytes,
        # one certificate per purpose (runbook.credentials.purposes): client API, raft peers, etcdctl as root
        "cert_file": f"{tls}/etcd-server.crt",
        "key_file": f"{tls}/etcd-server.key",
        "trusted_ca_file": f"{tls}/ca.crt",
        "peer_cert_file": f"{tls}/etcd-peer.crt",
        "peer_key_file": f"{tls}/etcd-peer.key",
        "peer_trusted_ca_file": f"{tls}/peer-ca.crt",
        "ctl_cert_file": f"{tls}/etcd-root.crt",
        "ctl_key_file": f"{tls}/etcd-root.key",
        "endpoints": ",".join(f"https://{m.name}:2379" for m in members),
        "etcd_bin_dir": paths.etcd_bin_dir,
        "etcd_conf": paths.etcd_conf,
        "etcd_user": "etcd",
        "paths": asdict(paths),
    }


# --------------------------------------------------------------------------- Patroni

def client_networks(inv: Inventory) -> list[str]:
    """The cluster's client networks: every /24 holding an inventory host (192.168.60.0/24)."""
    nets = {ipaddress.ip_network(f"{h.address}/24", strict=False) for h in inv.hosts}
    return [str(n) for n in sorted(nets)]


def pg_hba(inv: Inventory, replication_user: str, networks: list[str] | None = None,
           superuser: str = "postgres") -> list[str]:
    """The fixed pg_hba: peer locally, hostssl + scram-sha-256 only, everything non-TLS rejected.

    The superuser logs in over TCP only from localhost and the PostgreSQL hosts themselves; its reject
    line comes before the client networks' line (pg_hba: the first matching line decides). With the front
    door (cluster.vip), PgBouncer logs in on the local socket with its clients' SCRAM keys: the socket then
    asks every role but the superuser (still peer) for scram-sha-256."""
    nets = client_networks(inv) if networks is None else networks
    for n in nets:
        ipaddress.ip_network(n)  # raises ValueError on garbage
    local = (["local all all peer"] if inv.cluster.vip is None
             else [f"local all {superuser} peer", "local all all scram-sha-256"])
    rules = [
        *local,
        "hostnossl all all 0.0.0.0/0 reject",
        "hostnossl replication all 0.0.0.0/0 reject",
        f"hostssl replication {replication_user} 127.0.0.1/32 scram-sha-256",
    ]
    rules += [f"hostssl replication {replication_user} {h.address}/32 scram-sha-256" for h in inv.postgres]
    rules.append(f"hostssl all {superuser} 127.0.0.1/32 scram-sha-256")
    rules += [f"hostssl all {superuser} {h.address}/32 scram-sha-256" for h in inv.postgres]
    rules.append(f"hostssl all {superuser} 0.0.0.0/0 reject")
    rules.append("hostssl all all 127.0.0.1/32 scram-sha-256")
    rules += [f"hostssl all all {n} scram-sha-256" for n in nets]
    return rules


def _check_secrets(secrets: dict[str, dict[str, str]]) -> None:
    for role in ("superuser", "replication", "rewind", "admin", "restapi", "etcd"):
        entry = secrets.get(role)
        if not isinstance(entry, dict) or not entry.get("username") or not entry.get("password"):
            raise ValueError(f"secrets: {role} needs a username and a password (see runbook.secrets)")
        if not _SAFE_USER.match(entry["username"]):
            raise ValueError(f"secrets: {role} username {entry['username']!r} must match {_SAFE_USER.pattern}")
        if not _SAFE_PASSWORD.match(entry["password"]):
            raise ValueError(f"secrets: {role} password must be >= 16 chars of [A-Za-z0-9_-] "
                             "(it is embedded in SQL and YAML)")


def patroni_context(inv: Inventory, host: Host, secrets: dict[str, dict[str, str]],
                    paths: Paths = Paths(), *, networks: list[str] | None = None,
                    post_bootstrap: bool = True) -> dict[str, Any]:
    """Context for the Patroni config, unit, profile and post_bootstrap script of *host*.

    *secrets* is the dict from runbook.secrets.ensure_secrets(). The rendered config holds
    passwords: write it 0600 owned by postgres. bootstrap.dcs is the inventory's dynamic configuration
    (runbook.cluster.dynamic.desired_dynamic): it only seeds a new cluster; patroni.dynamic keeps the DCS in line.
    """
    from runbook.cluster.dynamic import bootstrap_dcs  # dynamic builds commands from the Ctx (paths): import late

    _require(host, "postgres")
    _check_secrets(secrets)
    major = inv.cluster.postgres_major
    if paths.pg_major is not None and paths.pg_major != major:
        raise ValueError(f"Paths.pg_major={paths.pg_major} but the inventory says postgres_major={major}")
    tls = paths.patroni_tls_dir
    bin_dir = paths.pg_bin_dir(major)
    return {
        "scope": inv.cluster.name,
        "namespace": inv.cluster.namespace,
        "name": member_name(host),
        "host": host.name,
        "address": host.address,
        "major": major,
        "log_level": "INFO",
        "patroni_log_dir": paths.patroni_log_dir,
        "log_dir": paths.log_dir,
        "restapi_listen": "0.0.0.0:8008",
        "restapi_connect_address": f"{host.name}:8008",
        "ca_file": f"{tls}/ca.crt",
        # one certificate per purpose (runbook.credentials.purposes)
        "rest_cert_file": f"{tls}/rest-server.crt",
        "rest_key_file": f"{tls}/rest-server.key",
        "ctl_cert_file": f"{tls}/rest-client.crt",
        "ctl_key_file": f"{tls}/rest-client.key",
        "etcd_cert_file": f"{tls}/etcd-client.crt",
        "etcd_key_file": f"{tls}/etcd-client.key",
        "pg_cert_file": f"{tls}/pg-server.crt",
        "pg_key_file": f"{tls}/pg-server.key",
        "etcd_hosts": [f"{m.name}:2379" for m in inv.etcd],
        "dcs": bootstrap_dcs(inv, paths.log_dir),
        "permanent_slots": {n: slot.reason for n, slot in inv.cluster.permanent_slots.items()},
        "max_slot_wal_keep_size": inv.cluster.max_slot_wal_keep_size,
        "pg_hba": pg_hba(inv, secrets["replication"]["username"], networks, secrets["superuser"]["username"]),
        "pg_listen": "0.0.0.0:5432",
        "pg_connect_address": f"{host.address}:5432",
        "data_dir": paths.pgdata(major),
        "bin_dir": bin_dir,
        "pg_config": f"{bin_dir}/pg_config",
        "pgpass": paths.pgpass,
        "socket_dir": paths.socket_dir,
        "secrets": secrets,
        "post_bootstrap": paths.post_bootstrap if post_bootstrap else None,
        "venv": paths.patroni_venv,
        "patroni_conf": paths.patroni_conf,
        # with a backup host, a new replica is restored from the pgBackRest repository first (then catches
        # up by streaming); pg_basebackup from the leader stays the fallback
        "pgbackrest_stanza": inv.cluster.name if inv.backup is not None else None,
        "paths": asdict(paths),
    }
