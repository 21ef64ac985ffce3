"""The engine: decide per (host, step) from the ledger and reality, run, record, stop on failure."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from runbook.core.batch import CheckBatch
from runbook.core.context import RunContext
from runbook.core.files import UNDO_DIR, files_backup
from runbook.core.identity import read_identities, voided
from runbook.core.offline import NOT_CONTACTED, ledger_noop
from runbook.core.schedule import plan_order, run_graph
from runbook.core.step import Action, Local, Put, Run, Step, Upload
from runbook.core.transport import TransportError
from runbook.errors import RunbookError
from runbook.inventory import LOCAL, Host


class RunFailed(RunbookError):
    exit_code = 1

    """A step failed on at least one host; str() is the summary with what to do next."""


class Quit(RunbookError):
    exit_code = 4

    """The operator answered quit in --step mode."""


@dataclass
class Decision:
    host: Host
    step: Step
    run: bool
    label: str  # done | will run | changed | interrupted | drifted | manual | skipped
    reason: str
    actions: list[Action]
    fp: str


@dataclass
class Report:
    executed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    plan: list[Decision] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # e.g. a host that is a new machine
    # {step: (wave, the steps it needs)} when the steps run by their needs (not a day-2 procedure in list order)
    order: dict[str, tuple[int, list[str]]] = field(default_factory=dict)


def evaluate_check(ctx: RunContext, step: Step, host: Host, actions: list[Action] | None = None,
                   checks: CheckBatch | None = None) -> bool | None:
    """True/False from the step's probe of reality (its files' derived check and its hand-written one);
    None when the step has neither. `checks`: the answers --verify took in one batch per host."""
    if checks is not None:
        taken = checks.take(host, step)
        if taken is not None:
            return taken
    probe = step.probe(ctx, host, actions)
    if probe is None or isinstance(probe, bool):
        return probe
    r = ctx.transport_for(host).run(host, probe, timeout=300, lock=True)
    return r.ok


def decide(ctx: RunContext, step: Step, host: Host, checks: CheckBatch | None = None) -> Decision:
    got = checks.take_rendered(host, step) if checks is not None else None  # --verify: rendered for its batch
    if got is None:
        actions = step.actions_fn(ctx, host)
        fp = step.fingerprint(ctx, host, actions)
    else:
        actions, fp = got
    rec = ctx.ledger.get(host.name, step.name)

    def d(run: bool, label: str, reason: str) -> Decision:
        return Decision(host, step, run, label, reason, actions, fp)

    if rec is not None and rec.status in ("done", "manual", "running") and voided(ctx, host, rec.machine):
        return d(True, "new machine", f"{host.name} is a new machine (its /etc/machine-id changed): "
                                      "the record is void")
    if rec is None or rec.status in ("pending", "rolled_back"):
        return d(True, "will run", "not done yet" if rec is None else rec.status.replace("_", " "))
    if rec.status == "failed":
        return d(True, "will run", "failed before: " + (rec.error or "")[-80:].strip())
    if rec.status == "running":
        ok = evaluate_check(ctx, step, host, actions, checks)  # read-only probes: dry runs may ask them too
        if ok:
            if not ctx.options.dry:
                ctx.ledger.set(host.name, step.name, "done", fingerprint=fp, mode="check",
                               note="interrupted run; check found the effect present")
            return d(False, "done", "interrupted, but the check found it done")
        return d(True, "interrupted", "an interrupted run left it half done")
    # done or manual
    if rec.status == "manual":
        return d(False, "manual", f"done by hand{': ' + rec.note if rec.note else ''}")
    if rec.fingerprint != fp:
        return d(True, "changed", "its rendered actions changed since it was done")
    if ctx.options.verify or (step.always_check and not ctx.options.dry):
        ok = evaluate_check(ctx, step, host, actions, checks)
        if ok is False:
            return d(True, "drifted", "done, but the check says reality drifted")
        return d(False, "done", "done and verified" if ok else "done (no check)")
    return d(False, "done", "done with the same fingerprint")


def execute(ctx: RunContext, dec: Decision, mode: str = "auto") -> str | None:
    """Run one (host, step); return None on success or the error text. Records everything."""
    host, step, led = dec.host, dec.step, ctx.ledger
    tr = ctx.transport_for(host)
    t0 = time.time()
    led.set(host.name, step.name, "running", fingerprint=dec.fp, mode=mode)
    try:
        keep = files_backup(dec.actions) if host.name != LOCAL.name else None
        if keep:  # the originals of the files about to be replaced, for the derived undo
            r = tr.run(host, keep, timeout=300, lock=True)
            led.event(host.name, step.name, "backup", "keep the originals of the step's files", r.rc,
                      r.stdout, r.stderr)
            if not r.ok:
                why = f"keeping the originals under {UNDO_DIR} failed: {(r.stderr or r.stdout).strip()[-300:]}"
                led.set(host.name, step.name, "failed", error=why, started=t0, mode=mode)
                return why
        for a in dec.actions:
            err = _act(ctx, tr, host, step, a)
            if err:
                led.set(host.name, step.name, "failed", error=err, started=t0, mode=mode)
                return err
        if evaluate_check(ctx, step, host, dec.actions) is False:
            err = "the actions ran but the step's check still fails"
            led.event(host.name, step.name, "check", "check", 1)
            led.set(host.name, step.name, "failed", error=err, started=t0, mode=mode)
            return err
    except TransportError as exc:
        led.set(host.name, step.name, "failed", error=str(exc), started=t0, mode=mode)
        return str(exc)
    led.set(host.name, step.name, "done", fingerprint=dec.fp, started=t0, mode=mode)
    return None


def _act(ctx: RunContext, tr, host: Host, step: Step, a: Action) -> str | None:
    t = time.time()
    led = ctx.ledger
    if isinstance(a, Run):
        r = tr.run(host, a.cmd, user=a.user, stdin=a.stdin, timeout=a.timeout, lock=True)
        led.event(host.name, step.name, "run", a.describe(), r.rc, r.stdout, r.stderr, round(time.time() - t, 3))
        if not r.ok:
            tail = (r.stderr.strip() or r.stdout.strip())[-600:]
            return f"`{ctx.redact(a.cmd)[:200]}` exited {r.rc}: {ctx.redact(tail)}"
    elif isinstance(a, Put):
        changed = tr.put(host, a.path, a.content, mode=a.mode, owner=a.owner, group=a.group)
        led.event(host.name, step.name, "put", a.describe(), 0, "changed" if changed else "unchanged",
                  duration=round(time.time() - t, 3))
    elif isinstance(a, Upload):
        if tr.remote_sha256(host, a.path) == a.sha256:
            led.event(host.name, step.name, "upload", a.describe(), 0, "present with the right sha256")
            return None
        tr.upload(host, a.src, a.path, mode=a.mode, owner=a.owner)
        got = tr.remote_sha256(host, a.path)
        led.event(host.name, step.name, "upload", a.describe(), 0 if got == a.sha256 else 1, "sent",
                  duration=round(time.time() - t, 3))
        if got != a.sha256:
            return f"{a.path}: sha256 on the host is {got}, expected {a.sha256}; the copy was damaged"
    elif isinstance(a, Local):
        try:
            out = a.fn() or ""
        except Exception as exc:  # a local failure is reported like a remote one
            led.event(host.name, step.name, "local", a.describe(), 1, "", str(exc))
            return f"{a.label}: {exc}"
        led.event(host.name, step.name, "local", a.describe(), 0, out, duration=round(time.time() - t, 3))
    return None


def _ask(ctx: RunContext, step: Step, decs: list[Decision]) -> str:
    answer = ctx.options.answer(step.name) if ctx.options.answer else ctx.observer.ask_step(step, decs, ctx.redact)
    for d in decs:
        ctx.ledger.event(d.host.name, step.name, "answer", f"--step answer: {answer}")
    return answer


def failure_summary(step: Step, errors: dict[str, str], report: Report, stopped: list[str] | None = None) -> str:
    """What failed where, what was not started, what to do. `stopped`: with dependency scheduling, the steps
    not started because they need a failed one (None: the run went in order and stopped at this step)."""
    lines = [f"step {step.name} failed on {len(errors)} host(s):"]
    for host, err in sorted(errors.items()):
        lines.append(f"  {host}: {err}")
    if stopped is None:
        where = f"{len(report.executed)} (host, step) pair(s) ran in this run before it; nothing after {step.name} " \
                "was started."
    else:
        where = f"{len(report.executed)} (host, step) pair(s) ran in this run; the steps that need it were not " \
                f"started ({', '.join(stopped) or 'none'})."
    lines.append(f"{where} Fix the cause, then run the same command again: done steps are skipped and each host "
                 "resumes where it stopped (`inv runbook.history` shows the output).")
    return "\n".join(lines)


def apply(ctx: RunContext, steps: list[Step], selected: list[Host], in_order: bool = False) -> Report:
    """Run `steps` on the selected hosts. A plain run starts every step once the steps it needs are done
    (runbook.core.schedule: sections that do not need each other overlap); --dry, --step and --verify walk
    them one at a time in order, and so does a day-2 procedure (in_order): its steps come from several
    sections and its list order is its plan (etcd.add.start before etcd.start on the new member). A failure
    stops what needs the failed step; the run then fails."""
    report = Report()
    if not in_order:
        report.order = plan_order(steps)  # also says a Step.needs that points forward, before any work
    notice = getattr(ctx.observer, "notice", None)
    noop = ledger_noop(ctx, steps, selected)
    if noop is not None:  # nothing to do by the ledger: no host is contacted (see runbook.core.offline)
        report.plan = noop
        report.skipped = [(d.host.name, d.step.name, d.reason) for d in noop]
        if any(d.host.name != LOCAL.name for d in noop):
            report.notices.append(NOT_CONTACTED)
            if notice:
                notice(NOT_CONTACTED)
        return report
    run = _Run(ctx, steps, selected, report)
    if in_order or ctx.options.dry or ctx.options.step or ctx.options.verify:
        for i, step in enumerate(steps):
            errors = run.step(i)
            if errors:
                raise RunFailed(failure_summary(step, errors, report))
        return report
    failed, blocked = run_graph(steps, run.step)
    if failed:
        raise RunFailed("\n".join(failure_summary(steps[i], errs, report, [steps[j].name for j in sorted(blocked)])
                                  for i, errs in sorted(failed.items())))
    return report


class _Run:
    """One apply(): the per-step work (decide, ask, run, record), called in order or by the scheduler."""

    def __init__(self, ctx: RunContext, steps: list[Step], selected: list[Host], report: Report):
        self.ctx, self.steps, self.selected, self.report = ctx, steps, selected, report
        self.asking = ctx.options.step
        self.notice = getattr(ctx.observer, "notice", None)
        self.batch = CheckBatch() if ctx.options.verify else None
        self.gate = threading.BoundedSemaphore(max(1, ctx.options.parallel))  # host work of all steps at once
        self._hosts: dict[str, tuple[int, list[Host]]] = {}

    def stamp(self) -> int:
        """What has run so far: an answer taken at the same stamp still stands."""
        return len(self.report.executed) + len(self.report.failed)

    def hosts(self, step: Step) -> list[Host]:
        """step.hosts(), asked once while nothing runs: a step whose hosts the cluster decides (`only=`, e.g.
        patroni.roles on the current leader) asks patronictl once, not for the batch and again at its turn."""
        stamp = self.stamp()
        got = self._hosts.get(step.name)
        if got is not None and got[0] == stamp:
            return got[1]
        hosts = step.hosts(self.ctx, self.selected)
        self._hosts[step.name] = (stamp, hosts)
        return hosts

    def step(self, i: int) -> dict[str, str]:
        """Decide and run steps[i] on its hosts; {host: error} of the hosts where it failed."""
        ctx, step, report = self.ctx, self.steps[i], self.report
        hosts = self.hosts(step)
        if not hosts:
            return {}
        # Each host's identity is read once, when a step first reaches it (a local step that fails first,
        # e.g. a bad bundle, touches no host); with --verify in the same remote execution as its checks.
        texts = []
        if self.batch is not None and any(h.name != LOCAL.name for h in hosts):
            texts = self.batch.prepare(ctx, self.steps[i:], self.selected, stamp=self.stamp(), hosts_of=self.hosts)
        for text in texts + read_identities(ctx, hosts):
            report.notices.append(text)
            if self.notice:
                self.notice(text)
        decs = _decide_all(ctx, step, hosts, self.batch)
        report.plan.extend(decs)
        todo = [d for d in decs if d.run]
        report.skipped.extend((d.host.name, step.name, d.reason) for d in decs if not d.run)
        if ctx.options.dry:
            return {}
        if not todo:
            _drop_superseded(ctx, step, hosts, self.selected)
            return {}
        if self.asking:
            answer = _ask(ctx, step, todo)
            if answer == "quit":
                raise Quit(f"stopped by the operator before {step.name}; run the same command to resume")
            if answer == "skip":
                report.skipped.extend((d.host.name, step.name, "skipped by the operator") for d in todo)
                return {}
            if answer == "continue":
                self.asking = False
        errors = _run_step(ctx, step, todo, "step" if ctx.options.step else "auto", self.gate)
        for d in todo:
            if d.host.name in errors:
                report.failed.append((d.host.name, step.name, errors[d.host.name]))
            else:
                report.executed.append((d.host.name, step.name))
        if not errors:
            _drop_superseded(ctx, step, hosts, self.selected)
        return errors


def _drop_superseded(ctx: RunContext, step: Step, targets: list[Host], selected: list[Host]) -> None:
    """A step that narrows its role's hosts (`only=`, e.g. patroni.roles on the current leader) may move: once
    it is done on its targets, a record it left unfinished on another host of the role (rolled back, failed,
    interrupted) no longer stands for anything to do there, and is dropped, with an event saying why."""
    if step.only is None:
        return
    names = {h.name for h in targets}
    chosen = {h.name for h in selected}
    for h in ctx.inventory.role(step.role):
        if h.name in names or h.name not in chosen:
            continue
        rec = ctx.ledger.get(h.name, step.name)
        if rec is not None and rec.status not in ("done", "manual"):
            ctx.ledger.forget(h.name, step.name)
            ctx.ledger.event(h.name, step.name, "superseded",
                             f"{step.name} now runs on {', '.join(sorted(names))}: the {rec.status} record of "
                             f"{h.name} is dropped")


def _decide_all(ctx: RunContext, step: Step, hosts: list[Host], checks: CheckBatch | None) -> list[Decision]:
    """Decide for every host; checks are remote probes, so they run in parallel like the actions."""
    if len(hosts) == 1 or (checks is not None and checks.answers(hosts, step)):  # nothing to ask: no threads
        return [decide(ctx, step, h, checks) for h in hosts]
    with ThreadPoolExecutor(max_workers=max(1, min(ctx.options.parallel, len(hosts)))) as pool:
        return list(pool.map(lambda h: decide(ctx, step, h, checks), hosts))


def _run_step(ctx: RunContext, step: Step, todo: list[Decision], mode: str,
              gate: threading.BoundedSemaphore | None = None) -> dict[str, str]:
    errors: dict[str, str] = {}
    gate = gate or threading.BoundedSemaphore(max(1, ctx.options.parallel))

    def gated(d: Decision) -> str | None:
        with gate:  # runbook.parallel bounds the hosts worked on at once, over every step in flight
            return execute(ctx, d, mode)

    with ctx.observer.step_progress(step, [d.host.name for d in todo]) as progress:
        if step.kind == "serial":  # todo is in Step.hosts() order
            for d in todo:
                err = gated(d)
                progress(d.host.name, err)
                if err:
                    errors[d.host.name] = err
                    break
            return errors
        # parallel and barrier: every host at once (a barrier step needs them all started together)
        workers = len(todo) if step.kind == "barrier" else max(1, min(ctx.options.parallel, len(todo)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            run = (lambda d: execute(ctx, d, mode)) if step.kind == "barrier" else gated  # a barrier starts all
            futures = {pool.submit(run, d): d for d in todo}
            for fut in as_completed(futures):
                d = futures[fut]
                try:
                    err = fut.result()
                except Exception as exc:  # a bug or an unexpected transport error: fail that host only
                    err = f"{type(exc).__name__}: {exc}"
                    ctx.ledger.set(d.host.name, step.name, "failed", error=err)
                progress(d.host.name, err)
                if err:
                    errors[d.host.name] = err
    return errors
