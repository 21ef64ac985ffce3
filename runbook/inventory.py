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
import reprlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

ROLES = ("etcd", "postgres")
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
# Host names the runbook itself uses: a host called `local` would run its steps on this machine.
RESERVED_NAMES = ("local",)
EXAMPLE = "see the repo's hosts.yml for a complete example"


class InventoryError(Exception):
    """hosts.yml (or --hosts) is wrong; the message says where and what to do."""


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: construct_mapping merges it; the explicit keys win
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # an unhashable key: construct_mapping below raises its own clear error
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# -- reading ---------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read ({exc.strerror or exc}); check the path "
                             "(invoke config runbook.inventory / INVOKE_RUNBOOK_INVENTORY)") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InventoryError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
                             "save the file as UTF-8") from None


def _yaml_error(path: Path, exc: yaml.YAMLError) -> InventoryError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f"{path}:{mark.line + 1}: " if mark is not None else f"{path}: "
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "'\\t'" in problem:
        return InventoryError(f"{where}invalid YAML{at}: a tab character; YAML indentation must use spaces, "
                              "not tabs - replace the tabs with spaces")
    if "expected a single document" in f"{problem} {context}":
        return InventoryError(f"{where}invalid YAML{at}: a second document ('---'); an inventory is one "
                              "document - remove the extra '---' and what follows, or merge the two")
    detail = f"{problem} ({context})" if context else problem
    return InventoryError(f"{where}invalid YAML{at}: {detail}; fix the syntax there (indentation, "
                          "unclosed brackets or quotes, a missing ':')")


def _key_repr(node: yaml.Node) -> object:
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else None


def _check_duplicates(path: Path, node: yaml.Node | None) -> None:
    """Refuse duplicate keys anywhere, naming the YAML path (``hosts.etcd02``) and both lines."""
    seen_nodes: set[int] = set()

    def walk(n: yaml.Node | None, where: list[str]) -> None:
        if n is None or id(n) in seen_nodes:  # aliases may share (or even contain) nodes
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[object, int] = {}
            for k, v in n.value:
                key = _key_repr(k)
                if key is not None and k.tag != "tag:yaml.org,2002:merge":
                    if key in first:
                        dotted = ".".join([*where, str(k.value)])
                        raise InventoryError(
                            f"{path}:{k.start_mark.line + 1}: {dotted}: duplicate key {k.value!r} (first at "
                            f"line {first[key]}); YAML would silently keep only the last one - delete one "
                            "of them or rename it")
                    first[key] = k.start_mark.line + 1
                walk(v, [*where, str(k.value) if isinstance(k, yaml.ScalarNode) else "?"])
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, [*where, str(i)])

    walk(node, [])


