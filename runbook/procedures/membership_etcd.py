"""etcd members: `etcd.add NEW`, `etcd.remove OLD`, `etcd.replace OLD --with NEW` as ledger steps.

The inventory says what the cluster should be: NEW is listed with role etcd, OLD is not (any more). The
endpoint lists every host renders (etcd's initial-cluster, ectl, Patroni's etcd3 hosts, /etc/hosts) come
from it, so the install sections' own steps bring them in line; the steps here do what only a running
cluster can: `member remove` (irreversible; the member ID goes to the ledger), `member add --learner`, the
first start of NEW with initial-cluster-state existing, `member promote` once it caught up.

replace = remove + add: the old member first (a dead member counts against the quorum), then NEW.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace

from runbook.cluster.commands import etcdctl
from runbook.cluster.context import Ctx
from runbook.core.step import Local, Run, Section, Step, wait_for
from runbook.errors import ProcedureFailed
from runbook.inventory import Host

ORDER = 62
PROMOTE_TRIES, PROMOTE_INTERVAL = 60, 2  # member promote fails until the learner caught up: bounded retries
REMOVE_TRIES = 15  # x 2 s: a live member is removable once every member was connected for 5 s


@dataclass(frozen=True)
class EtcdMember:
    id: str  # hex, as etcdctl member remove/promote take it
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool


def parse_member_list(text: str) -> list[EtcdMember]:
    """`etcdctl member list -w json` -> members (IDs in hex; an unstarted member has no name yet)."""
    doc = json.loads(text or "{}")
    return [EtcdMember(format(int(m["ID"]), "x"), m.get("name", ""), tuple(m.get("peerURLs") or ()),
                       tuple(m.get("clientURLs") or ()), bool(m.get("isLearner"))) for m in doc.get("members", [])]


def peer_url(name: str) -> str:
    return f"https://{name}:2380"


def find(members: list[EtcdMember], name: str) -> EtcdMember | None:
    return next((m for m in members if m.name == name or peer_url(name) in m.peer_urls), None)


def _lookup(ctx: Ctx, via: Host, name: str, what: str = "id") -> str:
    """Shell: print the member's hex id (what=id) or 'learner'/'voter' (what=kind); nothing when absent."""
    py = ("import json,sys; d=json.load(sys.stdin); n=sys.argv[1]; u='https://'+n+':2380'; "
          "m=[x for x in d.get('members',[]) if x.get('name')==n or u in (x.get('peerURLs') or [])]; "
          "print(('learner' if m[0].get('isLearner') else 'voter') if sys.argv[2]=='kind' else "
          "format(int(m[0]['ID']),'x')) if m else None")
    return f"{etcdctl(ctx, via, 'member list -w json')} | python3 -c {shlex.quote(py)} {name} {what}"


def precheck(members: list[EtcdMember], health: dict[str, bool], *, add: str | None = None,
             remove: str | None = None, force: bool = False) -> list[str]:
    """Why the change must not run now (pure). health: {member name: healthy}."""
    problems = []
    voting = [m for m in members if not m.learner]
    gone = find(members, remove) if remove else None
    new = find(members, add) if add else None
    for m in voting:
        if m is not gone and not health.get(m.name, False):
            problems.append(f"etcd member {m.name or m.id} is not healthy: fix it (or replace it) first; "
                            "another member out would lose the quorum")
    learners = [m for m in members if m.learner and m is not new]
    if add and learners:
        problems.append(f"learner {learners[0].name or learners[0].id} is already joining: one learner at a time")
    after = len(voting) - (1 if gone and not gone.learner else 0) + (1 if add and (new is None or new.learner) else 0)
    if not force and after < 3:
        problems.append(f"etcd would have {after} voting member(s): fewer than three keeps no margin; pass "
                        "--force to do it anyway")
    elif not force and after % 2 == 0:
        problems.append(f"etcd would have {after} voting members, an even count (no more fault tolerance than "
                        f"{after - 1}); pass --force to do it anyway")
    return problems


def _on(*names: str):
    return lambda ctx, hosts: [h for h in hosts if h.name in names]


def _via(exclude: str | None):
    """Where member commands run: the first inventory etcd host that is not the joining one."""
    return lambda ctx, hosts: [h for h in hosts if h.name != exclude][:1]


def _endpoints(ctx: Ctx, exclude: str | None = None) -> str:
    return ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd if h.name != exclude)


