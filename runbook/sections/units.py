"""Rendered files and systemd units: a template as a Put action, a unit installed and enabled, and undone."""
from __future__ import annotations

from runbook.cluster.render import render
from runbook.core.step import Put, Run


def template(name: str, path: str, ctx: dict, *, mode: str = "0644", owner: str = "root",
             group: str | None = None, secret: bool = False) -> Put:
    return Put(path, render(name, **ctx).encode(), mode=mode, owner=owner, group=group, secret=secret,
               source=f"templates/{name}")


def unit_actions(unit: str, put: Put) -> list:
    return [put, Run("systemctl daemon-reload"), Run(f"systemctl enable {unit}")]


def unit_undo(unit: str, path: str) -> list:
    return [Run(f"systemctl disable --now {unit} 2>/dev/null || true"), Run(f"rm -f {path}"),
            Run("systemctl daemon-reload")]
