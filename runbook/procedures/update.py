"""`inv cluster.update`: a rolling update of a running cluster from a newer bundle, as ledger steps.

The survey reads what each host runs and the plan (runbook.procedures.update_plan) keeps only what differs
from the bundle. The steps: the bundle verified and pushed (the install section's own steps), then per
plan item one step on one host: etcd members one at a time (the others healthy first, the leader last);
Patroni under `patronictl pause` (pause, each host's venv from the bundle's wheelhouse and a Patroni
restart that leaves PostgreSQL running, resume); PostgreSQL packages replicas first (refuse the leader,
the others healthy, lag 0, CHECKPOINT, Patroni stopped, the bundle's exact packages, Patroni started,
streaming and sync standby again), a switchover, then the old leader. Last, the install steps whose
fingerprint names the bundle (etcd.binaries, patroni.wheels, postgres.packages) are recorded again.

One operation: its id (and the plan, recorded when it starts) are on the control machine's rows
`membership:cluster-update:cluster` and `cluster.update:plan`. A run killed in the middle resumes the same
plan: done steps are skipped, an interrupted one is decided by its check, and the resume step runs in
any case once the hosts are done. Before any member is stopped, its step checks that the others are
healthy: an interrupted update never leaves two members down at once.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable

from runbook.cluster.commands import etcdctl, member_ok, patronictl, psql
from runbook.cluster.context import Ctx
from runbook.cluster.readers import etcd_status, members, patronictl_any
from runbook.cluster.render import member_name
from runbook.core.engine import Report
from runbook.core.step import Local, Run, Section, Step, wait_for
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.membership_ops import OP_HOST, op_key, operation_id, run_operation
from runbook.procedures.membership_patroni import _as_postgres, _role_is, refuse_leader
from runbook.procedures.update_plan import (
    BundleFacts,
    HostFacts,
    Item,
    Plan,
    parse_dpkg,
    parse_etcd_version,
    parse_patroni_version,
    plan_update,
)
from runbook.sections.frontdoor import restart_patroni_held
from runbook.sections.bundle_files import CONFIGURE_PENDING, manifest, remote

ORDER = 70
OP, TARGET = "cluster-update", "cluster"
PLAN_KEY = "cluster.update:plan"
MARK_DIR = "/var/lib/pg-ha-runbook"  # update-<kind>: the operation id whose install finished on this host
SYNC_WAIT = 300


# -- survey --------------------------------------------------------------------------------------------
def bundle_facts(ctx: Ctx) -> BundleFacts:
    m = manifest(ctx)
    patroni = next((w.version for w in m.wheels() if w.name == "patroni"), "")
    return BundleFacts({e.name: e.version for e in m.debs(ctx.inventory.cluster.os)}, patroni, m.etcd_version)


def survey(ctx: Ctx, bundle: BundleFacts) -> tuple[dict[str, HostFacts], str | None, str | None]:
    """(facts per host, the Patroni leader's host, the etcd leader's host): read-only probes."""
    facts: dict[str, HostFacts] = {}
    names = " ".join(shlex.quote(n) for n in sorted(bundle.debs))
    fmt = shlex.quote("${Package} ${Version} ${db:Status-Abbrev}\n")
    for h in ctx.inventory.postgres:
        r = ctx.transport.run(h, f"dpkg-query -W -f={fmt} {names} 2>/dev/null; echo; "
                                 f"{ctx.paths.patroni_venv}/bin/patroni --version 2>/dev/null || true", timeout=60)
        facts[h.name] = HostFacts(debs=parse_dpkg(r.stdout), patroni=parse_patroni_version(r.stdout))
    for h in ctx.inventory.etcd:
        r = ctx.transport.run(h, f"{ctx.paths.etcd_bin_dir}/etcd --version 2>/dev/null | head -1", timeout=30)
        old = facts.get(h.name, HostFacts())
        facts[h.name] = HostFacts(old.debs, old.patroni, parse_etcd_version(r.stdout))
    try:
        lead = next((m.name for m in members(ctx) if m.is_leader), None)
    except RuntimeError:
        lead = None
    pg_leader = next((h.name for h in ctx.inventory.postgres if member_name(h) == lead), None)
    eps, _ = etcd_status(ctx)
    etcd_leader = next((h.name for e in eps if e.leader for h in ctx.inventory.etcd
                        if e.endpoint.split("//")[-1].split(":")[0] == h.name), None)
    return facts, pg_leader, etcd_leader


def paused(ctx: Ctx) -> bool:
    """Is the Patroni cluster in maintenance mode (`pause: true` in the DCS)?"""
    import yaml

    try:
        return bool((yaml.safe_load(patronictl_any(ctx, "show-config")) or {}).get("pause"))
    except RuntimeError as exc:
        raise ProcedureFailed(str(exc), 1) from None


def make_plan(ctx: Ctx, reinstall: bool) -> Plan:
    bundle = bundle_facts(ctx)
    facts, pg_leader, etcd_leader = survey(ctx, bundle)
    from dataclasses import replace

    from runbook.bundle.manifest import manifest_sha256

    allow = bool(ctx.settings and ctx.settings.allow_downgrade)
    plan = plan_update(bundle, facts, etcd_hosts=[h.name for h in ctx.inventory.etcd],
                       pg_hosts=[h.name for h in ctx.inventory.postgres], pg_leader=pg_leader,
                       etcd_leader=etcd_leader, major=ctx.inventory.cluster.postgres_major, reinstall=reinstall,
                       allow_downgrade=allow)
    return replace(plan, bundle=manifest_sha256(ctx.bundle_dir), bundle_dir=str(ctx.bundle_dir))


# -- steps ---------------------------------------------------------------------------------------------
def _on(name: str):
    return lambda ctx, hosts: [h for h in hosts if h.name == name]


def _step(sec: Section, item: Item, role: str, doc: str, fn: Callable, check: Callable, **kw) -> Step:
    fn.__doc__ = doc
    s = sec.step(item.step, role=role, only=None if role == "local" else _on(item.host), **kw)(fn)
    s.check(check)
    return s


def _paused_sh(ctx: Ctx) -> str:
    return _as_postgres(f"{patronictl(ctx, 'show-config')} | grep -qx 'pause: true'")


def _others_healthy_sh(ctx: Ctx, host: Host) -> str:
    """rc 0 when every other member is the running leader or streams, and there is a leader (from the DCS:
    works while this host's own Patroni is down)."""
    py = ("import json,sys; ms=json.load(sys.stdin); o=[m for m in ms if m['Member'] != sys.argv[1]]; "
          "bad=[m['Member']+' '+m.get('State','') for m in o if not (m.get('State') in ('running','streaming'))]; "
          "lead=[m for m in ms if m.get('Role')=='Leader' and m.get('State')=='running']; "
          "print('; '.join(bad) or ('no running leader' if not lead else ''), file=sys.stderr); "
          "sys.exit(1 if bad or not lead else 0)")
    return (f"{_as_postgres(patronictl(ctx, 'list -f json'))} | {ctx.paths.patroni_venv}/bin/python -c "
            f"{shlex.quote(py)} {member_name(host)}")


def _lag_zero_sh(ctx: Ctx, host: Host) -> str:
    py = ("import json,sys; m={x['Member']: x for x in json.load(sys.stdin)}.get(sys.argv[1]) or {}; "
          "lag=m.get('Lag in MB', m.get('Replay Lag', m.get('Receive Lag', 0))); "
          "sys.exit(0 if m.get('State')!='streaming' or lag in (0, '0', None, '') else 1)")
    return (f"{_as_postgres(patronictl(ctx, 'list -f json'))} | {ctx.paths.patroni_venv}/bin/python -c "
            f"{shlex.quote(py)} {member_name(host)}")


def _back_sh(ctx: Ctx, host: Host) -> str:
    """rc 0 when the member streams again and, in synchronous mode, is a sync standby."""
    if ctx.inventory.cluster.patroni.synchronous_mode:
        return _as_postgres(_role_is(ctx, host, "Sync Standby"))
    return _as_postgres(member_ok(ctx, host))


def etcd_step(sec: Section, ctx: Ctx, item: Item) -> Step:
    from runbook.sections.etcd import binaries

    others = ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd if h.name != item.host)
    every = ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd)
    version = manifest(ctx).etcd_version

    def actions(ctx: Ctx, h: Host) -> list:
        return [Run(f"{etcdctl(ctx, h, 'endpoint health', others)} >/dev/null || {{ echo 'the other etcd members "
                    f"are not all healthy: not restarting {h.name}' >&2; exit 3; }}"),
                *binaries.actions_fn(ctx, h),
                Run("systemctl restart etcd", timeout=120),
                Run(wait_for(etcdctl(ctx, h, "endpoint health", every), 90, 2), timeout=150)]

    def check(ctx: Ctx, h: Host) -> str:
        return (f"{ctx.paths.etcd_bin_dir}/etcd --version | grep -qF 'etcd Version: {version}' && "
                f"{etcdctl(ctx, h, 'endpoint health', every)} >/dev/null")

    return _step(sec, item, "etcd", f"etcd on {item.host}: {item.what}\nThe other members healthy first; the "
                 "bundle's binaries installed, etcd restarted, then every member healthy again.", actions, check)


