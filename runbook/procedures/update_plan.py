"""What `inv cluster.update` does: the bundle's versions compared with what each host runs (pure).

Facts come from the hosts (`dpkg-query` for the bundle's packages, `patroni --version` in the venv,
`etcd --version`) and from the bundle's manifest; `plan_update` turns them into an ordered list of items,
each one ledger step: etcd one member at a time (the etcd leader last); Patroni under `patronictl pause`
(pause, each host, resume); PostgreSQL packages replicas first, then a switchover, then the old leader.
Only what differs is planned; `reinstall` plans the PostgreSQL hosts even when nothing differs (the plan
then says "same version: reinstall").
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

# reinstalled when nothing differs but a reinstall is asked for: PostgreSQL itself
CORE_PACKAGES = ("postgresql-{major}", "postgresql-client-{major}", "libpq5")


@dataclass(frozen=True)
class BundleFacts:
    """What the bundle holds: package -> version, the Patroni wheel's version, the etcd release."""

    debs: dict[str, str]
    patroni: str
    etcd: str


@dataclass(frozen=True)
class HostFacts:
    """What one host runs (empty strings: not installed / not asked)."""

    debs: dict[str, str] = field(default_factory=dict)  # only fully installed packages ("ii")
    patroni: str = ""
    etcd: str = ""


@dataclass(frozen=True)
class Item:
    kind: str  # etcd | pause | patroni | resume | postgres | switchover
    host: str = ""  # the inventory host ("" for pause / resume / switchover)
    what: str = ""  # shown in the plan: "etcd 3.5.15 -> 3.5.16", "same version: reinstall", ...
    packages: tuple[str, ...] = ()  # postgres: the packages to install from the bundle

    @property
    def step(self) -> str:
        """The step's own name within the cluster.update section."""
        return f"{self.kind}-{self.host}" if self.host else self.kind


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    problems: tuple[str, ...] = ()  # why the update must not start (downgrades, no replica, ...)
    bundle: str = ""  # sha256 of the manifest.json it was planned from (a resumed run needs the same bundle)
    bundle_dir: str = ""

    def to_json(self) -> str:
        return json.dumps({"items": [asdict(i) for i in self.items], "problems": list(self.problems),
                           "bundle": self.bundle, "bundle_dir": self.bundle_dir})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(tuple(Item(i["kind"], i["host"], i["what"], tuple(i["packages"])) for i in d["items"]),
                   tuple(d.get("problems", ())), d.get("bundle", ""), d.get("bundle_dir", ""))


