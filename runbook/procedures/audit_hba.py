"""cluster.audit's reading of pg_hba, as the live server parses it (pg_hba_file_rules), not as the template says.

A finding for:
- a rule PostgreSQL could not parse (the view's `error` column);
- a weak method: `ident`, `trust`, `password`, `md5` (the runbook only ever writes scram-sha-256, and peer on
  the socket);
- a rule that accepts TCP connections without TLS: `host`, `hostnossl`, `hostgssenc`, `hostnogssenc` with any
  method but `reject` (only `hostssl` may accept);
- a reject that an earlier accepting rule defeats. pg_hba stops at the first rule that matches, so a reject
  must come before every accepting rule that matches the same connections. The one accepted exception is an
  accepting rule wholly inside the reject (same or narrower connection type, databases, users and addresses:
  `hostssl all postgres 127.0.0.1/32 scram-sha-256` before `hostssl all postgres 0.0.0.0/0 reject` lets the
  superuser in from localhost only); an accepting rule that reaches beyond the reject
  (`host all all 0.0.0.0/0 scram-sha-256` before `hostnossl all all 0.0.0.0/0 reject`) is a finding;
- no `hostnossl ... reject` at all.

Rows come from HBA_SQL as `line|type|databases|users|address|netmask|method|error`. Pure: unit-tested on
hand-written rows; the e2e test plants each bad rule on a lab host.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

WEAK_METHODS = ("ident", "trust", "password", "md5")
HBA_SQL = ("select line_number, type, array_to_string(database, ','), array_to_string(user_name, ','), "
           "coalesce(address, ''), coalesce(netmask, ''), coalesce(auth_method, ''), coalesce(error, '') "
           "from pg_hba_file_rules order by line_number")
# which connections each rule type matches: the unix socket, TCP with TLS, TCP in clear, TCP with GSS encryption
_TRANSPORTS = {"local": {"local"}, "host": {"ssl", "plain", "gss"}, "hostssl": {"ssl"},
               "hostnossl": {"plain", "gss"}, "hostgssenc": {"gss"}, "hostnogssenc": {"ssl", "plain"}}
_UNKNOWN_DB = ("sameuser", "samerole", "samegroup")  # some ordinary database, which depends on the user
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HbaRule:
    line: int
    type: str
    databases: tuple[str, ...]
    users: tuple[str, ...]
    address: str  # '' for local; 'all', 'samehost', 'samenet', an IP or a host name
    netmask: str
    method: str
    error: str = ""

    @property
    def accepts(self) -> bool:
        return self.method != "reject"

    @property
    def network(self) -> Net | None:
        """The address as a network, None for a keyword or a host name (or a local rule)."""
        try:
            bits = f"/{bin(int(ipaddress.ip_address(self.netmask))).count('1')}" if self.netmask else ""
            return ipaddress.ip_network(f"{self.address}{bits}", strict=False)  # a v6 mask has no dotted form
        except ValueError:
            return None

    def text(self) -> str:
        """The rule as a pg_hba line: `host all all 0.0.0.0/0 scram-sha-256`."""
        net = self.network
        addr = (f"{net.network_address}/{net.prefixlen}" if net is not None else self.address)
        return " ".join(p for p in (self.type, ",".join(self.databases), ",".join(self.users), addr, self.method)
                        if p)


def parse_hba_rows(out: str) -> list[HbaRule]:
    """HBA_SQL's `psql -tA -F '|'` output -> rules (lines that are not rows are ignored)."""
    rules = []
    for ln in out.splitlines():
        f = ln.split("|")
        if len(f) < 7 or not f[0].strip().isdigit():
            continue
        f += [""] * (8 - len(f))
        rules.append(HbaRule(int(f[0]), f[1], tuple(filter(None, f[2].split(","))),
                             tuple(filter(None, f[3].split(","))), f[4], f[5], f[6], "|".join(f[7:])))
    return rules


