"""Patroni's dynamic configuration: what the inventory wants in the DCS vs what `patronictl show-config` holds.

bootstrap.dcs in config.yml seeds the DCS only when the cluster is created; afterwards the DCS is changed
with `patronictl edit-config` (DESIGN, "Day 2"). `config_patch` is the generic part: the desired settings
against the current ones -> the smallest patch for `edit-config --apply -` (null removes a key), or {} when
the DCS is already in line. It runs on the host, shipped with its own source (stdlib only), so the unit
tests and the host execute the same code.
"""
from __future__ import annotations

import inspect
import json
import shlex
from typing import Any

from runbook.cluster.commands import patronictl
from runbook.cluster.context import Ctx
from runbook.inventory import Host, Inventory

# Maps the inventory owns entirely: an entry it does not list is removed from the DCS.
EXACT = ("slots",)


def desired_dynamic(inv: Inventory) -> dict[str, Any]:
    """The dynamic settings the runbook manages after bootstrap: permanent slots (opt-in, empty by default)
    and max_slot_wal_keep_size (a bound on the WAL any slot may retain)."""
    return {"slots": {name: {"type": "physical"} for name in inv.cluster.permanent_slots},
            "postgresql": {"parameters": {"max_slot_wal_keep_size": inv.cluster.max_slot_wal_keep_size}}}


def config_patch(current: Any, desired: dict, exact: tuple = (), _path: str = "",
                 _inside_exact: bool = False) -> dict:
    """The patch that turns *current* into *desired* for the keys *desired* names ({} = nothing to do).

    A None in *desired* means "absent". Under a dotted path listed in *exact* (and everything below it)
    keys that *desired* does not name are removed too; elsewhere they are left alone. Scalars compare as
    text, as Patroni's own patch_config does (8GB == '8GB', 5 == '5')."""
    current = current if isinstance(current, dict) else {}
    patch: dict = {}
    for key, want in desired.items():
        path = f"{_path}{key}"
        exact_here = _inside_exact or path in exact
        have = current.get(key)
        if want is None:
            if key in current:
                patch[key] = None
        elif isinstance(want, dict):
            if exact_here and not want:
                if have is not None:
                    patch[key] = None  # the whole map goes
            elif not isinstance(have, dict):
                patch[key] = want
            else:
                sub = config_patch(have, want, exact, path + ".", exact_here)
                if exact_here:
                    sub.update({k: None for k in have if k not in want})
                if sub:
                    patch[key] = sub
        elif key not in current or str(have) != str(want):
            patch[key] = want
    return patch


_DRIVER = r'''
import json, subprocess, sys, yaml
mode, ctl = sys.argv[1], shlex.split(sys.argv[2])
desired, exact = json.loads(sys.argv[3]), tuple(json.loads(sys.argv[4]))
def current():
    r = subprocess.run(ctl + ["show-config"], capture_output=True, text=True, timeout=60)
    if r.returncode:
        sys.exit("patronictl show-config failed: " + r.stderr.strip()[-300:])
    return yaml.safe_load(r.stdout) or {}
patch = config_patch(current(), desired, exact)
if not patch:
    print("the DCS holds the desired dynamic configuration")
    sys.exit(0)
print("differs from the desired dynamic configuration: " + json.dumps(patch, sort_keys=True))
if mode == "check":
    sys.exit(1)
r = subprocess.run(ctl + ["edit-config", "--force", "--quiet", "--apply", "-"], input=json.dumps(patch),
                   capture_output=True, text=True, timeout=60)
if r.returncode:
    sys.exit("patronictl edit-config failed: " + (r.stderr or r.stdout).strip()[-300:])
left = config_patch(current(), desired, exact)
if left:
    sys.exit("the DCS still differs after edit-config: " + json.dumps(left, sort_keys=True))
print("applied with patronictl edit-config")
'''


def remote_script() -> str:
    """config_patch's own source plus a driver: `python -c SCRIPT check|apply PATRONICTL DESIRED EXACT`."""
    return "from __future__ import annotations\nimport shlex\n" + inspect.getsource(config_patch) + _DRIVER


def dynamic_command(ctx: Ctx, mode: str, desired: dict | None = None, exact: tuple = EXACT) -> str:
    """The command (run as postgres) that checks (rc 1 when the DCS differs) or applies the desired config."""
    if mode not in ("check", "apply"):
        raise ValueError(f"mode must be check or apply, not {mode!r}")
    want = desired_dynamic(ctx.inventory) if desired is None else desired
    args = [mode, patronictl(ctx, ""), json.dumps(want, sort_keys=True), json.dumps(list(exact))]
    return f"{ctx.paths.patroni_venv}/bin/python -c {shlex.quote(remote_script())} " + \
        " ".join(shlex.quote(a) for a in args)


def dynamic_check(ctx: Ctx, host: Host) -> str:
    """patroni.dynamic's probe: rc 0 when `patronictl show-config` holds the desired settings."""
    return f"sudo -u postgres sh -c {shlex.quote(dynamic_command(ctx, 'check'))}"


def dynamic_undo(ctx: Ctx, host: Host) -> list:
    # Nothing to revert: putting an unused slot back would only retain WAL again; the DCS keeps its config.
    return []
