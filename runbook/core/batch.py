"""--verify in one remote execution per host: the host's identity and the checks of every step still ahead
on it, in one generated script (the checks side by side), hosts in parallel; each check's exit status is
parsed back into that (host, step)'s decision.

Same semantics as checking each step at its turn: the results stand only while nothing has changed. Once a
(host, step) ran in this run, the checks ahead are taken again (the next step that needs one builds a new
batch), so a check never answers for a state that an earlier step of this run has since changed.
A check missing from the answer (the script was cut short, the host dropped) is asked on its own, as before.

A step whose hosts the cluster decides (`only=` asking a host, e.g. patroni.roles on the current leader) is
asked alongside the batches, not before them: its check goes in the batch of every host of its role that
the ledger has it on, and only its chosen hosts' answers are ever taken.
"""
from __future__ import annotations

import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from runbook.core.context import RunContext
from runbook.core.identity import IDENTITY_CMD, note_identities
from runbook.core.offline import NeedsHost, offline
from runbook.core.shared import ENV as SHARED
from runbook.core.shared import run_once, to_share
from runbook.core.shared import uses as shared_uses
from runbook.core.step import Step
from runbook.core.transport import TransportError
from runbook.inventory import LOCAL, Host

CHECK_TIMEOUT = 300  # each check's own budget, as when it runs on its own
BATCH_TIMEOUT = 2 * CHECK_TIMEOUT  # a batch's: its shared probes', then its checks' (side by side)
_LINE = re.compile(r"^RUNBOOK-(ID|CHECK) (\d+) ?(.*)$")


class BatchScript(str):
    """The generated script, carrying its parts: (marker index, command). A fake transport (unit tests)
    answers each part by its own rules, exactly as if the parts had been sent one by one."""

    parts: list[tuple[int, str]]
    identity: bool


def batch_script(checks: list[str], identity: bool) -> BatchScript:
    lines = []
    if identity:
        lines.append(f"printf 'RUNBOOK-ID 0 %s\\n' \"$({IDENTITY_CMD} 2>/dev/null)\"")
    # The checks are read-only probes: they run side by side (the host's batch lasts as long as its slowest
    # check, not the sum); each reports on one short line (one write: lines never interleave). Each is read by
    # `eval` in a subshell of the batch's own shell (a check that does not parse fails alone, exit 2), not by
    # a `timeout sh -c` of its own: two process starts less per check. Their time budget is the batch's.
    def check(i: int, cmd: str) -> str:
        return f"( ( eval {shlex.quote(cmd)} ) </dev/null >/dev/null 2>&1; echo \"RUNBOOK-CHECK {i} $?\" ) &"

    # A command that two or more checks share (runbook.core.shared) runs once, first; the checks that read it
    # start when it has ended, the others at once. No temporary directory: each check runs it itself.
    body = []
    share = to_share(checks)
    readers = {i for i, cmd in enumerate(checks) if set(shared_uses(cmd)) & set(share)}
    if share:
        body.append(f"{SHARED}=$(mktemp -d 2>/dev/null) || {SHARED}=; export {SHARED}; "
                    f"[ -z \"${SHARED}\" ] || trap 'rm -rf \"${SHARED}\"' EXIT")
        body.append(f"( if [ -n \"${SHARED}\" ]; then")
        body += [f"  {run_once(k, cmd, CHECK_TIMEOUT)} &" for k, cmd in share.items()]
        body.append("  wait; fi")
        body += [f"  {check(i, cmd)}" for i, cmd in enumerate(checks) if i in readers]
        body.append("  wait ) &")
    body += [check(i, cmd) for i, cmd in enumerate(checks) if i not in readers]
    body.append("wait")
    # One budget for the batch: the shared probes' and then the checks' own (each as when it runs on its own).
    # When it runs out, `timeout` ends every check still running (its process group) and the batch says so:
    # a check without an answer then failed, as a check that outlives its budget on its own does.
    lines.append(f"timeout {BATCH_TIMEOUT} sh -c {shlex.quote(chr(10).join(body))}; "
                 "[ $? -ne 124 ] || echo RUNBOOK-TIMEOUT")
    s = BatchScript("\n".join(lines))
    s.parts = list(enumerate(checks))
    s.identity = identity
    return s


def parse_batch(out: str, count: int = 0) -> tuple[str | None, dict[int, int]]:
    """The script's stdout -> (machine-id or None, {check index: exit status}). After RUNBOOK-TIMEOUT, each of
    the `count` checks without an answer ran out of time: 124, as `timeout` says."""
    mid, rcs = None, {}
    timed_out = False
    for line in out.splitlines():
        line = line.strip()
        if line == "RUNBOOK-TIMEOUT":
            timed_out = True
            continue
        m = _LINE.match(line)
        if not m:
            continue
        if m.group(1) == "ID":
            mid = m.group(3).strip() or None
        elif m.group(3).strip().lstrip("-").isdigit():
            rcs[int(m.group(2))] = int(m.group(3))
    if timed_out:
        for i in range(count):
            rcs.setdefault(i, 124)
    return mid, rcs