# -- what a rule matches ------------------------------------------------------------------------
def _db_overlap(a: str, b: str) -> bool:
    if "replication" in (a, b):  # `all` never matches a physical replication connection
        return a == b
    return "all" in (a, b) or a in _UNKNOWN_DB or b in _UNKNOWN_DB or a == b


def _db_within(a: str, outer: tuple[str, ...]) -> bool:
    return a in outer or ("all" in outer and a != "replication")


def _user_overlap(a: str, b: str) -> bool:
    return "all" in (a, b) or a.startswith("+") or b.startswith("+") or a == b  # group members are unknown here


def _user_within(a: str, outer: tuple[str, ...]) -> bool:
    return a in outer or "all" in outer


def _addr_overlap(a: HbaRule, b: HbaRule) -> bool:
    if "local" in (a.type, b.type):
        return True  # transports already tell local from TCP
    na, nb = a.network, b.network
    if a.address == "all" or b.address == "all" or na is None or nb is None:
        return True  # samehost, samenet, a host name: may be any address
    return na.version == nb.version and na.overlaps(nb)


def _addr_within(a: HbaRule, outer: HbaRule) -> bool:
    if "local" in (a.type, outer.type) or outer.address == "all" or a.address == outer.address == "":
        return True
    na, no = a.network, outer.network
    if na is None or no is None:
        return a.address == outer.address and a.netmask == outer.netmask
    return na.version == no.version and na.subnet_of(no)  # type: ignore[arg-type]  # same version: checked


def overlaps(a: HbaRule, b: HbaRule) -> bool:
    """Some connection could match both rules."""
    return (bool(_TRANSPORTS.get(a.type, set()) & _TRANSPORTS.get(b.type, set()))
            and any(_db_overlap(x, y) for x in a.databases for y in b.databases)
            and any(_user_overlap(x, y) for x in a.users for y in b.users)
            and _addr_overlap(a, b))


def within(a: HbaRule, outer: HbaRule) -> bool:
    """Every connection rule a matches, outer matches too (a is an exception carved out of outer)."""
    return (_TRANSPORTS.get(a.type, {"?"}) <= _TRANSPORTS.get(outer.type, set())
            and all(_db_within(x, outer.databases) for x in a.databases)
            and all(_user_within(x, outer.users) for x in a.users)
            and _addr_within(a, outer))


# -- findings -----------------------------------------------------------------------------------
def check_hba_rules(rules: list[HbaRule]) -> list[str]:
    """Every finding of the module docstring, in line order; empty for the runbook's own pg_hba."""
    problems: list[str] = []
    for r in rules:
        if r.error:
            problems.append(f"pg_hba line {r.line}: {r.error}")
            continue
        if r.method in WEAK_METHODS:
            problems.append(f"pg_hba line {r.line}: `{r.text()}` uses {r.method} (want scram-sha-256; peer on the "
                            "socket)")
        if r.type not in ("local", "hostssl") and r.accepts:
            problems.append(f"pg_hba line {r.line}: `{r.text()}` accepts connections without TLS (want hostssl, "
                            "or reject)")
    valid = [r for r in rules if not r.error]
    for i, rej in enumerate(valid):
        if rej.accepts:
            continue
        before = [a for a in valid[:i] if a.accepts and overlaps(a, rej) and not within(a, rej)]
        if before:
            lines = ", ".join(str(a.line) for a in before)
            problems.append(f"pg_hba line {rej.line}: the reject `{rej.text()}` comes after accepting line(s) "
                            f"{lines} (`{before[0].text()}`) that match connections it should refuse: the first "
                            "matching line decides, so move the reject above them")
    if not any(r.type == "hostnossl" and not r.accepts for r in valid):
        problems.append("pg_hba has no hostnossl ... reject rule")
    return problems


def check_pg_hba(rows_out: str) -> list[str]:
    """HBA_SQL output -> findings."""
    return check_hba_rules(parse_hba_rows(rows_out))
