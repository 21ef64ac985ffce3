"""hosts.yml: loaded, validated and resolved before anything connects.

Every problem is one `InventoryError` whose message names the file, the YAML
path (``hosts.etcd02.address``) and what to do; nothing here opens a socket.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROLES = ("etcd", "postgres")
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"


class InventoryError(Exception):
    """hosts.yml (or --hosts) is wrong; the message says where and what to do."""


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> object:
    """Parse YAML with duplicate keys refused; errors name the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read ({exc.strerror}); check the path "
                             "(invoke config runbook.inventory / INVOKE_RUNBOOK_INVENTORY)") from exc
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: invalid YAML: {exc}; fix the file") from exc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,63}$")
    namespace: str = Field(default="/patroni", pattern=r"^/[A-Za-z0-9_/-]*$")
    postgres_major: int = Field(default=15, ge=12, le=18)
    etcd_version: str = Field(default="3.5.16", pattern=r"^\d+\.\d+\.\d+$")
    domain: str = ""
    os: Literal["debian12", "rhel8", "rhel9"] = "debian12"


class SshSpec(_Strict):
    user: str = Field(default="root", pattern=r"^[a-z_][a-z0-9_-]*$")
    port: int = Field(default=22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = True
    connect_timeout: float = Field(default=10, gt=0, le=120)


class HostSpec(_Strict):
    address: str
    roles: list[Literal["etcd", "postgres"]] = Field(min_length=1)
    fqdn: str | None = None
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"not an IPv4 address: {v!r}") from None


class InventoryFile(_Strict):
    cluster: ClusterSpec
    ssh: SshSpec = SshSpec()
    hosts: dict[str, HostSpec] = Field(min_length=1)

    @field_validator("hosts")
    @classmethod
    def _names(cls, hosts: dict[str, HostSpec]) -> dict[str, HostSpec]:
        import re

        for name in hosts:
            if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
                raise ValueError(f"host name {name!r} is not a valid hostname (lowercase, digits, '-')")
        return hosts

    @model_validator(mode="after")
    def _topology(self) -> "InventoryFile":
        seen: dict[str, str] = {}
        for name, h in self.hosts.items():
            if h.address in seen:
                raise ValueError(f"hosts.{name}.address: {h.address} is also the address of {seen[h.address]}")
            seen[h.address] = name
        etcd = [n for n, h in self.hosts.items() if "etcd" in h.roles]
        pg = [n for n, h in self.hosts.items() if "postgres" in h.roles]
        if len(etcd) < 3 or len(etcd) % 2 == 0:
            raise ValueError(f"hosts: {len(etcd)} etcd host(s) ({', '.join(etcd) or 'none'}); "
                             "etcd needs an odd number >= 3 for quorum")
        if len(pg) < 2:
            raise ValueError(f"hosts: {len(pg)} postgres host(s); Patroni needs >= 2 for a standby")
        return self


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

    def has(self, role: str) -> bool:
        return role in self.roles


LOCAL = Host(name="local", address="127.0.0.1", roles=("local",), fqdn=None, user="", port=0,
             key=None, known_hosts=None, sudo=False, connect_timeout=1)


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: Path
    cluster: ClusterSpec
    hosts: tuple[Host, ...]

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
        raise InventoryError(f"{self.path}: no host named {name!r}; known: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def select(self, spec: str | None) -> list[Host]:
        """--hosts "a,b": every name must exist; None or empty means all hosts."""
        if not spec:
            return list(self.hosts)
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in self.names()]
        if unknown:
            raise InventoryError(f"--hosts: unknown host(s) {', '.join(unknown)} in {self.path}; "
                                 f"known: {', '.join(self.names())}")
        return [h for h in self.hosts if h.name in names]

    @property
    def etcd(self) -> list[Host]:
        return self.role("etcd")

    @property
    def postgres(self) -> list[Host]:
        return self.role("postgres")


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate hosts.yml; raise InventoryError naming file and YAML path."""
    path = Path(path).resolve()
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: expected a mapping with cluster, ssh and hosts; got {type(data).__name__}")
    try:
        spec = InventoryFile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?); allowed keys are listed in the README"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{path}: {_loc(err)}: {msg}")
        raise InventoryError("\n".join(lines)) from None
    base = path.parent

    def _path(p: str | None) -> Path | None:
        return None if p is None else (base / Path(p).expanduser())

    hosts = tuple(
        Host(name=n, address=h.address, roles=tuple(h.roles), fqdn=h.fqdn, user=h.user or spec.ssh.user,
             port=h.port or spec.ssh.port, key=_path(spec.ssh.key), known_hosts=_path(spec.ssh.known_hosts),
             sudo=spec.ssh.sudo, connect_timeout=spec.ssh.connect_timeout)
        for n, h in spec.hosts.items()
    )
    return Inventory(path=path, cluster=spec.cluster, hosts=hosts)
