"""How the engine reports: a small interface that the Rich console implements (runbook.console.RichObserver).

The engine never prints; it tells its observer that a step starts on some hosts, that a host finished it,
and asks it (in --step mode) whether to run a step. The default observer is silent and refuses to ask.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Protocol

if TYPE_CHECKING:
    from runbook.core.engine import Decision
    from runbook.core.step import Step

HostDone = Callable[[str, "str | None"], None]  # (host, error or None)


class Observer(Protocol):
    def step_progress(self, step: "Step", hosts: list[str]) -> ContextManager[HostDone]: ...

    def ask_step(self, step: "Step", decisions: list["Decision"], mask: Callable[[str], str]) -> str:
        """yes | skip | continue | quit"""
        ...


class SilentObserver:
    """For library use and unit tests: no output; --step without an answer function quits."""

    @contextmanager
    def step_progress(self, step: "Step", hosts: list[str]) -> Iterator[HostDone]:
        yield lambda host, err: None

    def ask_step(self, step: "Step", decisions: list["Decision"], mask: Callable[[str], str]) -> str:
        return "quit"
