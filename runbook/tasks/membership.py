"""Membership tasks: `patroni.remove|reinit|replace`, `etcd.add|remove|replace` (ledger operations through
runbook.tasks.operation: --dry, --step, --export, resume; irreversible steps confirmed unless --yes)."""
from __future__ import annotations

from invoke import task

from runbook.tasks.operation import COMMON_HELP, run_procedure


@task(help={"name": "the postgres host (or its member name patroni_NAME) to remove",
            "destroy_data": "also delete its PGDATA (irreversible); kept by default",
            "force": "remove the last streaming replica even with synchronous_mode_strict (writes then wait)",
            **COMMON_HELP})
def remove(c, name, destroy_data=False, force=False, yes=False, dry=False, step=False, export=False):
    """Remove a PostgreSQL member: refuses the leader (switch over first); stops and disables Patroni on it,
    deletes its member key from the DCS (irreversible), keeps PGDATA unless --destroy-data. Then take the
    host out of the inventory and run `inv cluster.up` (pg_hba and /etc/hosts no longer name it)."""
    from runbook.procedures.membership_patroni import cluster_members, precheck, remove_steps, target_host

    def build(ctx):
        h = target_host(ctx, name)
        return h.name, remove_steps(ctx, h, destroy_data)

    def checks(ctx):
        h = target_host(ctx, name)
        return precheck(cluster_members(ctx, h), h, "patroni.remove", strict=True, force=force)

    run_procedure(c, "patroni.remove", build, checks, dry=dry, step=step, export=export,
                  yes=yes, destroy_data=destroy_data)


@task(help={"name": "the replica (host or member name) to rebuild from the leader", **COMMON_HELP})
def reinit(c, name, yes=False, dry=False, step=False, export=False):
    """Rebuild a broken replica from the leader: refuses the leader; Patroni wipes its PGDATA and copies it
    again (irreversible), then a bounded wait until it streams. A resumed run waits for a copy under way."""
    from runbook.procedures.membership_patroni import cluster_members, precheck, reinit_steps, target_host

    def build(ctx):
        h = target_host(ctx, name)
        return h.name, reinit_steps(ctx, h)

    def checks(ctx):
        h = target_host(ctx, name)
        return precheck(cluster_members(ctx, h), h, "patroni.reinit", strict=True)

    run_procedure(c, "patroni.reinit", build, checks, dry=dry, step=step, export=export, yes=yes)


ETCD_HELP = {"force": "allow an even count of voting members, or fewer than three", **COMMON_HELP}


def _etcd_checks(add: str | None, remove: str | None, force: bool):
    def checks(ctx):
        from runbook.procedures.membership_etcd import precheck, survey

        ms, health = survey(ctx, exclude=add)
        return precheck(ms, health, add=add, remove=remove, force=force)

    return checks


@task(help={"new": "the new etcd host (listed in the inventory with roles: [etcd])", **ETCD_HELP})
def etcd_add(c, new, force=False, yes=False, dry=False, step=False, export=False):
    """Add an etcd member: NEW prepared by the etcd section's steps, `member add --learner`, first start with
    initial-cluster-state existing and the current members, promoted once caught up (bounded retries); then
    every host's endpoint lists (/etc/hosts, etcd config, ectl, Patroni's etcd3 hosts, reloaded). Refuses an
    unhealthy cluster, a second learner, and an even count of voting members unless --force."""
    from runbook.procedures.membership_etcd import add_steps

    run_procedure(c, "etcd.add", lambda ctx: (new, add_steps(ctx, new)),
                  _etcd_checks(new, None, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the etcd member to remove (already taken out of the inventory)", **ETCD_HELP})
def etcd_remove(c, old, force=False, yes=False, dry=False, step=False, export=False):
    """Remove an etcd member (take it out of the inventory first): `member remove` through a remaining member
    (irreversible; its ID goes to the ledger, a resumed run never removes twice), its certificate dropped from
    state/pki, every host's endpoint lists updated. Refuses fewer than three or an even count unless --force."""
    from runbook.procedures.membership_etcd import remove_steps

    run_procedure(c, "etcd.remove", lambda ctx: (old, remove_steps(ctx, old)),
                  _etcd_checks(None, old, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the etcd member to replace (taken out of the inventory; may be dead)",
            "with_": "the new etcd host (in the inventory with roles: [etcd], a bare host)", **ETCD_HELP})
def etcd_replace(c, old, with_, force=False, yes=False, dry=False, step=False, export=False):
    """Replace an etcd member, e.g. a dead host, by a new one: etcd.remove OLD then etcd.add NEW in one
    resumable operation (quorum checked first; the old member removed exactly once), then every host's
    endpoint lists. Edit the inventory first: OLD out, NEW in with roles: [etcd]."""
    from runbook.procedures.membership_etcd import replace_steps

    run_procedure(c, "etcd.replace", lambda ctx: (f"{old}-{with_}", replace_steps(ctx, old, with_)),
                  _etcd_checks(with_, old, force), dry=dry, step=step, export=export, yes=yes)


@task(help={"old": "the PostgreSQL host that is gone (already taken out of the inventory)",
            "with_": "the new host (in the inventory with roles: [postgres], a bare host)", **COMMON_HELP})
def replace(c, old, with_, yes=False, dry=False, step=False, export=False):
    """Replace a PostgreSQL host that is gone for good: the new host installed by the install sections' steps
    and started as a replica once every host's pg_hba names it (OLD's address dropped), OLD's member key
    deleted from the DCS (irreversible), then a bounded wait until the new host is the sync standby.
    Edit the inventory first: OLD out, NEW in with roles: [postgres]."""
    from runbook.cluster.readers import members
    from runbook.procedures.membership_patroni import replace_precheck, replace_steps

    def checks(ctx):
        return replace_precheck(members(ctx), old)

    run_procedure(c, "patroni.replace", lambda ctx: (f"{old}-{with_}", replace_steps(ctx, old, with_)), checks,
                  dry=dry, step=step, export=export, yes=yes)
