"""Dependency scheduling (runbook.core.schedule): steps start once what they need is done, sections that do
not need each other overlap, a failure stops only what needs it, and a resume after a kill in the overlap."""
from __future__ import annotations

import threading
import time

import pytest

from runbook.core.engine import RunFailed, apply
from runbook.core.schedule import NeedsError, needs_of
from runbook.core.step import Run, Section


def _chains(spans: dict, fail: set[str] = frozenset(), delay: float = 0.15):
    """Section a (etcd hosts): a.one -> a.two; section b (postgres hosts): b.one needs only a.zero (local),
    b.two; c.join needs a.two and b.two. Each action sleeps `delay` and records its span per (step, host)."""
    mu = threading.Lock()

    def act(name):
        def fn(ctx, h):
            def go():
                t0 = time.monotonic()
                time.sleep(delay)
                with mu:
                    spans[(name, h.name)] = (t0, time.monotonic())
                if name in fail:
                    raise RuntimeError(f"{name} broke")
                return None
            from runbook.core.step import Local
            return [Local(f"{name} on {h.name}", go)] if h.name == "local" else [Run(f"do {name} {h.name}")]
        return fn

    zero = Section("a0", 1, "")
    zero.step("zero", role="local")(act("a0.zero"))
    a = Section("a", 2, "")
    a.step("one", role="etcd")(act("a.one"))
    a.step("two", role="etcd")(act("a.two"))
    b = Section("b", 3, "")
    b.step("one", role="postgres", needs=("a0.zero",))(act("b.one"))
    b.step("two", role="postgres")(act("b.two"))
    c = Section("c", 4, "")
    c.step("join", role="postgres", needs=("a.two", "b.two"))(act("c.join"))
    return zero.steps + a.steps + b.steps + c.steps


def _timed(ctx, spans, fail=frozenset(), delay=0.15, overlap: threading.Event | None = None):
    """Answer `do STEP HOST` after `delay`, recording its span. `overlap`: a.one waits (up to 10 s) until
    b.one has started, and fails if it never does: the two sections must run at the same time."""
    lock = threading.Lock()

    def slow(host, cmd):
        name = cmd.split()[1]
        t0 = time.monotonic()
        if overlap is not None and name == "b.one":
            overlap.set()
        if overlap is not None and name == "a.one" and not overlap.wait(10):
            return 1
        time.sleep(delay)
        with lock:
            spans[(name, host.name)] = (t0, time.monotonic())
        return 1 if name in fail else 0

    ctx.transport.on(r"^do ", slow)


def test_needs_default_to_the_step_before_in_the_section():
    steps = _chains({})
    names = [s.name for s in steps]
    got = {names[i]: sorted(names[j] for j in d) for i, d in needs_of(steps).items()}
    assert got == {"a0.zero": [], "a.one": ["a0.zero"], "a.two": ["a.one"], "b.one": ["a0.zero"],
                   "b.two": ["b.one"], "c.join": ["a.two", "b.two"]}
    # a need outside the run is met; with none left, the step follows the one before it
    sub = [s for s in steps if s.section != "a0"]
    got = {sub[i].name: sorted(sub[j].name for j in d) for i, d in needs_of(sub).items()}
    assert got["b.one"] == ["a.two"] and got["a.one"] == []


def test_a_need_on_a_later_step_is_refused_up_front():
    sec = Section("x", 1, "")
    sec.step("early", role="etcd", needs=("x.late",))(lambda c, h: [])
    sec.step("late", role="etcd")(lambda c, h: [])
    with pytest.raises(NeedsError, match="x.early needs x.late, which comes after it"):
        needs_of(sec.steps)