def patroni_step(sec: Section, ctx: Ctx, item: Item) -> Step:
    from runbook.sections.patroni import wheels

    version = bundle_facts(ctx).patroni
    cluster = ctx.inventory.cluster.name

    def running_version(h: Host) -> str:
        return _as_postgres(f"{patronictl(ctx, f'version {cluster} {member_name(h)}')} | "
                            f"grep -qF '{member_name(h)}: Patroni {version} '")

    def actions(ctx: Ctx, h: Host) -> list:
        back = Run(wait_for(f"{_as_postgres(member_ok(ctx, h))} && {running_version(h)}", 120, 2), timeout=180)
        return [Run(f"{_paused_sh(ctx)} || {{ echo 'the cluster is not paused: not restarting Patroni on {h.name} "
                    "(the pause step comes first)' >&2; exit 3; }"),
                *wheels.actions_fn(ctx, h), *restart_patroni_held(ctx, h, back, timeout=180)]

    def check(ctx: Ctx, h: Host) -> str:
        return (f"{ctx.paths.patroni_venv}/bin/patroni --version | grep -qx 'patroni {version}' && "
                f"{_as_postgres(member_ok(ctx, h))} && {running_version(h)}")

    return _step(sec, item, "postgres", f"Patroni on {item.host}: {item.what}\nUnder pause: the venv from the "
                 "bundle's wheelhouse (offline, hashes checked), Patroni restarted while PostgreSQL keeps "
                 "running; then the member runs the new Patroni.", actions, check)


