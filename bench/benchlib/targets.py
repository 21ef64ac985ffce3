"""Issue 16's targets, printed as a ratio next to each target (never asserted: a bench prints figures).

Each script records what it measured here; `report()` prints one "targets" row per figure with the ratio,
the target and whether this run met it.
"""
from __future__ import annotations

from .report import record


def target(what: str, value: float, limit: float, *, unit: str = "x", at_least: bool = False) -> None:
    """record("targets", ...): `value` against `limit` (at most, or at least with at_least)."""
    met = value >= limit if at_least else value <= limit
    op = ">=" if at_least else "<="
    shown = f"{value:.2f}{unit}" if unit == "x" else f"{value:.2f} {unit}"
    record("targets", f"{what} (target {op} {limit:g}{unit if unit == 'x' else ' ' + unit})",
           f"{shown}  {'met' if met else 'NOT met'}")


def critical_path(rows: list[dict], since: float = 0.0) -> tuple[float, list[str]]:
    """The longest chain of declared needs (runbook.core.schedule) through the steps of one run, each step
    costing what the ledger recorded: its slowest host (parallel, barrier) or the sum (serial). Returns
    (seconds, the steps on it)."""
    from runbook.core.schedule import needs_of
    from runbook.sections import all_steps

    cost: dict[str, list[float]] = {}
    for r in rows:
        if r["duration"] is not None and (r["started"] or 0) >= since:
            cost.setdefault(r["step"], []).append(r["duration"])
    steps = all_steps()
    needs = needs_of(steps)
    best: dict[int, tuple[float, list[str]]] = {}
    for i, s in enumerate(steps):
        xs = cost.get(s.name, [])
        c = (sum(xs) if s.kind == "serial" else max(xs)) if xs else 0.0
        before = max((best[j] for j in needs[i]), key=lambda b: b[0], default=(0.0, []))
        best[i] = (before[0] + c, before[1] + [s.name])
    return max(best.values(), key=lambda b: b[0], default=(0.0, []))