# -- versions ------------------------------------------------------------------------------------------
def _order(c: str) -> int:
    """dpkg's ordering of one non-digit character: ~ first, then the end, then letters, then the rest."""
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or a revision (alternating non-digit / digit runs)."""
    while a or b:
        na = re.match(r"[^0-9]*", a).group()  # type: ignore[union-attr]
        nb = re.match(r"[^0-9]*", b).group()  # type: ignore[union-attr]
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"[0-9]*", a).group()  # type: ignore[union-attr]
        db = re.match(r"[0-9]*", b).group()  # type: ignore[union-attr]
        ia, ib = int(da or 0), int(db or 0)
        if ia != ib:
            return -1 if ia < ib else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def deb_compare(a: str, b: str) -> int:
    """Compare two Debian versions as `dpkg --compare-versions` does: -1, 0 or 1."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), up, rev

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def release_compare(a: str, b: str) -> int:
    """Compare dotted release numbers (Patroni 4.1.4, etcd 3.5.16): -1, 0 or 1."""
    def nums(v: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", v)]

    na, nb = nums(a), nums(b)
    return (na > nb) - (na < nb)


# -- parsers of what the hosts print ---------------------------------------------------------------------
def parse_dpkg(text: str) -> dict[str, str]:
    """`dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n'` -> {package: version} of the
    packages installed completely ("ii"); a half-installed one (an interrupted dpkg) counts as missing."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("ii"):
            out[parts[0]] = parts[1]
    return out


def parse_patroni_version(text: str) -> str:
    """`patroni --version` ('patroni 4.1.5') -> '4.1.5' ('' when absent)."""
    m = re.search(r"patroni\s+(\d+(?:\.\d+)+)", text or "")
    return m.group(1) if m else ""


def parse_etcd_version(text: str) -> str:
    """`etcd --version` ('etcd Version: 3.5.16') -> '3.5.16' ('' when absent)."""
    m = re.search(r"etcd Version:\s*(\S+)", text or "")
    return m.group(1) if m else ""


# -- the plan ------------------------------------------------------------------------------------------
def _pkg_changes(bundle: BundleFacts, host: HostFacts) -> list[tuple[str, str, str]]:
    """(package, installed or '', bundled) for every bundled package whose installed version differs."""
    return [(n, host.debs.get(n, ""), v) for n, v in sorted(bundle.debs.items()) if host.debs.get(n) != v]


def _describe(changes: list[tuple[str, str, str]], limit: int = 4) -> str:
    shown = [f"{n} {old or '(none)'} -> {new}" for n, old, new in changes[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


def _releases(kind: str, label: str, hosts: list[str], have: dict[str, str], want: str, allow_downgrade: bool,
              problems: list[str]) -> list[Item]:
    """An item per host whose release differs from the bundle's; a downgrade is a problem unless allowed."""
    out = []
    for h in hosts:
        if have[h] == want:
            continue
        if have[h] and release_compare(have[h], want) > 0 and not allow_downgrade:
            problems.append(f"{h}: {label} {have[h]} is newer than the bundle's {want}; refusing to downgrade "
                            "(build the bundle again, or set runbook.allow_downgrade: true)")
        out.append(Item(kind, h, f"{label} {have[h] or '(none)'} -> {want}"))
    return out


def plan_update(bundle: BundleFacts, facts: dict[str, HostFacts], *, etcd_hosts: list[str],
                pg_hosts: list[str], pg_leader: str | None, etcd_leader: str | None, major: int,
                reinstall: bool = False, allow_downgrade: bool = False) -> Plan:
    """The ordered items of a rolling update to `bundle` (see the module docstring)."""
    items: list[Item] = []
    problems: list[str] = []

    # etcd: one member at a time, the leader last (a restarted leader costs an election; once)
    etcd_todo = _releases("etcd", "etcd", etcd_hosts, {h: facts.get(h, HostFacts()).etcd for h in etcd_hosts},
                          bundle.etcd, allow_downgrade, problems)
    items += [i for i in etcd_todo if i.host != etcd_leader] + [i for i in etcd_todo if i.host == etcd_leader]

    # Patroni: replicas first, the leader last, all under pause (PostgreSQL keeps running meanwhile)
    replicas = [h for h in pg_hosts if h != pg_leader]
    order = replicas + [h for h in pg_hosts if h == pg_leader]
    patroni_todo = _releases("patroni", "Patroni", order, {h: facts.get(h, HostFacts()).patroni for h in order},
                             bundle.patroni, allow_downgrade, problems)
    if patroni_todo:
        items += [Item("pause", what="patronictl pause: no failover while Patroni restarts"), *patroni_todo,
                  Item("resume", what="patronictl resume")]

    # PostgreSQL packages: replicas first, then a switchover to an updated sync standby, then the old leader
    pg_items: dict[str, Item] = {}
    for h in order:
        changes = _pkg_changes(bundle, facts.get(h, HostFacts()))
        newer = [f"{n} {old} (bundle {new})" for n, old, new in changes if old and deb_compare(old, new) > 0]
        if newer and not allow_downgrade:
            problems.append(f"{h}: installed packages are newer than the bundle's: {', '.join(newer[:4])}; refusing "
                            "to downgrade (build the bundle again, or set runbook.allow_downgrade: true)")
        if changes:
            pg_items[h] = Item("postgres", h, _describe(changes), tuple(n for n, _, _ in changes))
        elif reinstall:
            core = tuple(p.format(major=major) for p in CORE_PACKAGES if p.format(major=major) in bundle.debs)
            pg_items[h] = Item("postgres", h, "same version: reinstall " + ", ".join(core), core)
    items += [pg_items[h] for h in replicas if h in pg_items]
    if pg_leader in pg_items:
        if not replicas:
            problems.append(f"{pg_leader} is the only PostgreSQL member: updating it stops the database; "
                            "add a replica first")
        items += [Item("switchover", what=f"switch over from {pg_leader} to an updated sync standby"),
                  pg_items[pg_leader]]
    if pg_leader is None and (patroni_todo or pg_items):
        problems.append("the Patroni cluster has no running leader: fix that first (inv cluster.status)")
    return Plan(tuple(items), tuple(problems))
