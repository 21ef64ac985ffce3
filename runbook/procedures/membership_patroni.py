"""PostgreSQL members: `patroni.remove NAME` and `patroni.reinit NAME` as ledger steps.

Adding a member needs no procedure: a host with role postgres added to the inventory joins as a streaming
replica on the next `inv cluster.up` (every host's pg_hba and /etc/hosts are re-rendered, the new host is
installed and started by patroni.replicas).

Both procedures refuse the leader (switch over first). remove: Patroni stopped and disabled on the member,
its key deleted from the DCS (irreversible), its replication slot dropped on the members that stay
(irreversible; Patroni 4 would keep it for member_slots_ttl: see membership_slots), PGDATA kept unless
--destroy-data (irreversible). reinit: the
replica's PGDATA wiped and copied again from the leader by Patroni (irreversible); a resumed run that finds
the copy under way waits for it instead of starting another.
"""
from __future__ import annotations

import shlex

from runbook.cluster.commands import etcdctl, member_ok, patronictl
from runbook.cluster.context import Ctx
from runbook.cluster.readers import Member, members
from runbook.cluster.render import member_name
from runbook.core.step import Run, Section, Step, wait_for
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.membership_slots import slot_step

ORDER = 60  # after the install sections (rollback cascades by index)


def target_host(ctx: Ctx, name: str) -> Host:
    """NAME as an inventory host with role postgres (a Patroni member name patroni_NAME is accepted)."""
    name = name.removeprefix("patroni_")
    for h in ctx.inventory.postgres:
        if h.name == name:
            return h
    raise ProcedureFailed(f"{name} is not a host with role postgres in {ctx.inventory.path} (postgres hosts: "
                          f"{', '.join(h.name for h in ctx.inventory.postgres)})", 2)


def _on(name: str):
    return lambda ctx, hosts: [h for h in hosts if h.name == name]


