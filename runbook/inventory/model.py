"""hosts.yml: loaded, validated and resolved before anything connects.

Every problem is one `InventoryError` whose message names the file, the YAML path (``hosts.etcd02.address``)
and what to do; nothing here opens a socket. Each problem is one line, compiler style::

    /path/hosts.yml:7: hosts.etcd02.address: '192.168.60.300' is not an IPv4 address; write four ...

All problems of a file are reported at once (schema first; the topology only once the schema is right).
"""
from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runbook.errors import InventoryError
from runbook.inventory.apt_source import PostgresAptSpec
from runbook.inventory.distros import DEFAULT_OS, DISTROS, UNSUPPORTED, distro, major_choices

ROLES = ("etcd", "postgres", "balancer", "backup", "restore")
# balancer: HAProxy + keepalived (the front door); backup: the pgBackRest repository host (optional, at most
# one); restore: a spare host that takes point-in-time restores (PostgreSQL + pgBackRest, never a member)
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
# Host names the runbook itself uses: a host called `local` would run its steps on this machine.
RESERVED_NAMES = ("local",)
EXAMPLE = "see the repo's hosts.yml for a complete example"
OsName = Literal["debian12", "debian13", "rhel8", "rhel9"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")  # PostgreSQL replication slot names
PG_SIZE = re.compile(r"^(-1|0|[1-9][0-9]*(kB|MB|GB|TB))$")  # a size GUC with its unit, or -1 (no limit)
ETCD_RETENTION = re.compile(r"^[1-9][0-9]*(h|m|s)?$")  # etcd's periodic retention: "1h", "30m", "5" (hours)


class SlotSpec(_Strict):
    """A permanent physical slot in the DCS: it retains WAL until its consumer reads it, so it says why."""

    reason: str

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a permanent slot needs a reason (who consumes it, e.g. 'pg_receivewal on "
                             "backup01'): an unused slot retains WAL until the disk is full")
        return v.strip()


# Settings that live in each host's config file (per-host paths, the listener): never in the DCS.
LOCAL_PARAMETERS = ("unix_socket_directories", "ssl_cert_file", "ssl_key_file", "ssl_ca_file", "listen_addresses",
                    "port", "data_directory", "config_file", "hba_file", "ident_file", "cluster_name")
GUC_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


class PatroniSpec(_Strict):
    """Patroni's dynamic (cluster-wide) configuration: seeds bootstrap.dcs of a new cluster and is kept in
    the DCS of a running one by patroni.dynamic (`patronictl edit-config`). Defaults: the walk-through's."""

    ttl: int = Field(default=30, ge=10, le=3600)
    loop_wait: int = Field(default=10, ge=1, le=600)
    retry_timeout: int = Field(default=10, ge=1, le=600)
    maximum_lag_on_failover: int = Field(default=1048576, ge=0)
    synchronous_mode: bool = True
    synchronous_mode_strict: bool = True
    synchronous_node_count: int = Field(default=1, ge=1, le=16)
    # PostgreSQL parameters over the walk-through's (a null removes one from the DCS)
    parameters: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict) -> dict:
        bad = [k for k in v if not GUC_NAME.match(k)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a PostgreSQL parameter name; use lowercase "
                             "letters, digits and '_', e.g. work_mem")
        local = [k for k in v if k in LOCAL_PARAMETERS]
        if local:
            raise ValueError(f"{', '.join(local)}: a per-host setting, not a cluster-wide one; the runbook "
                             "sets it in each host's config file (templates/patroni/config.yml.j2)")
        if "max_slot_wal_keep_size" in v:
            raise ValueError("max_slot_wal_keep_size: set it as cluster.max_slot_wal_keep_size, not here")
        return v

    @model_validator(mode="after")
    def _timing(self) -> "PatroniSpec":
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(f"loop_wait + 2 x retry_timeout ({self.loop_wait} + 2 x {self.retry_timeout}) "
                             f"exceeds ttl ({self.ttl}): Patroni would lose the leader key while retrying; "
                             "raise ttl or lower the others (defaults 30/10/10)")
        if self.synchronous_mode_strict and not self.synchronous_mode:
            raise ValueError("synchronous_mode_strict: true needs synchronous_mode: true; turn both off, or "
                             "synchronous_mode on")
        return self


