"""Rendered files and systemd units: a template as a Put action, a unit installed and enabled, and undone."""
from __future__ import annotations

from dataclasses import replace

from runbook.cluster.render import render
from runbook.core.step import Put, Run


def template(name: str, path: str, ctx: dict, *, mode: str = "0644", owner: str = "root",
             group: str | None = None, secret: bool = False) -> Put:
    return Put(path, render(name, **ctx).encode(), mode=mode, owner=owner, group=group, secret=secret,
               source=f"templates/{name}")


def unit_actions(unit: str, put: Put) -> list:
    """The unit file (its undo restores or removes it, then reloads systemd), daemon-reload, enable."""
    return [replace(put, on_restore="systemctl daemon-reload"), Run("systemctl daemon-reload"),
            Run(f"systemctl enable {unit}")]


def unit_undo(unit: str) -> list:
    """What the file's own undo cannot say: stop and disable the service before its unit file goes."""
    return [Run(f"systemctl disable --now {unit} 2>/dev/null || true")]
