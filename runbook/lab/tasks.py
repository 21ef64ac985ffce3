"""`inv lab.*`: the inventory's hosts as air-gapped systemd hosts on this machine, and fault drills."""
from __future__ import annotations

import os
import time
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from runbook.console import make_console
from runbook.inventory import Inventory, InventoryError, load_inventory
from runbook.lab import lab
from runbook.lab.net import LabError

console = make_console()
STYLE = {"up": "green", "created": "green", "started": "green", "repaired": "yellow", "removed": "dim",
         "stopped": "dim", "down": "dim", "killed": "red", "partitioned": "red", "booting": "yellow"}


def _name(name: str, task_name: str) -> str:
    if name.startswith("-"):  # invoke hands `lab.kill --help` to the positional argument
        raise Exit(f"lab: {name!r} is not a host name; for help: inv --help lab.{task_name}", code=2)
    return name


def _lab(c) -> tuple[Inventory, Path]:
    """The inventory named by runbook.inventory and the lab's directory (runbook.lab_dir), validated."""
    from runbook.inventory.settings import SettingsError, settings_of

    try:
        s = settings_of(c)
        return load_inventory(s.inventory), s.lab_dir
    except (SettingsError, InventoryError) as exc:
        raise Exit(f"lab: {exc}", code=2) from None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise Exit("lab: needs root (mounts, network namespaces, systemd-nspawn); run it with sudo", code=2)


def _fail(exc: Exception) -> Exit:
    return Exit(f"lab: {exc}", code=1)


def _log(msg: str) -> None:
    console.print(f"[dim]{msg}[/]")


def _print_result(title: str, result: dict[str, str], t0: float) -> None:
    t = Table(title=f"{title} ({time.monotonic() - t0:.1f} s)", title_justify="left")
    t.add_column("host")
    t.add_column("result")
    for name, what in result.items():
        t.add_row(name, f"[{STYLE.get(what.split()[0], 'white')}]{what}[/]")
    console.print(t)


def _uptime(sec: float | None) -> str:
    if sec is None:
        return "-"
    m, s = divmod(int(sec), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@task(help={"hosts": "comma-separated host names to bring up (default: every host in the inventory)"})
def up(c, hosts=""):
    """Create and boot every inventory host (overlay disk, netns, systemd, sshd); wait for SSH. Idempotent."""
    _require_root()
    inv, root = _lab(c)
    t0 = time.monotonic()
    try:
        names = [h.name for h in inv.select(hosts)] if hosts else None
        result = lab.up(inv, names, log=_log, root=root)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    _print_result("lab.up", result, t0)


@task(help={"keep_disks": "keep the hosts' overlay disks (<runbook.lab_dir>/hosts/NAME/upper) for the next lab.up"})
def down(c, keep_disks=False):
    """Stop every lab host and remove its mounts, netns, links and bridge (and disks unless --keep-disks)."""
    _require_root()
    inv, root = _lab(c)
    t0 = time.monotonic()
    try:
        result = lab.down(inv, keep_disks=keep_disks, log=_log, root=root)
    except LabError as exc:
        raise _fail(exc) from None
    _print_result("lab.down", result, t0)


@task
def status(c):
    """Show every lab host: address, state (up, booting, partitioned, off, absent, stale) and uptime."""
    inv, root = _lab(c)
    t = Table(title=f"lab: {inv.path}", title_justify="left")
    for col in ("host", "address", "state", "uptime"):
        t.add_column(col)
    for name, address, state, uptime in lab.status(inv, root):
        t.add_row(name, address, f"[{STYLE.get(state.split()[0].rstrip(':'), 'yellow')}]{state}[/]", _uptime(uptime))
    console.print(t)


@task(help={"name": "the lab host to log in to", "command": "run this command instead of a login shell"})
def ssh(c, name, command=""):
    """SSH to a lab host with the lab key and known_hosts (host key checking on)."""
    name = _name(name, "ssh")
    inv, _ = _lab(c)
    try:
        h = inv.get(name)
        argv = lab.ssh_argv(inv, h, *([command] if command else []), batch=False)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    os.execvp(argv[0], argv)


@task(help={"name": "the lab host to power off hard (SIGKILL to its init; its disk is kept)"})
def kill(c, name):
    """Fault drill: hard power-off of one host (no shutdown, its NIC disappears); `lab.start` boots it again."""
    _require_root()
    name = _name(name, "kill")
    inv, root = _lab(c)
    try:
        what = lab.kill(inv, name, log=_log, root=root)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    console.print(f"{name}: [red]{what}[/]")


@task(help={"name": "the lab host to boot again on its existing disk"})
def start(c, name):
    """Boot one lab host again (disk as it was) and wait until sshd answers."""
    _require_root()
    name = _name(name, "start")
    inv, root = _lab(c)
    t0 = time.monotonic()
    try:
        what = lab.start(inv, name, log=_log, root=root)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    console.print(f"{name}: [green]{what}[/] ({time.monotonic() - t0:.1f} s)")


@task(help={"name": "the lab host to cut off the network (its bridge port goes down)"})
def partition(c, name):
    """Fault drill: isolate one host from every other host and from this machine (`lab.heal` undoes it)."""
    _require_root()
    name = _name(name, "partition")
    inv, root = _lab(c)
    try:
        lab.partition(inv, name, cut=True, root=root)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    console.print(f"{name}: [red]partitioned[/]")


@task(help={"name": "the partitioned lab host to reconnect"})
def heal(c, name):
    """Undo `lab.partition NAME`: the host's bridge port comes up again."""
    _require_root()
    name = _name(name, "heal")
    inv, root = _lab(c)
    try:
        lab.partition(inv, name, cut=False, root=root)
    except (LabError, InventoryError) as exc:
        raise _fail(exc) from None
    console.print(f"{name}: [green]healed[/]")


ns = Collection("lab", up, down, status, ssh, kill, start, partition, heal)