def _parse(path: Path) -> tuple[object, yaml.Node | None]:
    """(data, node tree): the tree maps a YAML path back to its line for error messages."""
    text = _read_text(path)
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        _check_duplicates(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    finally:
        loader.dispose()
    return data, node


def load_yaml(path: Path) -> object:
    """Parse YAML with duplicate keys refused; errors name the file and line (an empty file is None)."""
    return _parse(Path(path))[0]


# -- schema ----------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,63}$")
    namespace: str = Field(default="/patroni", pattern=r"^/[A-Za-z0-9_/-]*$")
    postgres_major: int = Field(default=15, ge=12, le=18)
    etcd_version: str = Field(default="3.5.16", pattern=r"^\d+\.\d+\.\d+$")
    domain: str = ""
    os: Literal["debian12", "rhel8", "rhel9"] = "debian12"


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
    roles: list[Literal["etcd", "postgres"]] = Field(min_length=1)
    fqdn: str | None = Field(default=None, pattern=FQDN_PATTERN)
    user: str | None = Field(default=None, pattern=USER_PATTERN)
    port: int | None = Field(default=None, ge=1, le=65535)

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
                elif len(n.split()) > 1:
                    hints.append(f"{n!r}: separate host names with commas, not spaces")
                elif dym := _did_you_mean(n, known):
                    hints.append(f"{n!r}: {dym.strip()}")
            raise InventoryError(f"--hosts: unknown host(s) {', '.join(unknown)} in {self.path}; "
                                 + (f"{'; '.join(hints)}; " if hints else "")
                                 + f"known: {', '.join(known)}")
        return [h for h in self.hosts if h.name in pieces]

    @property
    def etcd(self) -> list[Host]:
        return self.role("etcd")

    @property
    def postgres(self) -> list[Host]:
        return self.role("postgres")


# -- error messages --------------------------------------------------------------------------------

def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "[key]") or "(top level)"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose keys are allowed at this YAML path (for 'unknown key' and 'expected a mapping')."""
    if loc == ():
        return InventoryFile
    if loc == ("cluster",):
        return ClusterSpec
    if loc == ("ssh",):
        return SshSpec
    if len(loc) == 2 and loc[0] == "hosts":
        return HostSpec
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 3, 3, 60, 40


def _show(value: object) -> str:
    """A short repr: YAML aliases can build huge (shared) structures that a full repr would expand."""
    return _REPR.repr(value)


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    kind = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)
    return f"{kind} {_show(value)}"


RANGE_HINTS = {
    "port": "use a TCP port 1-65535",
    "postgres_major": "use a PostgreSQL major version 12-18",
    "connect_timeout": "use seconds, more than 0 and at most 120",
}

PATTERN_HINTS = {
    ("cluster", "name"): "is not a valid cluster name; use 1-63 letters, digits, '_' or '-' (no spaces or "
                         "dots): it is the Patroni scope and names the ledger state/<name>.db",
    ("cluster", "namespace"): "is not a valid namespace; it must start with '/' and hold only letters, "
                              "digits, '_', '-' and '/', e.g. /patroni",
    ("cluster", "etcd_version"): "is not an etcd release version; write X.Y.Z, e.g. 3.5.16",
    ("ssh", "user"): "is not a valid user name; use lowercase letters, digits, '_' and '-', e.g. runbook",
    ("user",): "is not a valid user name; use lowercase letters, digits, '_' and '-', e.g. runbook",
    ("fqdn",): "is not a DNS name; write labels of letters, digits and '-' separated by dots, "
               "e.g. etcd01.example.org",
}

MISSING_HINTS = {
    ("cluster",): "add a cluster: section with at least name: (the Patroni scope), e.g. "
                  "cluster: {name: patroni_cluster}",
    ("hosts",): "add a hosts: mapping of host name -> {address: ..., roles: [...]}, with an odd number "
                ">= 3 of etcd hosts and >= 2 postgres hosts",
    ("cluster", "name"): "add name: (the Patroni scope, letters, digits, '_' or '-'), "
                         "e.g. name: patroni_cluster",
    ("address",): "add address: with the host's IPv4 address",
    ("roles",): "add roles: with etcd and/or postgres, e.g. roles: [etcd]",
}


def _host_name_message(key: object) -> str:
    if not isinstance(key, str):
        return (f"host name {key!r} is not text; host names are lowercase words like etcd01 "
                "(quote it if needed)")
    suggestion = re.sub(r"[^a-z0-9-]", "-", key.strip().lower()).strip("-")
    eg = suggestion if re.match(NAME_PATTERN, suggestion) else "etcd01"
    return (f"{key!r} is not a valid host name; use lowercase letters, digits and '-', starting with a "
            f"letter, at most 63 characters (e.g. {eg})")


def _message(err: dict) -> str:
    """pydantic's error -> what is wrong, in the inventory's own words, and what to do."""
    loc, typ, value = tuple(err["loc"]), err["type"], err.get("input")
    last = loc[-1] if loc else ""
    ctx = err.get("ctx") or {}
    if loc and loc[-1] == "[key]":
        return _host_name_message(loc[-2])
    if typ == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = _keys(model) if model else []
        return (f"unknown key {last!r}; {_did_you_mean(str(last), allowed)}"
                + (f"allowed here: {', '.join(allowed)}" if allowed else "remove it"))
    if typ == "missing":
        hint = MISSING_HINTS.get(loc) or MISSING_HINTS.get((last,)) or EXAMPLE
        return f"required key {last!r} is missing; {hint}"
    if typ == "literal_error":
        if len(loc) == 4 and loc[0] == "hosts" and loc[2] == "roles":
            return f"{_show(value)} is not a role; use etcd or postgres"
        what = "a supported OS" if loc == ("cluster", "os") else "allowed here"
        return f"{_show(value)} is not {what}; use {ctx.get('expected', 'one of the documented values')}"
    if typ == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(loc) or PATTERN_HINTS.get((last,)) or f"must match {ctx.get('pattern')}"
        return f"{_show(value)} {hint}"
    if typ in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{_show(value)} is out of range; {RANGE_HINTS.get(str(last), err['msg'].lower())}"
    if typ in ("int_parsing", "int_type", "int_from_float"):
        hint = RANGE_HINTS.get(str(last), "write digits only")
        return f"expected a whole number, got {_describe(value)}; {hint}"
    if typ in ("float_parsing", "float_type"):
        return f"expected a number, got {_describe(value)}; {RANGE_HINTS.get(str(last), 'write digits only')}"
    if typ in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_describe(value)}"
    if typ == "string_type":
        if last == "address":
            return (f"expected an IPv4 address, got {_describe(value)}; write four numbers 0-255 "
                    "separated by dots, e.g. 192.0.2.10")
        return f"expected text, got {_describe(value)}; quote the value"
    if typ in ("dict_type", "model_type", "model_attributes_type"):
        if loc == ("hosts",):
            return (f"expected a mapping of host name -> {{address: ..., roles: [...]}}, got "
                    f"{_describe(value)}; write one 'name: {{address: ..., roles: [...]}}' line per host")
        model = _model_at(loc)
        keys = f" with keys {', '.join(_keys(model))}" if model else ""
        if model is HostSpec and value is None:
            return f"host {last!r} has no settings; give it {{address: <IPv4>, roles: [etcd or postgres]}}"
        return f"expected a mapping{keys}, got {_describe(value)}; write it as 'key: value' lines"
    if typ == "list_type":
        if last == "roles":
            return f"expected a list of roles, got {_describe(value)}; write e.g. roles: [etcd]"
        return f"expected a list, got {_describe(value)}; write it as [a, b]"
    if typ == "too_short":
        if loc == ("hosts",):
            return ("no hosts; list an odd number >= 3 of etcd hosts and >= 2 postgres hosts, "
                    "e.g. etcd01: {address: 192.0.2.11, roles: [etcd]}")
        if last == "roles":
            return "no roles; give at least one of etcd, postgres, e.g. roles: [etcd]"
        return f"must not be empty; {EXAMPLE}"
    if typ == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return f"{err['msg']}; {EXAMPLE}"


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The line of the deepest node found along a YAML path (for `file:line:` prefixes); None at the top."""
    if not loc:
        return root.start_mark.line + 1 if root is not None else None
    node, line = root, None
    for part in loc:
        if part == "[key]":
            break
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt, line = v, k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _semantic_errors(spec: InventoryFile) -> list[tuple[tuple, str]]:
    """What the schema alone cannot see: reserved names, repeated roles, shared addresses, quorum."""
    errs: list[tuple[tuple, str]] = []
    for name, h in spec.hosts.items():
        if name in RESERVED_NAMES:
            errs.append((("hosts", name, "[key]"), (f"{name!r} is reserved (the runbook's name for this "
                                                    "machine); rename the host, e.g. node03")))
        dup = sorted({r for r in h.roles if h.roles.count(r) > 1})
        if dup:
            errs.append((("hosts", name, "roles"), f"{', '.join(dup)} listed twice; list each role once"))
    for field in ("address", "fqdn"):
        seen: dict[str, str] = {}
        for name, h in spec.hosts.items():
            value = getattr(h, field)
            if value is None:
                continue
            if value.lower() in seen:
                other = seen[value.lower()]
                errs.append((("hosts", name, field),
                             f"{value} is also the {field} of {other}; give every host its own {field}"))
            else:
                seen[value.lower()] = name
    etcd = [n for n, h in spec.hosts.items() if "etcd" in h.roles]
    pg = [n for n, h in spec.hosts.items() if "postgres" in h.roles]
    if len(etcd) < 3 or len(etcd) % 2 == 0:
        fix = (f"use {len(etcd) - 1} or {len(etcd) + 1} (an even count tolerates no more failures than "
               "one less)" if len(etcd) >= 4 else "give 3 (or 5) hosts roles: [etcd]")
        errs.append((("hosts",), (f"{len(etcd)} etcd host(s) ({', '.join(etcd) or 'none'}); etcd needs an "
                                  f"odd number >= 3 for quorum: {fix}")))
    if len(pg) < 2:
        errs.append((("hosts",), (f"{len(pg)} postgres host(s) ({', '.join(pg) or 'none'}); Patroni needs "
                                  ">= 2 (a leader and a standby): add a host with roles: [postgres]")))
    return errs


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate hosts.yml; raise InventoryError naming file, line, YAML path and what to do."""
    path = Path(path).resolve()
    data, root = _parse(path)

    def line(loc: tuple, msg: str) -> str:
        n = _line_of(root, loc)
        return f"{path}{f':{n}' if n else ''}: {_loc(loc)}: {msg}"

    if data is None:
        raise InventoryError(f"{path}: the file is empty (or only comments); an inventory needs cluster: "
                             f"(name), hosts: (name -> address, roles) and optionally ssh:; {EXAMPLE}")
    if not isinstance(data, dict):
        raise InventoryError(line((), f"expected a mapping with keys cluster, ssh and hosts, got "
                                      f"{_describe(data)}; {EXAMPLE}"))
    try:
        spec = InventoryFile.model_validate(data)
    except ValidationError as exc:
        # Unknown keys first: a typo ('adress') usually explains the missing key that follows.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise InventoryError("\n".join(line(tuple(e["loc"]), _message(e)) for e in errors)) from None
    problems = _semantic_errors(spec)
    if problems:
        raise InventoryError("\n".join(line(loc, msg) for loc, msg in problems))
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
