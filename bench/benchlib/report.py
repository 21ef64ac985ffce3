"""The benchmark's console and its figures table (shared by the phase modules)."""
from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import now

con = Console(highlight=False, width=160)
results: list[tuple[str, str, str]] = []  # (section, figure, value) for the final table


def say(msg: str) -> None:
    con.print(f"[dim]{now()}[/] {msg}")


def record(section: str, figure: str, value: str) -> None:
    results.append((escape(section), escape(figure), escape(value)))
    con.print(f"  [bold]{escape(section)}[/] {escape(figure)}: {escape(value)}")


def finish(script: str, a, lab_down) -> None:
    """Print every recorded figure as one table, then tear the script's lab down unless --keep."""
    t = Table(title=f"{script} on {a.inventory} (load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)",
              title_justify="left")
    for c in ("section", "figure", "value"):
        t.add_column(c)
    for row in results:
        t.add_row(*row)
    con.print(t)
    if not a.keep:
        say("tearing the lab down (inv lab.down) ...")
        lab_down(a.inventory, a.state)
