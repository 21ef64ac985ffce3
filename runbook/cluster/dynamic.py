"""Patroni's dynamic configuration: what the inventory wants in the DCS vs what `patronictl show-config` holds.

bootstrap.dcs in config.yml seeds the DCS only when the cluster is created; afterwards the DCS is changed
with `patronictl edit-config` (DESIGN, "Day 2"). `config_patch` is the generic part: the desired settings
against the current ones -> the smallest patch for `edit-config --apply -` (null removes a key), or {} when
the DCS is already in line. It runs on the host, shipped with its own source (stdlib only), so the unit
tests and the host execute the same code.
"""
from __future__ import annotations

import functools
import inspect
import json
import shlex
from typing import Any

from runbook.cluster.commands import member_verdict, patronictl, rest_verdicts, verdict_ok
from runbook.cluster.context import Ctx
from runbook.core.shared import shared
from runbook.inventory import Host, Inventory

# Maps the inventory owns entirely: an entry it does not list is removed from the DCS (a permanent slot it
# no longer names; a PostgreSQL parameter taken out of cluster.patroni.parameters goes back to its default).
EXACT = ("slots", "postgresql.parameters")

# The walk-through's PostgreSQL parameters (fixed for safety); cluster.patroni.parameters goes over them.
# Per-host ones (socket directory, certificate paths) are in each host's config file, never here.
WALKTHROUGH_PARAMETERS: dict[str, Any] = {
    "shared_buffers": "512MB", "wal_level": "replica", "wal_keep_size": "512MB", "max_connections": 100,
    "effective_cache_size": "1GB", "maintenance_work_mem": "256MB", "max_wal_senders": 5,
    "max_replication_slots": 5, "checkpoint_completion_target": 0.7, "log_connections": "on",
    "log_disconnections": "on", "log_statement": "ddl", "log_line_prefix": "%m [%p] %q%u@%d ",
    "logging_collector": "on", "log_destination": "stderr", "log_filename": "postgresql-%Y-%m-%d.log",
    "log_rotation_size": "100MB", "log_rotation_age": "1d", "log_min_duration_statement": -1,
    "log_min_error_statement": "error", "log_min_messages": "warning", "log_error_verbosity": "verbose",
    "log_hostname": "off", "log_duration": "off", "log_timezone": "Europe/Moscow", "timezone": "Europe/Moscow",
    "lc_messages": "C.UTF-8", "password_encryption": "scram-sha-256", "debug_print_parse": "off",
    "debug_print_rewritten": "off", "debug_print_plan": "off", "superuser_reserved_connections": 3,
    "synchronous_commit": "on", "synchronous_standby_names": "*", "hot_standby": "on", "compute_query_id": "on",
    # fix: TLS for PostgreSQL too (pg_hba accepts hostssl only)
    "ssl": "on",
}


def desired_dynamic(inv: Inventory, log_dir: str = "/data/log") -> dict[str, Any]:
    """The whole dynamic configuration the inventory wants (cluster.patroni over the walk-through's values):
    bootstrap.dcs of a new cluster and, for patroni.dynamic, the DCS of a running one. Permanent slots are
    opt-in (empty by default: an exact map); max_slot_wal_keep_size bounds the WAL any slot may retain.
    A parameter set to null in the inventory is absent (removed from the DCS)."""
    p = inv.cluster.patroni
    params: dict[str, Any] = {**WALKTHROUGH_PARAMETERS, "log_directory": log_dir,
                              "max_slot_wal_keep_size": inv.cluster.max_slot_wal_keep_size}
    if inv.backup is not None:  # WAL to the pgBackRest repository (runbook.sections.backup); restart: archive_mode
        params.update(archive_mode="on", archive_command=f"pgbackrest --stanza={inv.cluster.name} archive-push %p")
    params.update(p.parameters)
    return {"failsafe_mode": True, "ttl": p.ttl, "loop_wait": p.loop_wait, "retry_timeout": p.retry_timeout,
            "maximum_lag_on_failover": p.maximum_lag_on_failover, "synchronous_mode": p.synchronous_mode,
            "synchronous_mode_strict": p.synchronous_mode_strict,
            "synchronous_node_count": p.synchronous_node_count, "primary_start_timeout": 30,
            "slots": {name: {"type": "physical"} for name in inv.cluster.permanent_slots},
            "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": params}}


