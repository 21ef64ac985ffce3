"""The runbook's sections, in the walk-through's order. Each module declares a `section`."""
from __future__ import annotations

from importlib import import_module

from runbook.core.step import Section, Step

MODULES = ("push", "etcd", "postgres", "patroni", "verify", "backup", "pooler", "balancer")


def sections() -> list[Section]:
    out = [import_module(f"{__name__}.{m}").section for m in MODULES]
    return sorted(out, key=lambda s: s.order)


def all_steps() -> list[Step]:
    return [s for sec in sections() for s in sec.steps]


def section_steps(name: str) -> list[Step]:
    for sec in sections():
        if sec.name == name:
            return list(sec.steps)
    raise KeyError(name)