def remove_member_steps(ctx: Ctx, old: str, new: str | None = None) -> list[Step]:
    """Remove OLD (not an inventory host any more) through a remaining member; drop its certificate."""
    if old in ctx.inventory.names():
        raise ProcedureFailed(f"{old} is still in {ctx.inventory.path}: take it out or mark it "
                              f"`retired: true` first (every endpoint list is "
                              "rendered from the inventory), then run this again", 2)
    sec = Section("etcd.remove", ORDER, f"remove etcd member {old}")

    @sec.step("member", role="etcd", only=_via(new),
              irreversible=f"etcdctl member remove {old}: the member's ID is gone for good; it can only come "
                           "back as a new member with an empty data dir")
    def member(ctx: Ctx, h: Host) -> list:
        """Remove the old member: look up its ID, `member remove` it, the ID goes to the ledger
        Nothing to do when it is not a member any more (a resumed run never removes twice)."""
        # etcd refuses to remove a live member unless every member was connected in the last 5 s ("unhealthy
        # cluster", e.g. right after a restart): retried, bounded; any other error stops at once.
        rm = etcdctl(ctx, h, "member remove $id", _endpoints(ctx, new))
        return [Run(f"id=$({_lookup(ctx, h, old)}); if [ -z \"$id\" ]; then echo '{old} is not a member'; exit 0; fi; "
                    f"for i in $(seq {REMOVE_TRIES}); do out=$({rm} 2>&1) && {{ echo \"removed member {old} id $id\"; "
                    "exit 0; }; echo \"$out\" | grep -q 'unhealthy cluster' || break; sleep 2; done; "
                    "echo \"$out\" >&2; exit 1", timeout=REMOVE_TRIES * 10)]

    @member.check
    def _member_check(ctx: Ctx, h: Host) -> str:
        return f"test -z \"$({_lookup(ctx, h, old)})\""

    @sec.step("pki", role="local")
    def pki(ctx: Ctx, h: Host) -> list:
        """The old host's certificate leaves state/pki (no longer issued; the CA keeps no revocation list)"""
        def drop() -> str:
            ctx.pki.drop_host(old)
            return f"{old}'s certificates and keys removed from {ctx.pki_dir}"

        return [Local(f"remove {old}'s certificate and key from state/pki", drop, key=old)]

    @pki.check
    def _pki_check(ctx: Ctx, h: Host) -> bool:
        return not (ctx.pki_dir / old).exists()

    return [member, pki]


def join_steps(ctx: Ctx, new: str) -> list[Step]:
    """NEW (an inventory etcd host) prepared by the etcd section's steps, added as a learner, started with
    initial-cluster-state existing and the current member list, promoted once caught up."""
    from runbook.sections import section_steps
    from runbook.sections.etcd import config_put

    host = ctx.inventory.get(new)
    if not host.has("etcd"):
        raise ProcedureFailed(f"{new} has no etcd role in {ctx.inventory.path}: add it with roles: [etcd]", 2)
    own = {s.name: s for s in section_steps("bundle") + section_steps("etcd")}
    only_new = _on(new)

    def mine(name: str) -> Step:
        return own[name] if own[name].role == "local" else replace(own[name], only=only_new)

    sec = Section("etcd.add", ORDER + 1, f"add etcd member {new}")
    via = _via(new)

    @sec.step("member", role="etcd", only=via, undo_reason="remove the learner by hand: etcdctl member remove ID")
    def member(ctx: Ctx, h: Host) -> list:
        """member add --learner: NEW joins as a non-voting learner (the quorum does not change)"""
        add = etcdctl(ctx, h, f"member add {new} --learner --peer-urls={peer_url(new)}", _endpoints(ctx, new))
        return [Run(f"if [ -n \"$({_lookup(ctx, h, new)})\" ]; then echo '{new} is already a member'; else {add}; fi")]

    @member.check
    def _member_check(ctx: Ctx, h: Host) -> str:
        return f"test -n \"$({_lookup(ctx, h, new)})\""

    @sec.step("config", role="etcd", only=only_new)
    def config(ctx: Ctx, h: Host) -> list:
        """Config of the joining member: initial-cluster-state existing, initial-cluster = the current members"""
        return [config_put(ctx, h, "existing")]

    @sec.step("start", role="etcd", only=only_new)
    def start(ctx: Ctx, h: Host) -> list:
        """First start of NEW on its empty data dir; bounded wait until it answers endpoint status"""
        return [Run("systemctl start etcd", timeout=120),
                Run(wait_for(etcdctl(ctx, h, "endpoint status"), 90), timeout=120)]

    @start.check
    def _start_check(ctx: Ctx, h: Host) -> str:
        return f"systemctl is-active -q etcd && {etcdctl(ctx, h, 'endpoint status')} >/dev/null"

    @start.undo
    def _start_undo(ctx: Ctx, h: Host) -> list:
        return [Run("systemctl stop etcd")]

    @sec.step("promote", role="etcd", only=via, undo_reason="a voting member is removed with etcd.remove")
    def promote(ctx: Ctx, h: Host) -> list:
        """member promote once the learner caught up (bounded retries), then every member healthy"""
        prom = etcdctl(ctx, h, "member promote $id", _endpoints(ctx, new))
        kind = _lookup(ctx, h, new, "kind")
        return [Run(f"for i in $(seq {PROMOTE_TRIES}); do [ \"$({kind})\" = voter ] && exit 0; "
                    f"id=$({_lookup(ctx, h, new)}); {prom} && exit 0; sleep {PROMOTE_INTERVAL}; done; "
                    f"echo '{new} did not catch up within {PROMOTE_TRIES * PROMOTE_INTERVAL}s' >&2; exit 1",
                    timeout=PROMOTE_TRIES * (PROMOTE_INTERVAL + 10)),
                Run(wait_for(etcdctl(ctx, h, "endpoint health", _endpoints(ctx)), 60), timeout=90)]

    @promote.check
    def _promote_check(ctx: Ctx, h: Host) -> str:
        return f"test \"$({_lookup(ctx, h, new, 'kind')})\" = voter"

    return ([own["bundle.verify"], mine("bundle.push"), own["etcd.names"], mine("etcd.binaries"), mine("etcd.user"),
             own["etcd.pki"], mine("etcd.tls"), member, config, mine("etcd.unit"), start, promote,
             mine("etcd.start"), mine("etcd.ectl"), mine("etcd.existing")])


