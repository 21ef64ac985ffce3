"""Benchmark the lab: cold and warm `lab.up` of the inventory's hosts, and `lab.down` (not a test).

    sudo .venv/bin/python bench/lab_up.py [--inventory hosts.yml] [--rounds 3] [--force]

cold        : no host disks (base tree cached): create overlays, keys, users, boot, wait for SSH
warm        : everything already up (the idempotent no-op the e2e fixture relies on)
reboot      : down --keep-disks then up: boot existing disks
down        : stop, unmount, delete netns/links/bridge and disks
The base tree build (first run on a machine, ~1 min) is done before timing and not counted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.inventory import load_inventory
from runbook.lab import lab
from runbook.lab.base import ensure_base_tree


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inventory", default=str(Path(__file__).resolve().parents[1] / "hosts.yml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="tear down a lab that is already up")
    args = ap.parse_args()
    con = Console(highlight=False)
    inv = load_inventory(args.inventory)
    if any(state != "absent" for _, _, state, _ in lab.status(inv)) and not args.force:
        con.print("[red]the lab of this inventory exists; the benchmark tears it down: rerun with --force[/]")
        return 2
    ensure_base_tree(log=con.print)
    figures: dict[str, list[float]] = {"cold up": [], "warm up": [], "reboot (kept disks)": [], "down": []}
    lab.down(inv)
    for r in range(args.rounds):
        figures["cold up"].append(timed(lambda: lab.up(inv)))
        figures["warm up"].append(timed(lambda: lab.up(inv)))
        lab.down(inv, keep_disks=True)
        figures["reboot (kept disks)"].append(timed(lambda: lab.up(inv)))
        figures["down"].append(timed(lambda: lab.down(inv)))
        con.print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in figures.items()))
    t = Table(title=f"lab of {len(inv.hosts)} hosts ({inv.path}), {args.rounds} round(s)", title_justify="left")
    for col in ("phase", "median s", "min s", "max s"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    for k, v in figures.items():
        t.add_row(k, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}")
    con.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