@dataclass
class CheckBatch:
    """The checks taken for this run: {(host, step): passed}. `stamp` is what had run when they were taken."""

    results: dict[tuple[str, str], bool] = field(default_factory=dict)
    stamp: int = -1
    execs: int = 0  # remote executions it made (bench, tests)
    # (actions, fingerprint) of each (host, step) whose check was asked, rendered for the script at `stamp`:
    # the step's decision at its turn takes them instead of rendering again (nothing has run since)
    rendered: dict[tuple[str, str], tuple[list, str]] = field(default_factory=dict)

    def take(self, host: Host, step: Step) -> bool | None:
        """The batched answer for (host, step), once: None when there is none (ask the check itself)."""
        return self.results.pop((host.name, step.name), None)

    def take_rendered(self, host: Host, step: Step) -> tuple[list, str] | None:
        """(actions, fingerprint) of (host, step) as rendered for this batch, once; None: render them."""
        return self.rendered.pop((host.name, step.name), None)

    def answers(self, hosts: list[Host], step: Step) -> bool:
        """Does the batch hold the answer and the rendering of `step` on every one of `hosts`?"""
        return all((h.name, step.name) in self.results and (h.name, step.name) in self.rendered for h in hosts)

    def prepare(self, ctx: RunContext, steps: list[Step], selected: list[Host], stamp: int,
                hosts_of: Callable[[Step], list[Host]] | None = None) -> list[str]:
        """Ask, per host, every check the steps ahead will need, unless already asked since the last change
        (`stamp`). `hosts_of`: the engine's step.hosts() (it keeps what the cluster answered for the step's
        turn). Returns the identity notices (a host that is a new machine)."""
        if stamp == self.stamp:
            return []
        self.stamp, self.results, self.rendered = stamp, {}, {}
        hosts_of = hosts_of or (lambda step: step.hosts(ctx, selected))
        todo: dict[str, tuple[Host, list[Step]]] = {}  # per host, the steps whose check it is asked
        recs = {(r.host, r.step): r for r in ctx.ledger.all()}
        names = {h.name for h in selected}
        ask: list[Step] = []  # steps whose hosts the cluster decides: asked alongside the batches
        for step in steps:
            try:
                with offline(ctx):
                    step_hosts = hosts_of(step)
            except NeedsHost:
                ask.append(step)
                step_hosts = [h for h in ctx.inventory.role(step.role) if h.name in names]
            for h in step_hosts:
                rec = recs.get((h.name, step.name))
                if h.name == LOCAL.name or rec is None or rec.status not in ("done", "running"):
                    continue
                todo.setdefault(h.name, (h, []))[1].append(step)
        if not todo:
            for step in ask:
                hosts_of(step)
            return []
        asked = ctx.ledger.identities
        rendered: dict[tuple[str, str], tuple[list, str]] = {}

        def checks_of(h: Host, host_steps: list[Step]) -> list[tuple[Step, str]]:
            out = []
            for step in host_steps:
                actions = step.actions_fn(ctx, h)
                fp = step.fingerprint(ctx, h, actions)
                rendered[(h.name, step.name)] = (actions, fp)
                rec = recs[(h.name, step.name)]
                if rec.status == "done" and rec.fingerprint != fp:
                    continue  # changed: runs without a check
                probe = step.probe(ctx, h, actions)
                if isinstance(probe, str):
                    out.append((step, probe))
            return out

        def one(h: Host, host_steps: list[Step]) -> tuple[Host, str | None, bool, list[tuple[Step, str]], dict]:
            # rendered in the host's own worker: one host's rendering overlaps the other hosts' round trips
            checks = checks_of(h, host_steps)
            if not checks:
                return h, None, False, checks, {}  # nothing to ask there: its identity is read at its turn
            ident = h.name not in asked
            script = batch_script([c for _, c in checks], ident)
            try:
                r = ctx.transport_for(h).run(h, script, timeout=BATCH_TIMEOUT + 60, lock=True)
            except TransportError:
                return h, None, ident, checks, {}  # each check is asked on its own, and fails there as before
            mid, rcs = parse_batch(r.stdout, len(checks))
            return h, mid, ident, checks, rcs

        def cluster_hosts(step: Step) -> None:
            try:
                hosts_of(step)
            except Exception:  # noqa: BLE001 - asked again at the step's turn, and reported there
                pass

        with ThreadPoolExecutor(max_workers=max(1, min(ctx.options.parallel, len(todo) + len(ask)))) as pool:
            for step in ask:
                pool.submit(cluster_hosts, step)
            answers = list(pool.map(lambda hs: one(*hs), todo.values()))
        self.execs += sum(1 for _, _, _, checks, _ in answers if checks)
        self.rendered = rendered
        found = []
        for h, mid, ident, checks, rcs in answers:
            if ident:
                asked.setdefault(h.name, "")
                found.append((h, mid))
            for i, (step, _) in enumerate(checks):
                if i in rcs:
                    self.results[(h.name, step.name)] = rcs[i] == 0
        return note_identities(ctx, found)