def pause_step(sec: Section, ctx: Ctx, item: Item) -> Step:
    def actions(ctx: Ctx, h: Host) -> list:
        def run() -> str:
            if paused(ctx):
                return "already paused"
            patronictl_any(ctx, "pause --wait")
            return "paused"
        return [Local("patronictl pause --wait", run, key="pause")]

    return _step(sec, item, "local", "Pause the Patroni cluster (maintenance mode)\nNo failover while Patroni "
                 "restarts; PostgreSQL keeps running.", actions, lambda ctx, h: paused(ctx))


def resume_step(sec: Section, ctx: Ctx, item: Item) -> Step:
    def actions(ctx: Ctx, h: Host) -> list:
        def run() -> str:
            if not paused(ctx):
                return "not paused"
            patronictl_any(ctx, "resume --wait")
            return "resumed"
        return [Local("patronictl resume --wait", run, key="resume")]

    return _step(sec, item, "local", "Resume the Patroni cluster (maintenance mode off)\nRuns in any resumed "
                 "run of the update until done: the cluster is never left paused by it.", actions,
                 lambda ctx, h: not paused(ctx))


def switchover_step(sec: Section, ctx: Ctx, item: Item, old_leader: str, candidate: str | None) -> Step:
    from runbook.procedures.switchover import do_switchover

    def leader_moved(ctx: Ctx, h: Host) -> bool:
        try:
            lead = next((m.name for m in members(ctx) if m.is_leader), None)
        except RuntimeError:
            return False
        return lead is not None and lead != member_name(ctx.inventory.get(old_leader))

    def actions(ctx: Ctx, h: Host) -> list:
        def run() -> str:
            if leader_moved(ctx, h):
                return "the leader is already an updated member"
            return str(do_switchover(ctx, candidate))
        return [Local(f"switchover from {old_leader}" + (f" to {candidate}" if candidate else ""), run,
                      key=f"{old_leader}>{candidate}")]

    return _step(sec, item, "local", f"Switch over from {old_leader} to an updated sync standby\nPre-checks "
                 "(sync standby, lag 0, etcd healthy) and post-checks of `inv patroni.switchover`.",
                 actions, leader_moved)


