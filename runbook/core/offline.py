"""The no-op from the ledger alone: when the ledger records every (host, step) of a run as done with today's
fingerprint, the run contacts no host at all (no SSH connection, no identity probe, no check).

What is then NOT looked at (each host's /etc/machine-id, the checks of always-checked steps: bundle.push's
sizes on the hosts, bundle.verify's re-hash of the local bundle, which guards what a run sends, and this
one sends nothing) is what `--verify` probes; the run says so ("hosts not contacted"). As soon as one
(host, step) is not done, or cannot be decided without a host, the run takes the normal path, which reads
every host's identity first (a host re-created under the same name is recognised there).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runbook.core.context import RunContext
from runbook.core.ledger import Checkpoint
from runbook.core.step import Step
from runbook.core.transport import Result, Transport
from runbook.inventory import Host

NOT_CONTACTED = "hosts not contacted: the ledger says all done; --verify probes them"
UNFINISHED = ("running", "failed", "pending", "rolled_back")


class NeedsHost(BaseException):
    """Deciding needs a host. A BaseException: a section's `except Exception` around a probe (e.g. asking
    patronictl for the leader, with a fallback) must not swallow it and decide on the fallback."""


class OfflineTransport(Transport):
    """Refuses every remote call: what asks a host while the ledger-only pass runs is not a no-op."""

    def run(self, host: Host, cmd: str, *, user: str = "root", stdin: bytes | None = None,
            timeout: float = 900, lock: bool = False) -> Result:
        raise NeedsHost(host.name)

    def put(self, host: Host, path: str, content: bytes, *, mode: str = "0644", owner: str = "root",
            group: str | None = None) -> bool:
        raise NeedsHost(host.name)

    def remote_sha256(self, host: Host, path: str) -> str | None:
        raise NeedsHost(host.name)

    def read(self, host: Host, path: str) -> str | None:
        raise NeedsHost(host.name)

    def upload(self, host: Host, src: Path, path: str, *, mode: str = "0644", owner: str = "root") -> None:
        raise NeedsHost(host.name)


@contextmanager
def offline(ctx: RunContext) -> Iterator[None]:
    saved = ctx.transport
    ctx.transport = OfflineTransport()
    try:
        yield
    finally:
        ctx.transport = saved


def ledger_noop(ctx: RunContext, steps: list[Step], selected: list[Host]) -> list | None:
    """The decisions of a run that has nothing to do according to the ledger, made without any host; None
    when one (host, step) is not done with today's fingerprint, or when deciding it needs a host."""
    if ctx.options.verify:
        return None
    recs = {(r.host, r.step): r for r in ctx.ledger.all()}
    out: list = []
    with offline(ctx):
        try:
            for step in steps:
                decs = _step_noop(ctx, step, selected, recs)
                if decs is None:
                    return None
                out += decs
        except NeedsHost:
            return None
        except Exception:  # noqa: BLE001 - e.g. a missing bundle: the normal path reports it where it belongs
            return None
    return out


def _step_noop(ctx: RunContext, step: Step, selected: list[Host], recs: dict[tuple[str, str], Checkpoint]):
    from runbook.core.engine import Decision

    try:
        hosts = step.hosts(ctx, selected)
        cluster_chosen = False
    except NeedsHost:
        # The step's hosts are chosen by asking the cluster (`only=`, e.g. the current Patroni leader): such a
        # step's effect is cluster-wide, done once on whichever member was chosen then. From the ledger: none of
        # the role's hosts left it unfinished, and its latest application is done with today's fingerprint. An
        # older record on another member (the leader before a switchover, the roles' passwords before a
        # rotation re-applied them on the new leader) is history, not a step to do again.
        names = {h.name for h in selected}
        hosts = [h for h in ctx.inventory.role(step.role) if h.name in names]
        if any(recs.get((h.name, step.name)) and recs[(h.name, step.name)].status in UNFINISHED for h in hosts):
            return None
        hosts = [h for h in hosts if (h.name, step.name) in recs]
        if not hosts:
            return None
        hosts = [max(hosts, key=lambda h: recs[(h.name, step.name)].finished or 0.0)]
        cluster_chosen = True
    out = []
    for h in hosts:
        rec = recs.get((h.name, step.name))
        if rec is None or rec.status not in ("done", "manual"):
            return None
        actions = step.actions_fn(ctx, h)
        fp = step.fingerprint(ctx, h, actions)
        if rec.status == "manual":
            out.append(Decision(h, step, False, "manual", f"done by hand{': ' + rec.note if rec.note else ''}",
                                actions, fp))
            continue
        if rec.fingerprint != fp:
            return None
        reason = "done with the same fingerprint (host not contacted)"
        if cluster_chosen:
            reason = "done once for the cluster (host not contacted)"
        if step.always_check:  # nothing is sent in this run; a run that sends something checks it first
            reason = "done; checked by --verify and before anything is sent (not checked now)"
        out.append(Decision(h, step, False, "done", reason, actions, fp))
    return out