class PortsSpec(_Strict):
    """The front door's TCP ports: HAProxy's listeners on the balancer hosts and PgBouncer's on the PostgreSQL hosts."""

    rw: int = Field(default=5000, ge=1, le=65535)  # HAProxy -> the primary's PgBouncer
    ro: int = Field(default=5001, ge=1, le=65535)  # HAProxy -> a replica's PgBouncer
    pgbouncer: int = Field(default=6432, ge=1, le=65535)

    @model_validator(mode="after")
    def _distinct(self) -> "PortsSpec":
        used = {"rw": self.rw, "ro": self.ro, "pgbouncer": self.pgbouncer}
        reserved = {5432: "PostgreSQL", 8008: "Patroni's REST API", 2379: "etcd", 2380: "etcd peers", 22: "ssh"}
        if len(set(used.values())) != 3:
            raise ValueError(f"rw, ro and pgbouncer must be three different ports (got {used}); e.g. the "
                             "defaults 5000, 5001, 6432")
        taken = [f"{k}: {v} is {reserved[v]}'s port" for k, v in used.items() if v in reserved]
        if taken:
            raise ValueError(f"{'; '.join(taken)}; choose another port (defaults: rw 5000, ro 5001, pgbouncer 6432)")
        return self


CALENDAR = re.compile(r"^[A-Za-z0-9*.,:/ ~-]{1,80}$")  # a systemd OnCalendar expression (checked on the host too)


class BackupSpec(_Strict):
    """pgBackRest settings, used when a host has role backup: full weekly, differential daily, 2 fulls kept."""

    retention_full: int = Field(default=2, ge=1, le=100)
    full_schedule: str = "Sun *-*-* 01:00:00"  # systemd OnCalendar
    diff_schedule: str = "Mon..Sat *-*-* 01:00:00"
    # pg_wal may hold this much WAL not yet archived; past it pgBackRest drops WAL (a dead repository never
    # fills the disk) and says so in the PostgreSQL log; PITR then has a gap until the next full backup
    archive_push_queue_max: str = "4GiB"
    repo_path: str = Field(default="/var/lib/pgbackrest", pattern=r"^/[A-Za-z0-9_./-]+$")
    compress_type: Literal["gz", "lz4", "zst", "bz2", "none"] = "zst"

    @field_validator("full_schedule", "diff_schedule")
    @classmethod
    def _calendar(cls, v: str) -> str:
        if not CALENDAR.match(v.strip()):
            raise ValueError(f"{v!r} is not a systemd calendar expression; write e.g. 'Sun *-*-* 01:00:00' "
                             "(see man systemd.time)")
        return v.strip()

    @field_validator("archive_push_queue_max")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*(KiB|MiB|GiB|TiB|KB|MB|GB|TB)", str(v).strip()):
            raise ValueError(f"{v!r} is not a size; write a number with MiB or GiB, e.g. 4GiB")
        return str(v).strip()


class ClusterSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,63}$")
    namespace: str = Field(default="/patroni", pattern=r"^/[A-Za-z0-9_/-]*$")
    # the hosts' distribution (runbook.inventory.distros); a host may override it (an OS migration)
    os: OsName = DEFAULT_OS
    # an extra apt source for PostgreSQL (before postgres_major: its check reads it)
    postgres_apt: PostgresAptSpec | None = None
    # default: the PostgreSQL of the distribution's own archive (debian12: 15, debian13: 17)
    postgres_major: int = Field(ge=12, le=18)
    etcd_version: str = Field(default="3.5.16", pattern=r"^\d+\.\d+\.\d+$")
    domain: str = ""
    # Opt-in only: name -> {reason: ...}. Patroni keeps each on every member with WAL reserved.
    permanent_slots: dict[str, SlotSpec] = Field(default_factory=dict)
    # The most WAL any slot may hold back (PostgreSQL >= 13); a slot past it is invalidated, not the disk.
    max_slot_wal_keep_size: str = "8GB"
    # etcd: keep 1 h of revisions (compaction off is etcd's default) and an explicit backend quota.
    etcd_auto_compaction_retention: str = "1h"
    etcd_quota_backend_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024**2, le=8 * 1024**3)
    # Patroni's dynamic configuration (ttl, synchronous mode, PostgreSQL parameters): one place for
    # bootstrap.dcs and the running cluster's DCS
    patroni: PatroniSpec = Field(default_factory=PatroniSpec)
    # The front door (HAProxy + keepalived on the balancer hosts, PgBouncer on the PostgreSQL hosts): on when a
    # vip is set. The VIP must lie in the balancer hosts' subnet (vip_prefix) and be no host's address.
    vip: str | None = None
    vip_prefix: int = Field(default=24, ge=8, le=30)
    vip_interface: str = Field(default="eth0", pattern=r"^[A-Za-z0-9_.:-]{1,15}$")  # where keepalived adds it
    ports: PortsSpec = Field(default_factory=PortsSpec)
    # the most a replica may lag (bytes) and still get read-only connections (Patroni's /replica?lag=)
    max_replica_lag: int = Field(default=1048576, ge=0)

    @field_validator("vip")
    @classmethod
    def _vip(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = str(v).strip()
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 address; write the floating address applications connect "
                             "to, e.g. 192.0.2.100 (in the balancer hosts' subnet, no host's own address)") from None
        if ip.version != 4 or ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_reserved:
            raise ValueError(f"{v} cannot be a floating address; use a free IPv4 address of the balancer "
                             "hosts' subnet, e.g. 192.0.2.100")
        return str(ip)
    # pgBackRest (used only when a host has role backup)
    backup: BackupSpec = Field(default_factory=BackupSpec)

    @field_validator("permanent_slots")
    @classmethod
    def _slot_names(cls, v: dict[str, SlotSpec]) -> dict[str, SlotSpec]:
        bad = [n for n in v if not SLOT_NAME.match(n)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a replication slot name; use 1-63 lowercase "
                             "letters, digits and '_', e.g. backup_receiver")
        return v

    @field_validator("max_slot_wal_keep_size", "etcd_auto_compaction_retention", mode="before")
    @classmethod
    def _number_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("max_slot_wal_keep_size")
    @classmethod
    def _wal_size(cls, v: str) -> str:
        if not PG_SIZE.match(str(v).strip()):
            raise ValueError(f"{v!r} is not a PostgreSQL size; write a number with kB, MB, GB or TB, e.g. 8GB "
                             "(-1 means no limit: a lagging slot can then fill the disk)")
        return str(v).strip()

    @field_validator("etcd_auto_compaction_retention")
    @classmethod
    def _retention(cls, v: str) -> str:
        if not ETCD_RETENTION.match(str(v).strip()):
            raise ValueError(f"{v!r} is not an etcd compaction retention; write a duration such as 1h or 30m "
                             "(0 would turn compaction off)")
        return str(v).strip()

    @model_validator(mode="before")
    @classmethod
    def _default_major(cls, data: object) -> object:
        """postgres_major left out: the distribution's own (an unsupported os is reported on its own)."""
        if isinstance(data, dict) and "postgres_major" not in data:
            os_name = data.get("os", DEFAULT_OS)
            if isinstance(os_name, str) and os_name in DISTROS:
                return {**data, "postgres_major": DISTROS[os_name].default_major}
            return {**data, "postgres_major": DISTROS[DEFAULT_OS].default_major}
        return data

    @field_validator("os")
    @classmethod
    def _os_supported(cls, v: str) -> str:
        return _supported_os(v)

    @field_validator("postgres_major")
    @classmethod
    def _major_shipped(cls, v: int, info: ValidationInfo) -> int:
        os_name = info.data.get("os")
        if info.data.get("postgres_apt") is not None:
            return v  # the extra source decides (bundle.build says so when it lacks the major)
        if os_name in DISTROS and v not in DISTROS[os_name].postgres_majors:
            d = DISTROS[os_name]
            others = [o.name for o in DISTROS.values() if v in o.postgres_majors]
            raise ValueError(
                f"PostgreSQL {v} is not shipped by {d.title} ({os_name}); choices: "
                f"{', '.join(map(str, d.postgres_majors))} on {os_name}"
                + (f", or os: {' / '.join(others)} for {v}" if others else "")
                + f" ({major_choices()}); leave postgres_major out for the distribution's own, or name a "
                "mirror of the PostgreSQL project's apt repository as cluster.postgres_apt: {url: URL, key: "
                "KEYFILE} (README: Other PostgreSQL majors)")
        return v