def bootstrap_dcs(inv: Inventory, log_dir: str) -> dict[str, Any]:
    """bootstrap.dcs for the template: the desired dynamic configuration, without null parameters or an
    empty slots map."""
    d = desired_dynamic(inv, log_dir)
    d["postgresql"]["parameters"] = {k: v for k, v in d["postgresql"]["parameters"].items() if v is not None}
    if not d["slots"]:
        del d["slots"]
    return d


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
print("applied with patronictl edit-config (a parameter that needs a restart: inv patroni.restart --pending)")
'''


@functools.lru_cache(maxsize=1)
def remote_script() -> str:
    """config_patch's own source plus a driver: `python -c SCRIPT check|apply PATRONICTL DESIRED EXACT`."""
    return "from __future__ import annotations\nimport shlex\n" + inspect.getsource(config_patch) + _DRIVER


def dynamic_command(ctx: Ctx, mode: str, desired: dict | None = None, exact: tuple = EXACT) -> str:
    """The command (run as postgres) that checks (rc 1 when the DCS differs) or applies the desired config."""
    if mode not in ("check", "apply"):
        raise ValueError(f"mode must be check or apply, not {mode!r}")
    want = desired_dynamic(ctx.inventory, ctx.paths.log_dir) if desired is None else desired
    args = [mode, patronictl(ctx, ""), json.dumps(want, sort_keys=True), json.dumps(list(exact))]
    return f"{ctx.paths.patroni_venv}/bin/python -c {shlex.quote(remote_script())} " + \
        " ".join(shlex.quote(a) for a in args)


def dynamic_verdict(ctx: Ctx) -> str:
    """rc 0 when the DCS's config as the REST API reads it (GET /cluster, then /config: what `patronictl
    show-config` prints, fresh from the DCS) holds the desired settings, compared by config_patch's own source
    in the distribution's python3 (runbook.cluster.commands.rest_get)."""
    want = desired_dynamic(ctx.inventory, ctx.paths.log_dir)
    return _verdict_source() + (
        "if '/cluster' not in got:\n    sys.exit('GET /cluster failed: /config may be up to loop_wait old')\n"
        f"patch = config_patch(got['/config'], json.loads({json.dumps(json.dumps(want, sort_keys=True))}), "
        f"tuple({list(EXACT)!r}))\n"
        "if patch:\n    print('differs from the desired dynamic configuration: ' + json.dumps(patch, sort_keys=True))\n"
        "sys.exit(1 if patch else 0)\n")


def patroni_probe(ctx: Ctx, host: Host) -> str:
    """The bootstrap host's REST reader for its checks: GET /cluster and /config once, then the verdicts
    `member` (a running leader or streaming replica: patroni.bootstrap) and `dynamic` (patroni.dynamic), as
    postgres (the client key is postgres's). Shared (runbook.core.shared): one interpreter and one TLS
    handshake for both checks in a --verify batch; on its own, each check runs it whole."""
    verdicts = {"member": member_verdict(host), "dynamic": dynamic_verdict(ctx)}
    return shared(f"sudo -u postgres {rest_verdicts(ctx, host, ['/cluster', '/config'], verdicts)}")


def dynamic_check(ctx: Ctx, host: Host) -> str:
    """patroni.dynamic's probe: rc 0 when the DCS holds the desired settings (patroni_probe's `dynamic`)."""
    return f"{patroni_probe(ctx, host)} | {verdict_ok('dynamic')}"


@functools.lru_cache(maxsize=1)
def _verdict_source() -> str:
    """config_patch's own source, runnable in an exec() (its annotations are never evaluated)."""
    return "from __future__ import annotations\n" + inspect.getsource(config_patch)


def apply_patch(current: Any, patch: dict) -> dict:
    """What `edit-config --apply` makes of *current* with *patch* (null removes a key), as Patroni does."""
    out = dict(current) if isinstance(current, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_patch(out[key], value)
        else:
            out[key] = value
    return out


def dcs_diff(current: Any, desired: dict, exact: tuple = EXACT, where: str = "DCS") -> str:
    """A unified diff of the DCS (as `patronictl show-config` prints it) against what it becomes once the
    desired settings are applied; "" when there is nothing to do."""
    import difflib

    import yaml

    patch = config_patch(current, desired, exact)
    if not patch:
        return ""
    dump = lambda d: yaml.safe_dump(d, sort_keys=True, default_flow_style=False).splitlines(True)  # noqa: E731
    return "".join(difflib.unified_diff(dump(current or {}), dump(apply_patch(current, patch)),
                                        f"{where} (patronictl show-config)", "inventory (cluster.patroni)"))


def dynamic_explain(ctx: Ctx, host: Host) -> list[str]:
    """--dry for patroni.dynamic: the DCS against the inventory as a diff (read-only: show-config)."""
    import yaml

    try:
        r = ctx.transport.run(host, patronictl(ctx, "show-config"), user="postgres", timeout=60)
    except Exception as exc:  # an unreachable host: the plan still shows, the diff says why
        return [f"--- {host.name}: DCS: cannot read ({exc})"]
    if not r.ok:
        return [f"--- {host.name}: patronictl show-config failed (a cluster not created yet takes "
                f"bootstrap.dcs): {(r.stderr or r.stdout).strip()[-200:]}"]
    try:
        current = yaml.safe_load(r.stdout) or {}
    except yaml.YAMLError as exc:
        return [f"--- {host.name}: patronictl show-config printed no YAML: {exc}"]
    diff = dcs_diff(current, desired_dynamic(ctx.inventory, ctx.paths.log_dir), EXACT, f"{host.name}: DCS")
    return [diff] if diff else []


def dynamic_undo(ctx: Ctx, host: Host) -> list:
    # Nothing to revert: putting an unused slot back would only retain WAL again; the DCS keeps its config.
    return []
