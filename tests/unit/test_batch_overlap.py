"""--verify's batches (runbook.core.batch): each host's checks are rendered in that host's own worker, so one
host's rendering (templates, certificates: CPU in this process) overlaps the other hosts' round trips instead of
all of it coming before the first batch is sent; the answers are the same."""
from __future__ import annotations

import threading

from runbook.core.engine import apply
from runbook.core.step import Run, Section


def _steps(started: threading.Event, waited: list[bool]):
    sec = Section("ov", 4, "")

    def actions(ctx, h):
        if h.name == "node02":  # rendering node02 waits (bounded) until a batch of another host went out
            waited.append(started.wait(10))
        return [Run(f"echo {h.name}")]

    st = sec.step("one", role="postgres")(actions)
    st.check(lambda ctx, h: f"check one {h.name}")
    return sec.steps


def test_a_host_batch_goes_out_while_another_host_is_still_rendered(ctx, inv):
    started, waited = threading.Event(), []
    started.set()
    apply(ctx, _steps(started, []), inv.postgres)  # done on both
    ctx.ledger.release("ok")
    ctx.ledger.acquire("verify", [])
    started.clear()
    real = ctx.transport._batch

    def batch(host, script, parts):
        if host.name == "node01":
            started.set()
        return real(host, script, parts)

    ctx.transport._batch = batch
    ctx.options.verify = True
    report = apply(ctx, _steps(started, waited), inv.postgres)
    assert waited and all(waited)  # node01's batch was sent while node02 was being rendered
    assert sorted(ctx.transport.batches) == [("node01", 1), ("node02", 1)]
    assert report.executed == [] and {d.reason for d in report.plan} == {"done and verified"}
