"""Human messages for schema errors of hosts.yml: pydantic's error records -> one line each."""
from __future__ import annotations

import re
import reprlib

import yaml
from pydantic import BaseModel

from runbook.inventory.distros import DISTROS
from runbook.inventory.model import (
    EXAMPLE,
    NAME_PATTERN,
    RESERVED_NAMES,
    ClusterSpec,
    HostSpec,
    InventoryFile,
    PortsSpec,
    SshSpec,
    _did_you_mean,
)

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
    if loc == ("cluster", "ports"):
        return PortsSpec
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
    "rw": "use a TCP port 1-65535 (default 5000)",
    "ro": "use a TCP port 1-65535 (default 5001)",
    "pgbouncer": "use a TCP port 1-65535 (default 6432)",
    "vip_prefix": "use a prefix length 8-30 (the balancer hosts' subnet, default 24)",
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
            return f"{_show(value)} is not a role; use etcd, postgres, balancer, backup or restore"
        what = "a supported OS" if loc[-1] == "os" else "allowed here"
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
    live = {n: h for n, h in spec.hosts.items() if not h.retired}  # a retired host's address may be reused
    for field in ("address", "fqdn"):
        seen: dict[str, str] = {}
        for name, h in live.items():
            value = getattr(h, field)
            if value is None:
                continue
            if value.lower() in seen:
                other = seen[value.lower()]
                errs.append((("hosts", name, field),
                             f"{value} is also the {field} of {other}; give every host its own {field}"))
            else:
                seen[value.lower()] = name
    errs += _mixed_os_errors(spec)
    etcd = [n for n, h in live.items() if "etcd" in h.roles]
    pg = [n for n, h in live.items() if "postgres" in h.roles]
    if len(etcd) < 3 or len(etcd) % 2 == 0:
        fix = (f"use {len(etcd) - 1} or {len(etcd) + 1} (an even count tolerates no more failures than "
               "one less)" if len(etcd) >= 4 else "give 3 (or 5) hosts roles: [etcd]")
        errs.append((("hosts",), (f"{len(etcd)} etcd host(s) ({', '.join(etcd) or 'none'}); etcd needs an "
                                  f"odd number >= 3 for quorum: {fix}")))
    backup = [n for n, h in spec.hosts.items() if "backup" in h.roles]
    if len(backup) > 1:
        errs.append((("hosts",), f"{len(backup)} backup hosts ({', '.join(backup)}); pgBackRest uses one "
                                 "repository host: keep roles: [backup] on one of them"))
    for name, h in spec.hosts.items():
        if len({"postgres", "backup", "restore"} & set(h.roles)) > 1:
            errs.append((("hosts", name, "roles"), f"{', '.join(h.roles)}: a backup (repository) or restore "
                                                   "host is a host of its own, not a cluster member; keep one "
                                                   "of postgres, backup, restore on it"))
    if len(pg) < 2:
        errs.append((("hosts",), (f"{len(pg)} postgres host(s) ({', '.join(pg) or 'none'}); Patroni needs "
                                  ">= 2 (a leader and a standby): add a host with roles: [postgres]")))
    errs += _vip_errors(spec)
    return errs


def _vip_errors(spec: InventoryFile) -> list[tuple[tuple, str]]:
    """The front door: a balancer host needs a vip; the vip lies in every balancer host's subnet and is no
    host's address (nor the subnet's network or broadcast address)."""
    import ipaddress

    c = spec.cluster
    explicit = [n for n, h in spec.hosts.items() if "balancer" in h.roles]
    if c.vip is None:
        return [(("hosts", n, "roles"), "the balancer role needs a floating address: add cluster.vip (a free "
                                        "address of this host's subnet), or drop the role") for n in explicit]
    errs: list[tuple[tuple, str]] = []
    vip = ipaddress.ip_address(c.vip)
    names = explicit or [n for n, h in spec.hosts.items() if "postgres" in h.roles]
    for n, h in spec.hosts.items():
        if h.address == c.vip:
            errs.append((("cluster", "vip"), f"{c.vip} is the address of host {n}; the VIP must be a free "
                                             "address that only keepalived assigns"))
    for n in names:
        net = ipaddress.ip_network(f"{spec.hosts[n].address}/{c.vip_prefix}", strict=False)
        if vip not in net:
            errs.append((("cluster", "vip"), f"{c.vip} is not in {net}, the subnet of balancer host {n} "
                                             f"({spec.hosts[n].address}); VRRP moves the VIP between hosts "
                                             f"of one subnet: pick a free address in {net} (or set "
                                             "cluster.vip_prefix)"))
            break
        if vip in (net.network_address, net.broadcast_address):
            errs.append((("cluster", "vip"), f"{c.vip} is the network or broadcast address of {net}; pick a "
                                             "free host address in it"))
            break
    return errs



def _mixed_os_errors(spec: InventoryFile) -> list[tuple[tuple, str]]:
    """A host on another distribution than the cluster's: its PostgreSQL must be the cluster's major."""
    major = spec.cluster.postgres_major
    errs: list[tuple[tuple, str]] = []
    if spec.cluster.postgres_apt is not None:  # the extra source serves each distribution's suite
        return errs
    for name, h in spec.hosts.items():
        if h.os is None or h.os == spec.cluster.os or "postgres" not in h.roles:
            continue
        d = DISTROS[h.os]
        if major not in d.postgres_majors:
            errs.append((("hosts", name, "os"),
                         f"{h.os} ships PostgreSQL {', '.join(map(str, d.postgres_majors))}, not "
                         f"cluster.postgres_major {major} ({spec.cluster.os}): the PostgreSQL hosts of one "
                         "cluster must all run the same major; keep this host on "
                         f"{spec.cluster.os} until the cluster is on {h.os}, or set cluster.os: {h.os} and "
                         "move every PostgreSQL host together"))
    return errs
