"""Reading the cluster: patronictl and etcdctl JSON, parsed by pure functions (unit-tested on captures)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import tenacity

    from runbook.core.transport import Result

import json
from dataclasses import dataclass

from runbook.cluster.context import Ctx
from runbook.cluster.render import member_name
from runbook.inventory import Host


@dataclass
class Member:
    name: str
    host: str
    role: str  # Leader | Sync Standby | Replica | ...
    state: str  # running | streaming | stopped | ...
    timeline: int | None
    lag: float | int | str | None

    @property
    def is_leader(self) -> bool:
        return self.role == "Leader" and self.state == "running"

    @property
    def streaming(self) -> bool:
        return self.state == "streaming"


def parse_members(text: str) -> list[Member]:
    """`patronictl list -f json` -> members. Lag: 'Lag in MB' (Patroni 3) or 'Replay Lag'/'Receive Lag' (4)."""
    out = []
    for m in json.loads(text or "[]"):
        lag = m.get("Lag in MB", m.get("Replay Lag", m.get("Receive Lag")))
        out.append(Member(m.get("Member", ""), m.get("Host", ""), m.get("Role", ""), m.get("State", ""),
                          m.get("TL"), lag))
    return out


@dataclass
class Endpoint:
    endpoint: str
    id: str
    version: str
    db_size: int
    leader: bool
    raft_term: int
    raft_index: int
    errors: list[str]


def parse_endpoint_status(text: str) -> list[Endpoint]:
    """`etcdctl endpoint status -w json` -> endpoints (member ids as hex, as etcdctl's table shows)."""
    out = []
    for e in json.loads(text or "[]"):
        st = e.get("Status", {})
        hdr = st.get("header", {})
        mid = hdr.get("member_id", 0)
        out.append(Endpoint(e.get("Endpoint", ""), f"{mid:x}", st.get("version", ""), st.get("dbSize", 0),
                            st.get("leader") == mid and mid != 0, hdr.get("raft_term", st.get("raftTerm", 0)),
                            st.get("raftIndex", 0), list(st.get("errors", []) or [])))
    return out


def parse_endpoint_health(text: str) -> dict[str, tuple[bool, str]]:
    """`etcdctl endpoint health -w json` -> {endpoint: (healthy, error)}."""
    return {e["endpoint"]: (bool(e.get("health")), e.get("error", "")) for e in json.loads(text or "[]")}


def members(ctx: Ctx, via: list[Host] | None = None) -> list[Member]:
    """Ask the first postgres host that answers for `patronictl list -f json`."""
    return parse_members(patronictl_any(ctx, "list -f json", via))


def patronictl_any(ctx: Ctx, args: str, via: list[Host] | None = None) -> str:
    """The output of `patronictl ARGS` from the first postgres host that answers (RuntimeError when none)."""
    from runbook.cluster.commands import patronictl

    errors = []
    for h in via or ctx.inventory.postgres:
        try:
            r = ctx.transport.run(h, patronictl(ctx, args), user="postgres", timeout=30)
        except Exception as exc:  # an unreachable host: ask the next one
            errors.append(f"{h.name}: {exc}")
            continue
        if r.ok:
            return r.stdout
        errors.append(f"{h.name}: {r.stderr.strip()[-200:]}")
    raise RuntimeError(f"no postgres host answered patronictl {args.split()[0]}: " + "; ".join(errors))


def host_of(ctx: Ctx, member: str) -> Host:
    for h in ctx.inventory.postgres:
        if member_name(h) == member:
            return h
    raise KeyError(member)


def leader(ctx: Ctx) -> Host | None:
    """The running leader (None: no member leads), as the first postgres host whose REST API answers GET /cluster
    says: the DCS's member records that `patronictl list` prints, without starting patronictl (~0.1 s, not ~1 s:
    --verify and every run that places a step on the leader ask it). RuntimeError when no host answers."""
    from runbook.cluster.commands import rest_get

    errors = []
    for h in ctx.inventory.postgres:
        try:
            r = ctx.transport.run(h, rest_get(ctx, h, ["/cluster"], 'print(json.dumps(got["/cluster"]))'),
                                  user="postgres", timeout=30)
        except Exception as exc:  # an unreachable host: ask the next one
            errors.append(f"{h.name}: {exc}")
            continue
        if r.ok:
            for m in parse_cluster(r.stdout):
                if m.is_leader:
                    return host_of(ctx, m.name)
            return None
        errors.append(f"{h.name}: {r.stderr.strip()[-200:]}")
    raise RuntimeError("no postgres host's REST API answered GET /cluster: " + "; ".join(errors))


# GET /cluster's roles in `patronictl list`'s words (patroni.ctl), so a Member reads the same either way
_ROLES = {"leader": "Leader", "standby_leader": "Standby Leader", "sync_standby": "Sync Standby",
          "quorum_standby": "Quorum Standby", "replica": "Replica"}


def parse_cluster(text: str) -> list[Member]:
    """The REST API's GET /cluster -> members, as parse_members reads `patronictl list -f json`."""
    out = []
    for m in json.loads(text or "{}").get("members", []):
        role = m.get("role", "")
        out.append(Member(m.get("name", ""), m.get("host", ""), _ROLES.get(role, role), m.get("state", ""),
                          m.get("timeline"), m.get("lag")))
    return out


def etcd_status(ctx: Ctx) -> tuple[list[Endpoint], dict[str, str]]:
    """Each etcd endpoint's status, asked from each etcd host about itself, all at once (a dead one shows as an
    error); in the inventory's order."""
    from runbook.cluster.commands import etcdctl

    eps, errs = [], {}
    for h, r in each_etcd(ctx, lambda h: etcdctl(ctx, h, "endpoint status -w json")):
        if isinstance(r, Exception):
            errs[h.name] = str(r).splitlines()[0]
        elif r.ok:
            eps += parse_endpoint_status(r.stdout)
        else:
            errs[h.name] = (r.stderr.strip().splitlines() or ["no answer"])[-1][:160]
    return eps, errs


def each_etcd(ctx: Ctx, command: Callable[[Host], str]) -> list[tuple[Host, "Result | Exception"]]:
    """`command(host)` run on every etcd host at once (each asks its own member); (host, Result or the
    exception that reaching it raised) in the inventory's order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(h: Host):
        try:
            return ctx.transport.run(h, command(h), timeout=20)
        except Exception as exc:  # an unreachable host: reported, the others still asked
            return exc

    hosts = list(ctx.inventory.etcd)
    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        return list(zip(hosts, pool.map(one, hosts), strict=True))


def _expected() -> tuple[type[BaseException], ...]:
    """What a probe of a cluster in motion may raise: a host that does not answer (TransportError, OSError),
    no member answering (RuntimeError from members()), a half-written reply (ValueError: JSON), and a
    database that refuses connections (psycopg.Error, when psycopg is installed). Anything else is a bug
    and propagates at once instead of being polled away."""
    from runbook.errors import RunbookError

    kinds: list[type[BaseException]] = [RunbookError, RuntimeError, OSError, ValueError]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        kinds.append(psycopg.Error)
    return tuple(kinds)


def _last_result_or_none(state: "tenacity.RetryCallState") -> object:
    """After the last try: what it returned, or None when it raised an expected error."""
    out = state.outcome
    return None if out is None or out.failed else out.result()


def wait(predicate, seconds: float, interval: float = 1.0, *,
         retry_on: tuple[type[BaseException], ...] | None = None):
    """Poll predicate() until it returns a truthy value or the budget runs out; bounded in time and count.

    Returns the truthy value, else the last falsy one (None when the last try raised an expected error).
    Only ``retry_on`` (default: the errors of a cluster in motion, see _expected) is retried."""
    import tenacity

    retry_on = retry_on or _expected()
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(seconds) | tenacity.stop_after_attempt(int(seconds / interval) + 2),
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_exception_type(retry_on) | tenacity.retry_if_result(lambda v: not v),
        retry_error_callback=_last_result_or_none,
    )
    return retrying(predicate)