def test_independent_sections_overlap_and_no_step_starts_before_its_needs(ctx, inv):
    spans: dict = {}
    _timed(ctx, spans, overlap=threading.Event())  # a.one fails unless b.one starts while it runs
    steps = _chains(spans)
    report = apply(ctx, steps, inv.hosts)
    assert len(report.executed) == 1 + 3 + 3 + 2 + 2 + 2
    needs = needs_of(steps)
    ends = {}
    for (name, _), (_t0, t1) in spans.items():
        ends[name] = max(ends.get(name, 0), t1)
    for i, d in needs.items():
        for j in d:  # every host of the needed step finished before any host of this one started
            first_start = min(t0 for (n, _), (t0, _) in spans.items() if n == steps[i].name)
            assert first_start >= ends[steps[j].name], (steps[i].name, steps[j].name)


def test_a_failure_stops_its_dependants_only(ctx, inv):
    spans: dict = {}
    _timed(ctx, spans, fail={"a.one"})
    with pytest.raises(RunFailed) as exc:
        apply(ctx, _chains(spans), inv.hosts)
    st = {(c.host, c.step): c.status for c in ctx.ledger.all()}
    assert st[("etcd01", "a.one")] == "failed"
    assert not any(s in ("a.two", "c.join") for _, s in st)  # what needs it never started
    assert {st[(h, "b.two")] for h in ("node01", "node02")} == {"done"}  # the other section went on
    msg = str(exc.value)
    assert "step a.one failed on 3 host(s)" in msg and "not started (a.two, c.join)" in msg


def test_resume_after_a_kill_in_the_overlap(ctx, inv):
    """A kill while a.two and b.one were both running: each resumes by its check, the rest runs."""
    spans: dict = {}
    _timed(ctx, spans)
    steps = _chains(spans)
    for s in steps:  # checks: a.two's effect is present, b.one's is not
        s.check_fn = (lambda c, h, n=s.name: f"probe {n} {h.name}")
    ctx.transport.on(r"^probe b\.one", lambda h, c: 0 if ("b.one", h.name) in spans else 1)
    apply(ctx, steps[:3], inv.hosts)  # a0.zero, a.one, a.two done ...
    led = ctx.ledger
    for h in ("etcd01", "etcd02", "etcd03"):
        led.set(h, "a.two", "running")  # ... but the kill came before their records said so
    for h in ("node01", "node02"):
        led.set(h, "b.one", "running")
    spans.clear()
    ctx.ledger.identities.clear()
    report = apply(ctx, steps, inv.hosts)
    ran = sorted(report.executed)
    assert [e for e in ran if e[1] == "a.two"] == []  # its check found it done
    assert [e for e in ran if e[1] == "b.one"] == [("node01", "b.one"), ("node02", "b.one")]
    assert ("node01", "c.join") in ran and {c.status for c in led.all()} == {"done"}


def test_runbook_parallel_bounds_the_hosts_worked_on_at_once(ctx, inv):
    ctx.options.parallel = 2
    busy, peak, mu = [0], [0], threading.Lock()

    def slow(host, cmd):
        with mu:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.05)
        with mu:
            busy[0] -= 1
        return 0

    ctx.transport.on(r"^do ", slow)
    apply(ctx, _chains({}), inv.hosts)
    assert peak[0] == 2


def test_a_procedure_walks_its_steps_in_list_order(ctx, inv):
    """in_order (day-2 procedures): no overlap even where the needs would allow it; each step starts after the
    one before it in the list has finished on every host."""
    spans: dict = {}
    _timed(ctx, spans)
    steps = _chains(spans)
    apply(ctx, steps, inv.hosts, in_order=True)
    order = [s.name for s in steps]
    first = {n: min(t0 for (m, _), (t0, _) in spans.items() if m == n) for n in order if n != "a0.zero"}
    last = {n: max(t1 for (m, _), (_, t1) in spans.items() if m == n) for n in order if n != "a0.zero"}
    walked = [n for n in order if n != "a0.zero"]
    for before, after in zip(walked, walked[1:], strict=False):
        assert first[after] >= last[before], (before, after)  # b.one did not overlap a.one, a.two