def endpoint_steps(ctx: Ctx) -> list[Step]:
    """Every host's lists brought in line with the inventory: /etc/hosts, etcd's config (no restart: a running
    member ignores initial-cluster), ectl, Patroni's etcd3 hosts (reloaded) and its validation."""
    from runbook.sections import section_steps

    own = {s.name: s for s in section_steps("etcd") + section_steps("patroni")}
    return [own[n] for n in ("etcd.names", "etcd.config", "etcd.ectl", "patroni.config", "patroni.validate")]


def _unique(steps: list[Step]) -> list[Step]:
    """Without a step already planned earlier on all its hosts (etcd.names comes with the join)."""
    whole = set()
    out = []
    for s in steps:
        if s.name in whole:
            continue
        if s.only is None:
            whole.add(s.name)
        out.append(s)
    return out


def add_steps(ctx: Ctx, new: str) -> list[Step]:
    return _unique(join_steps(ctx, new) + endpoint_steps(ctx))


def remove_steps(ctx: Ctx, old: str) -> list[Step]:
    return _unique(remove_member_steps(ctx, old) + endpoint_steps(ctx))


def replace_steps(ctx: Ctx, old: str, new: str) -> list[Step]:
    return _unique(remove_member_steps(ctx, old, new) + join_steps(ctx, new) + endpoint_steps(ctx))


def survey(ctx: Ctx, exclude: str | None = None) -> tuple[list[EtcdMember], dict[str, bool]]:
    """The member list and each member's health, asked of the first inventory etcd host that answers."""
    from runbook.cluster.readers import parse_endpoint_health

    errors = []
    for h in ctx.inventory.etcd:
        if h.name == exclude:
            continue
        try:
            r = ctx.transport.run(h, etcdctl(ctx, h, "member list -w json"), timeout=30)
        except Exception as exc:  # an unreachable host: ask the next one
            errors.append(f"{h.name}: {str(exc).splitlines()[0]}")
            continue
        if not r.ok:
            errors.append(f"{h.name}: {(r.stderr.strip() or 'no answer')[-200:]}")
            continue
        ms = parse_member_list(r.stdout)
        health = {}
        for m in ms:
            if not m.client_urls:
                health[m.name] = False
                continue
            hr = ctx.transport.run(h, etcdctl(ctx, h, "endpoint health -w json", m.client_urls[0]), timeout=30)
            got = parse_endpoint_health(hr.stdout) if hr.stdout.strip().startswith("[") else {}
            health[m.name] = any(ok for ok, _ in got.values())
        return ms, health
    raise ProcedureFailed("no etcd host answered `member list`: " + "; ".join(errors), 1)