def _supported_os(v: str) -> str:
    if v in UNSUPPORTED:  # bundle.build --os rhel8|rhel9 renders an untested command list, nothing more
        raise ValueError(f"{v!r} is not supported yet: only {' and '.join(DISTROS)} hosts are automated; use "
                         f"os: {' or os: '.join(DISTROS)} (RHEL package steps are not written)")
    distro(v)
    return v


USER_PATTERN = r"^[a-z_][a-z0-9_-]*$"


class SshSpec(_Strict):
    user: str = Field(default="root", pattern=USER_PATTERN)
    port: int = Field(default=22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = True
    connect_timeout: float = Field(default=10, gt=0, le=120)


_HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FQDN_PATTERN = rf"^{_HOSTNAME_LABEL}(\.{_HOSTNAME_LABEL})*\.?$"


class HostSpec(_Strict):
    address: str
    roles: list[Literal["etcd", "postgres", "balancer", "backup", "restore"]] = Field(min_length=1)
    fqdn: str | None = Field(default=None, pattern=FQDN_PATTERN)
    user: str | None = Field(default=None, pattern=USER_PATTERN)
    port: int | None = Field(default=None, ge=1, le=65535)
    # a host that is gone for good (etcd.replace / patroni.replace OLD): kept in the file for the record, left
    # out of every role, step and template (its address may be given to the new host)
    retired: bool = False
    os: OsName | None = None  # this host's distribution, when it is not the cluster's (an OS migration)

    @field_validator("os")
    @classmethod
    def _os_supported(cls, v: str | None) -> str | None:
        return None if v is None else _supported_os(v)

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        v = v.strip()
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            if re.fullmatch(FQDN_PATTERN, v) and re.search(r"[A-Za-z]", v):
                raise ValueError(f"{v!r} is a host name, not an IP address; put the host's IPv4 address here "
                                 "(a DNS name can go in fqdn)") from None
            raise ValueError(f"{v!r} is not an IPv4 address; write four numbers 0-255 separated by dots, "
                             "e.g. 192.0.2.10") from None
        if ip.version == 6:
            raise ValueError(f"{v!r} is an IPv6 address; the runbook (etcd peer URLs, pg_hba, the lab) uses "
                             "IPv4 - put the host's IPv4 address here")
        for bad, what in ((ip.is_unspecified, "the unspecified address"),
                          (ip.is_multicast, "a multicast address"),
                          (ip == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address"),
                          (ip.is_reserved, "a reserved address (240.0.0.0/4)")):
            if bad:
                raise ValueError(f"{v} is {what}, not a host's address; put the host's own IPv4 address here")
        return str(ip)


HostName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class InventoryFile(_Strict):
    cluster: ClusterSpec
    ssh: SshSpec = SshSpec()
    hosts: dict[HostName, HostSpec] = Field(min_length=1)


# -- resolved inventory ----------------------------------------------------------------------------

class Host(BaseModel):
    """A resolved host: what the transport and the steps use."""

    model_config = ConfigDict(frozen=True)
    name: str
    address: str
    roles: tuple[str, ...]
    fqdn: str | None
    user: str
    port: int
    key: Path | None
    known_hosts: Path | None
    sudo: bool
    connect_timeout: float
    os: str = DEFAULT_OS  # resolved: the host's own os:, else the cluster's

    def has(self, role: str) -> bool:
        return role in self.roles


LOCAL = Host(name="local", address="127.0.0.1", roles=("local",), fqdn=None, user="", port=0,
             key=None, known_hosts=None, sudo=False, connect_timeout=1)


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close and word.lower() in choices:
        close = [word.lower()]
    return f"did you mean {close[0]!r}? " if close else ""


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: Path
    cluster: ClusterSpec
    hosts: tuple[Host, ...]
    retired: tuple[str, ...] = ()  # names marked `retired: true`: in the file, nowhere else

    def role(self, role: str) -> list[Host]:
        if role == "local":
            return [LOCAL]
        if role == "all":
            return list(self.hosts)
        return [h for h in self.hosts if role in h.roles]

    def get(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        if name in self.retired:
            raise InventoryError(f"{self.path}: {name} is marked retired: true (gone for good); remove that line "
                                 "to use it again")
        raise InventoryError(f"{self.path}: no host named {name!r}; {_did_you_mean(name, self.names())}"
                             f"known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def select(self, spec: str | None) -> list[Host]:
        """--hosts "a,b": every name must exist and no piece may be empty; None or "" means all hosts."""
        if spec is None or spec == "":
            return list(self.hosts)
        known = self.names()
        pieces = [p.strip() for p in spec.split(",")]
        if not all(pieces):
            raise InventoryError(f"--hosts {spec!r}: an empty host name (a stray comma, or a blank); write "
                                 f"names separated by single commas, e.g. --hosts {','.join(known[:2])} "
                                 f"(hosts of {self.path}: {', '.join(known)})")
        unknown = [n for n in dict.fromkeys(pieces) if n not in known]
        if unknown:
            hints = []
            for n in unknown:
                if n in ROLES or n in ("all", "local"):
                    members = ", ".join(h.name for h in self.role(n)) if n in ROLES else ""
                    hints.append(f"{n!r} is a role, not a host name"
                                 + (f" (its hosts: {members})" if members else ""))
                elif n in self.retired:
                    hints.append(f"{n!r} is marked retired: true")
                elif len(n.split()) > 1:
                    hints.append(f"{n!r}: separate host names with commas, not spaces")
                elif dym := _did_you_mean(n, known):
                    hints.append(f"{n!r}: {dym.strip()}")
            raise InventoryError(f"--hosts: unknown host(s) {', '.join(unknown)} in {self.path}; "
                                 + (f"{'; '.join(hints)}; " if hints else "")
                                 + f"known: {', '.join(known)}")
        return [h for h in self.hosts if h.name in pieces]

    def os_names(self) -> list[str]:
        """The distributions the hosts run, in inventory order (the cluster's first when a host runs it)."""
        return list(dict.fromkeys(h.os for h in self.hosts))

    @property
    def etcd(self) -> list[Host]:
        return self.role("etcd")

    @property
    def postgres(self) -> list[Host]:
        return self.role("postgres")

    @property
    def balancers(self) -> list[Host]:
        """HAProxy + keepalived hosts: the `balancer` role, or the PostgreSQL hosts when no host has it
        (load_inventory gives them the role then, when cluster.vip is set); none without a vip."""
        return self.role("balancer")

    @property
    def backup(self) -> Host | None:
        """The pgBackRest repository host, or None: no backups configured."""
        hosts = self.role("backup")
        return hosts[0] if hosts else None
