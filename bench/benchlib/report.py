"""The benchmark's console and its figures table (shared by the phase modules)."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from . import now

con = Console(highlight=False, width=160)
results: list[tuple[str, str, str]] = []  # (section, figure, value) for the final table


def say(msg: str) -> None:
    con.print(f"[dim]{now()}[/] {msg}")


def record(section: str, figure: str, value: str) -> None:
    results.append((escape(section), escape(figure), escape(value)))
    con.print(f"  [bold]{escape(section)}[/] {escape(figure)}: {escape(value)}")
