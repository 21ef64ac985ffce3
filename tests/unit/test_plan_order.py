"""The plan table shows the dependency order: per step its wave and the steps it needs (runbook.core.schedule);
a day-2 procedure, which runs in list order, shows no waves."""
from __future__ import annotations

from runbook import console as ui
from runbook.core.engine import apply
from runbook.core.schedule import plan_order, waves
from runbook.core.step import Run, Section


def _steps():
    """a.one -> a.two (etcd); b.one needs only a.one (postgres), b.two; c.join needs a.two and b.two."""
    a, b, c = Section("a", 1, ""), Section("b", 2, ""), Section("c", 3, "")
    for sec, name, role, needs in ((a, "one", "etcd", None), (a, "two", "etcd", None),
                                   (b, "one", "postgres", ("a.one",)), (b, "two", "postgres", None),
                                   (c, "join", "postgres", ("a.two", "b.two"))):
        sec.step(name, role=role, needs=needs)(lambda ctx, h, n=name: [Run(f"do {n} {h.name}")])
    return a.steps + b.steps + c.steps


def test_waves_follow_the_needs_not_the_list_order():
    steps = _steps()
    assert waves(steps) == {0: 1, 1: 2, 2: 2, 3: 3, 4: 4}
    order = plan_order(steps)
    assert order["b.one"] == (2, ["a.one"])  # beside a.two, not after it
    assert order["c.join"] == (4, ["a.two", "b.two"])
    assert order["a.one"] == (1, [])


def _rendered(report) -> list[str]:
    with ui.console.capture() as cap:
        ui.console.print(ui.plan_table(report, "Plan"), width=200)
    return cap.get().splitlines()


def test_dry_plan_table_shows_wave_and_needs_in_dependency_order(ctx, inv):
    ctx.options.dry = True
    report = apply(ctx, _steps(), inv.hosts)
    lines = _rendered(report)
    rows = [ln for ln in lines if any(s in ln for s in ("a.one", "a.two", "b.one", "b.two", "c.join"))
            and "│" in ln]
    cells = [[c.strip() for c in r.split("│")[1:4]] for r in rows]
    assert cells == [["a.one", "1", "-"], ["a.two", "2", "a.one"], ["b.one", "2", "a.one"],
                     ["b.two", "3", "b.one"], ["c.join", "4", "a.two, b.two"]]
    assert any("wave" in ln and "needs" in ln for ln in lines)


def test_a_procedure_in_list_order_has_no_waves(ctx, inv):
    ctx.options.dry = True
    report = apply(ctx, _steps(), inv.hosts, in_order=True)
    assert report.order == {}
    assert not any("wave" in ln for ln in _rendered(report))