def postgres_step(sec: Section, ctx: Ctx, item: Item, op_id: str, reinstall: bool) -> Step:
    m = manifest(ctx)
    entries = [e for e in m.debs(ctx.inventory.get(item.host).os) if e.name in item.packages]
    versions = {e.name: e.version for e in entries}
    files = " ".join(remote(e) for e in entries)
    sums = "".join(f"{e.sha256}  {remote(e)}\n" for e in entries).encode()
    mark = f"{MARK_DIR}/update-postgres"
    same = "" if reinstall and item.what.startswith("same version") else "--skip-same-version "
    pins = " ".join(shlex.quote(f"{n}={v}") for n, v in sorted(versions.items()))
    # every listed package fully installed ("ii") at the bundle's version
    installed = (f"( for p in {pins}; do [ \"$(dpkg-query -W -f='${{Version}} ${{db:Status-Abbrev}}' \"${{p%%=*}}\")\" "
                 f"= \"${{p#*=}} ii \" ] || exit 1; done )")

    def actions(ctx: Ctx, h: Host) -> list:
        pg_running = "systemctl is-active -q patroni"
        return [Run(refuse_leader(ctx, h, "cluster.update (the leader is updated after the switchover)")),
                Run(f"if {_paused_sh(ctx)}; then echo 'the cluster is paused: stopping Patroni would leave PostgreSQL "
                    "running; resume it first (patronictl resume)' >&2; exit 3; fi"),
                Run(f"{_others_healthy_sh(ctx, h)} || {{ echo 'the other members are not all healthy: not stopping "
                    f"{h.name} (two members would be down)' >&2; exit 3; }}"),
                Run(f"if {pg_running}; then {wait_for(_lag_zero_sh(ctx, h), 60, 1)}; fi", timeout=120),
                Run(f"if {pg_running}; then {_as_postgres(psql(ctx, '-c CHECKPOINT'))} >/dev/null; fi", timeout=300),
                Run("systemctl stop patroni", timeout=300),
                Run(wait_for("! pgrep -u postgres -x postgres", 60, 1), timeout=90),
                Run("sha256sum --quiet -c -", stdin=sums),
                Run("log=$(mktemp /tmp/runbook-dpkg.XXXXXX); for i in $(seq 150); do "
                    f"DEBIAN_FRONTEND=noninteractive dpkg -i {same}{files} "
                    f">$log 2>&1 && {CONFIGURE_PENDING}; grep -q 'lock was locked by another process' $log || break; "
                    "sleep 2; done; tail -20 $log >&2; exit 1", timeout=1800),
                Run(f"install -d -m 0755 {MARK_DIR} && echo {shlex.quote(op_id)} > {mark}"),
                Run("systemctl start patroni", timeout=120),
                Run(wait_for(_back_sh(ctx, h), SYNC_WAIT, 2), timeout=SYNC_WAIT + 60)]

    def check(ctx: Ctx, h: Host) -> str:
        return (f"[ \"$(cat {mark} 2>/dev/null)\" = {shlex.quote(op_id)} ] && {installed} && "
                f"systemctl is-active -q patroni && {_back_sh(ctx, h)}")

    return _step(sec, item, "postgres", f"PostgreSQL packages on {item.host}: {item.what}\nRefuses the leader; "
                 "the others healthy, lag 0, CHECKPOINT, Patroni (and PostgreSQL) stopped, the bundle's exact "
                 "packages installed, Patroni started, then a bounded wait until it streams and is the sync "
                 "standby again.", actions, check,
                 irreversible=f"replaces the PostgreSQL packages on {item.host} by the bundle's; going back needs "
                              "the older bundle and runbook.allow_downgrade")