def _first_etcd(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    return hosts[:1]


def member_key(ctx: Ctx, name: str) -> str:
    """The member's key in the DCS: /<namespace>/<scope>/members/patroni_<host name>."""
    ns = ctx.inventory.cluster.namespace.rstrip("/")
    return f"{ns}/{ctx.inventory.cluster.name}/members/patroni_{name.removeprefix('patroni_')}"


def _as_postgres(cmd: str) -> str:
    return f"sudo -u postgres sh -c {shlex.quote(cmd)}"


def refuse_leader(ctx: Ctx, host: Host, what: str) -> str:
    """A shell guard run on the member itself: exit 3 when it is the running leader."""
    return (f"if {_as_postgres(member_ok(ctx, host, leader=True))}; then echo '{host.name} is the leader: "
            f"{what} refuses it; switch over first (inv patroni.switchover)' >&2; exit 3; fi")


def precheck(ms: list[Member], host: Host, what: str, *, strict: bool, force: bool = False) -> list[str]:
    """Why `what` must not run on host now (pure: from `patronictl list`)."""
    me = member_name(host)
    problems = []
    for m in ms:
        if m.name == me and m.is_leader:
            problems.append(f"{host.name} is the leader: {what} refuses it; switch over first "
                            "(inv patroni.switchover --candidate <another member>)")
    if not any(m.is_leader for m in ms):
        problems.append("the cluster has no running leader: fix that first (inv cluster.status)")
    listed = any(m.name == me for m in ms)  # a resumed remove finds it gone already
    if what == "patroni.remove" and strict and not force and listed:
        others = [m for m in ms if m.name != me and not m.is_leader and m.streaming]
        if not others:
            problems.append(f"{host.name} is the only streaming replica and synchronous_mode_strict is on: "
                            "without it every write waits; add a replica first, or pass --force")
    return problems


# -- patroni.remove ----------------------------------------------------------------------------------
def dcs_step(sec: Section, ctx: Ctx, name: str) -> Step:
    """`<section>.dcs`: the member key of `name` deleted from etcd through one etcd member (irreversible)."""
    key = member_key(ctx, name)

    @sec.step("dcs", role="etcd", only=_first_etcd,
              irreversible=f"deletes {key} from etcd; {name} comes back only by starting Patroni on it again")
    def dcs(ctx: Ctx, h: Host) -> list:
        """Delete the member's key from the DCS (etcd), asked through one etcd member
        A cleanly stopped Patroni deletes it itself, a dead one's expires with its TTL; this makes sure, and
        the leader then drops its slot."""
        return [Run(etcdctl(ctx, h, f"del {shlex.quote(key)}") + " >/dev/null")]

    @dcs.check
    def _dcs_check(ctx: Ctx, h: Host) -> str:
        return f"test -z \"$({etcdctl(ctx, h, f'get --keys-only {shlex.quote(key)}')})\""

    return dcs


def remove_steps(ctx: Ctx, host: Host, destroy_data: bool = False) -> list[Step]:
    sec = Section("patroni.remove", ORDER, f"remove {host.name} from the Patroni cluster")
    on_target = _on(host.name)

    @sec.step("stop", role="postgres", only=on_target)
    def stop(ctx: Ctx, h: Host) -> list:
        """Stop Patroni on the member and disable it (refuses the leader)
        PostgreSQL stops with it (KillMode=process: Patroni stops it first); PGDATA stays."""
        return [Run(refuse_leader(ctx, h, "patroni.remove")), Run("systemctl disable --now patroni", timeout=180)]

    @stop.check
    def _stop_check(ctx: Ctx, h: Host) -> str:
        return "! systemctl is-active -q patroni && ! systemctl is-enabled -q patroni"

    @stop.undo
    def _stop_undo(ctx: Ctx, h: Host) -> list:
        return [Run("systemctl enable --now patroni")]

    dcs = dcs_step(sec, ctx, host.name)
    staying = lambda c, hs: [x for x in hs if x.name != host.name]  # noqa: E731
    steps = [stop, dcs, slot_step(sec, ctx, member_name(host), staying)]
    if destroy_data:
        pgdata = ctx.paths.pgdata()

        @sec.step("data", role="postgres", only=on_target,
                  irreversible=f"deletes PGDATA {pgdata} on {host.name} (--destroy-data)")
        def data(ctx: Ctx, h: Host) -> list:
            """Delete PGDATA on the removed member (--destroy-data)"""
            return [Run(f"systemctl is-active -q patroni && {{ echo 'Patroni runs on {h.name}: not deleting "
                        f"{pgdata}' >&2; exit 3; }}; rm -rf {shlex.quote(pgdata)}")]

        @data.check
        def _data_check(ctx: Ctx, h: Host) -> str:
            return f"test ! -e {shlex.quote(pgdata)}"

        steps.append(data)
    return steps


# -- patroni.reinit ----------------------------------------------------------------------------------
def _state_of(ctx: Ctx, host: Host) -> str:
    """Shell: prints the member's Patroni State ('' when absent)."""
    py = ("import json,sys; m={x['Member']: x for x in json.load(sys.stdin)}.get(sys.argv[1]) or {}; "
          "print(m.get('State', ''))")
    return (f"{patronictl(ctx, 'list -f json')} | {ctx.paths.patroni_venv}/bin/python -c {shlex.quote(py)} "
            f"{member_name(host)}")


def reinit_steps(ctx: Ctx, host: Host) -> list[Step]:
    sec = Section("patroni.reinit", ORDER + 1, f"rebuild the replica {host.name} from the leader")
    cluster, member = ctx.inventory.cluster.name, member_name(host)
    pgdata = ctx.paths.pgdata()

    @sec.step("reinit", role="postgres", only=_on(host.name),
              irreversible=f"wipes PGDATA {pgdata} on {host.name} and copies it again from the leader")
    def reinit(ctx: Ctx, h: Host) -> list:
        """Rebuild the replica: patronictl reinit (Patroni wipes PGDATA, pg_basebackup from the leader)
        Refuses the leader. Resumed while a copy is under way, it waits for that copy instead of starting
        another; then a bounded wait until the member streams again."""
        state = _as_postgres(_state_of(ctx, h))
        reinit_cmd = _as_postgres(patronictl(ctx, f"reinit --force {cluster} {member}"))
        return [Run("systemctl is-active -q patroni || systemctl start patroni", timeout=120),
                Run(refuse_leader(ctx, h, "patroni.reinit")),
                Run(f"st=$({state}); case \"$st\" in 'creating replica') echo 'a copy is under way: waiting for "
                    f"it';; *) {reinit_cmd};; esac", timeout=120),
                Run(wait_for(_as_postgres(member_ok(ctx, h)), 600, 2), timeout=660)]

    @reinit.check
    def _reinit_check(ctx: Ctx, h: Host) -> str:
        return f"systemctl is-active -q patroni && {_as_postgres(member_ok(ctx, h))}"

    return [reinit]


def cluster_members(ctx: Ctx, host: Host) -> list[Member]:
    """patronictl list, asked of the other postgres hosts first (the target may be the broken one)."""
    via = [h for h in ctx.inventory.postgres if h.name != host.name] + [host]
    try:
        return members(ctx, via)
    except RuntimeError as exc:
        raise ProcedureFailed(str(exc), 1) from None


# -- patroni.replace ---------------------------------------------------------------------------------
SYNC_WAIT = 300

# the patroni section's steps that make a cluster (bootstrap, roles, dynamic config): not for a new replica
_NOT_FOR_A_REPLICA = ("patroni.bootstrap", "patroni.roles", "patroni.dynamic")
# re-rendered on every postgres host: pg_hba names the replication hosts (NEW in, OLD out); reloaded
_EVERY_HOST = ("patroni.config", "patroni.validate")


def replace_steps(ctx: Ctx, old: str, new: str) -> list[Step]:
    """OLD (gone, taken out of the inventory) replaced by NEW (a bare inventory host with role postgres):
    NEW installed by the install sections' own steps and started as a replica (after every host's pg_hba
    names it), OLD's key deleted from the DCS, then a bounded wait until NEW is the sync standby."""
    from dataclasses import replace

    from runbook.sections import section_steps

    old = old.removeprefix("patroni_")
    if old in ctx.inventory.names():
        raise ProcedureFailed(f"{old} is still in {ctx.inventory.path}: take it out or mark it "
                              f"`retired: true` first (pg_hba and /etc/hosts "
                              "are rendered from the inventory), then run this again", 2)
    host = target_host(ctx, new)
    only_new = _on(host.name)
    steps = []
    for s in section_steps("bundle") + section_steps("etcd") + section_steps("postgres") + section_steps("patroni"):
        if s.name in _NOT_FOR_A_REPLICA or (s.section == "etcd" and s.name not in ("etcd.names", "etcd.pki")):
            continue
        keep = s.role in ("local", "all") or s.name in _EVERY_HOST
        steps.append(s if keep else replace(s, only=only_new))
    sec = Section("patroni.replace", ORDER + 2, f"replace {old} by {new}")
    dcs = dcs_step(sec, ctx, old)

    @sec.step("sync", role="postgres", only=only_new)
    def sync(ctx: Ctx, h: Host) -> list:
        """Patroni enabled and running on the new member, then a bounded wait until it is the sync standby
        (writes no longer wait for the old one). A host that was a member before (its steps recorded done,
        Patroni stopped by patroni.remove) is started again here."""
        return [Run("systemctl enable -q --now patroni", timeout=120),
                Run(wait_for(_as_postgres(_role_is(ctx, h, "Sync Standby")), SYNC_WAIT, 2), timeout=SYNC_WAIT + 60)]

    @sync.check
    def _sync_check(ctx: Ctx, h: Host) -> str:
        return _as_postgres(_role_is(ctx, h, "Sync Standby"))

    return steps + [dcs, sync, slot_step(sec, ctx, f"patroni_{old}", lambda c, hs: hs)]


def _role_is(ctx: Ctx, host: Host, role: str) -> str:
    """Shell: rc 0 when the member has this Patroni role and streams."""
    py = ("import json,sys; m={x['Member']: x for x in json.load(sys.stdin)}.get(sys.argv[1]) or {}; "
          "sys.exit(0 if m.get('Role') == sys.argv[2] and m.get('State') == 'streaming' else 1)")
    return (f"{patronictl(ctx, 'list -f json')} | {ctx.paths.patroni_venv}/bin/python -c {shlex.quote(py)} "
            f"{member_name(host)} {shlex.quote(role)}")


def replace_precheck(ms: list[Member], old: str) -> list[str]:
    """Why patroni.replace must not run now (pure)."""
    problems = []
    gone = f"patroni_{old.removeprefix('patroni_')}"
    if not any(m.is_leader for m in ms):
        problems.append("the cluster has no running leader: fix that first (inv cluster.status)")
    if any(m.name == gone and m.is_leader for m in ms):
        problems.append(f"{old} is still the leader: switch over (or let Patroni fail over) first")
    return problems