def update_steps(ctx: Ctx, plan: Plan, op_id: str, reinstall: bool) -> list[Step]:
    """The steps of one update: bundle.verify and bundle.push, one step per plan item, then the install
    steps that name the bundle, so that `cluster.up` afterwards finds them done."""
    from runbook.sections import push as push_sec
    from runbook.sections.etcd import binaries
    from runbook.sections.patroni import wheels
    from runbook.sections.postgres import packages

    sec = Section("cluster.update", ORDER, "a rolling update from the bundle")
    steps: list[Step] = [push_sec.verify, push_sec.push]
    pg = [i for i in plan.items if i.kind == "postgres"]
    old_leader = pg[-1].host if any(i.kind == "switchover" for i in plan.items) else None
    candidate = next((i.host for i in pg if i.host != old_leader), None)
    for item in plan.items:
        if item.kind == "etcd":
            steps.append(etcd_step(sec, ctx, item))
        elif item.kind == "pause":
            steps.append(pause_step(sec, ctx, item))
        elif item.kind == "patroni":
            steps.append(patroni_step(sec, ctx, item))
        elif item.kind == "resume":
            steps.append(resume_step(sec, ctx, item))
        elif item.kind == "switchover" and old_leader:
            steps.append(switchover_step(sec, ctx, item, old_leader, candidate))
        elif item.kind == "postgres":
            steps.append(postgres_step(sec, ctx, item, op_id, reinstall))
    kinds = {i.kind for i in plan.items}
    steps += [s for s, k in ((binaries, "etcd"), (wheels, "patroni"), (packages, "postgres")) if k in kinds]
    return steps  # run_operation puts the operation id in the procedure's own steps' fingerprints


# -- the operation -------------------------------------------------------------------------------------
def current_plan(ctx: Ctx, reinstall: bool, replan: bool = False) -> tuple[Plan, str, bool]:
    """(plan, operation id, resumed): an interrupted update resumes with the plan it recorded. `replan`: the
    interrupted one is closed (recorded as abandoned) and a new survey plans from what the hosts run now,
    e.g. to repair with another bundle after a failed install."""
    op_id, resumed = operation_id(ctx, OP, TARGET)
    if resumed and replan and not ctx.options.dry:
        ctx.ledger.event(OP_HOST, op_key(OP, TARGET), "operation", f"abandon {op_id} (--replan)")
        ctx.ledger.set(OP_HOST, op_key(OP, TARGET), "done", note=f"abandoned {op_id}", mode="procedure")
        op_id, resumed = operation_id(ctx, OP, TARGET)
    elif resumed and replan:
        return make_plan(ctx, reinstall), op_id + "-replan", False
    if resumed:
        rec = ctx.ledger.get(OP_HOST, PLAN_KEY)
        if rec is not None and rec.note:
            plan = Plan.from_json(rec.note)
            _same_bundle(ctx, plan)
            return plan, op_id, True
    return make_plan(ctx, reinstall), op_id, False


def _same_bundle(ctx: Ctx, plan: Plan) -> None:
    """A resumed update installs from the bundle it was planned from, not another one."""
    from runbook.bundle.manifest import BundleError, manifest_sha256

    try:
        now = manifest_sha256(ctx.bundle_dir)
    except (BundleError, OSError):
        now = ""
    if plan.bundle and now != plan.bundle:
        raise ProcedureFailed(f"the interrupted cluster.update was planned from the bundle {plan.bundle_dir} "
                              f"(manifest.json sha256 {plan.bundle[:16]}...), not {ctx.bundle_dir}: finish it with "
                              f"`inv cluster.update --bundle {plan.bundle_dir}`, or plan again from what the hosts "
                              "run now with --replan", 2)


def run_update(ctx: Ctx, plan: Plan, op_id: str, resumed: bool, steps: list[Step]) -> Report:
    """Record the plan (a resumed run reads it back), then run the steps as one operation."""
    if not ctx.options.dry:
        ctx.ledger.set(OP_HOST, PLAN_KEY, "done", note=plan.to_json(), mode="procedure")
        ctx.ledger.event(OP_HOST, op_key(OP, TARGET), "plan", "; ".join(f"{i.step}: {i.what}" for i in plan.items))
    report, _, _ = run_operation(ctx, OP, TARGET, steps, known=(op_id, resumed))
    return report
