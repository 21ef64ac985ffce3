"""Invoke glue: configuration, the run session (inventory, ledger, lock, transport) and task factories."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from invoke import task
from invoke.exceptions import Exit

from runbook import console as ui
from runbook.core.context import Ctx, Options
from runbook.core.engine import Quit, RunFailed, apply
from runbook.core.ledger import Ledger, LedgerLocked
from runbook.core.transport import SshTransport
from runbook.errors import RunbookError
from runbook.inventory import Inventory, InventoryError, load_inventory

logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # its tracebacks duplicate our TransportError

DEFAULTS = {"inventory": "hosts.yml", "state_dir": "state", "bundle_dir": "bundle", "parallel": 16}
# Every key the `runbook` config section may hold: the run settings above plus bundle.build's
# (runbook/bundle/tasks.py). Anything else is a typo that invoke would silently ignore.
BUNDLE_KEYS = ("etcd_url", "etcd_sha256", "wheel_python", "pip_index", "cache", "debian_mirror",
               "debian_security_mirror", "manifest_sha256", "allow_downgrade")
# invoke lets INVOKE_RUNBOOK_<KEY> override only the keys its config already has: the optional ones are
# present too, "" meaning unset (e.g. INVOKE_RUNBOOK_ALLOW_DOWNGRADE=1, INVOKE_RUNBOOK_MANIFEST_SHA256=...).
DEFAULTS.update({k: "" for k in BUNDLE_KEYS})
ALLOWED_KEYS = tuple(sorted(DEFAULTS))
CONFIG_FILES = (("_runtime", "_runtime_path"), ("_project", "_project_path"), ("_user", "_user_path"),
                ("_system", "_system_path"))

RUN_HELP = {
    "hosts": "comma-separated host names from the inventory (default: every host of the section)",
    "dry": "show the plan (steps x hosts) and diffs of rendered files; change nothing",
    "step": "ask before every step: yes / skip / continue-all / quit (answers are recorded)",
    "verify": "re-check done steps against reality and re-run what drifted",
}


def env_problems(environ=None) -> list[str]:
    """INVOKE_RUNBOOK_* variables invoke would crash on (a non-integer PARALLEL: invoke casts it to int
    while loading its config, before any task runs) or silently ignore (an unknown key)."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(k for k in environ if k.startswith("INVOKE_RUNBOOK_")):
        key = name.removeprefix("INVOKE_RUNBOOK_").lower()
        if key not in ALLOWED_KEYS:
            out.append(f"{name}: unknown setting{_did_you_mean(key)}; allowed: "
                       + ", ".join(f"INVOKE_RUNBOOK_{k.upper()}" for k in ALLOWED_KEYS))
        elif key == "parallel" and not environ[name].strip().isdigit():
            out.append(f"{name}={environ[name]!r}: not a whole number; give how many hosts to work on at "
                       "once, e.g. 16")
    return out


def check_env() -> None:
    """Called by tasks.py while invoke loads the collection, i.e. before invoke reads the environment."""
    found = env_problems()
    if found:
        raise Exit("error: " + "\n       ".join(found), code=2)


def _did_you_mean(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, ALLOWED_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _origin(c, key: str | None = None) -> str:
    """Where the runbook section (or runbook.<key>) comes from, for messages."""
    cfg = getattr(c, "config", None)
    if key and f"INVOKE_RUNBOOK_{key.upper()}" in os.environ:
        return f"INVOKE_RUNBOOK_{key.upper()}"
    for data, path in CONFIG_FILES:
        section = (getattr(cfg, data, None) or {}).get("runbook")
        if getattr(cfg, path, None) and isinstance(section, dict) and (key is None or key in section):
            return str(getattr(cfg, path))
    return "invoke config"


def _duplicate_keys(path: str) -> list[str]:
    """Duplicate keys in the runbook section of an invoke YAML file (invoke keeps the last silently)."""
    import yaml

    if not str(path).endswith((".yaml", ".yml")):
        return []
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []  # invoke itself read it; nothing more to say here
    out = []
    for k, v in (root.value if isinstance(root, yaml.MappingNode) else []):
        if k.value != "runbook" or not isinstance(v, yaml.MappingNode):
            continue
        first: dict[str, int] = {}
        for kk, _ in v.value:
            if kk.value in first:
                out.append(f"{path}:{kk.start_mark.line + 1}: runbook.{kk.value}: duplicate key (first at line "
                           f"{first[kk.value]}); invoke silently keeps the last one - delete one of them")
            first.setdefault(kk.value, kk.start_mark.line + 1)
    return out


def config_problems(c) -> list[str]:
    """Every problem with the `runbook` config section: not a mapping, unknown or duplicate keys, parallel."""
    cfg = c.config.get("runbook", {}) if hasattr(c, "config") else {}
    if cfg is None:
        return []
    if not hasattr(cfg, "keys"):
        return [f"{_origin(c)}: runbook: expected a mapping of settings ({', '.join(ALLOWED_KEYS)}), "
                f"got {type(cfg).__name__}"]
    out = []
    for _data, path in CONFIG_FILES:
        if getattr(getattr(c, "config", None), path, None):
            out += _duplicate_keys(getattr(c.config, path))
    for key in sorted(set(cfg.keys()) - set(ALLOWED_KEYS)):
        out.append(f"{_origin(c, key)}: runbook.{key}: unknown key{_did_you_mean(key)}; allowed: "
                   f"{', '.join(ALLOWED_KEYS)}")
    par = cfg.get("parallel", DEFAULTS["parallel"])
    if isinstance(par, bool) or not (isinstance(par, int) or (isinstance(par, str) and par.strip().isdigit())) \
            or int(par) < 1:
        out.append(f"{_origin(c, 'parallel')}: runbook.parallel = {par!r}: must be a whole number >= 1 "
                   "(how many hosts are worked on at once within a step)")
    for key in ("inventory", "state_dir", "bundle_dir"):
        v = cfg.get(key, DEFAULTS[key])
        if not isinstance(v, str) or not v.strip():
            out.append(f"{_origin(c, key)}: runbook.{key} = {v!r}: must be a non-empty path")
    return out


def check_config(c) -> None:
    found = config_problems(c)
    if found:
        raise Exit("error: " + "\n       ".join(found), code=2)


def setting(c, key: str):
    cfg = c.config.get("runbook", {}) if hasattr(c, "config") else {}
    value = cfg.get(key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]
    return int(value) if key == "parallel" else value


def inventory_of(c) -> Inventory:
    try:
        return load_inventory(setting(c, "inventory"))
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def state_dir(c, inv: Inventory) -> Path:
    p = Path(setting(c, "state_dir"))
    p = p if p.is_absolute() else Path.cwd() / p
    where = f"state dir {p} (runbook.state_dir, from {_origin(c, 'state_dir')})"
    if p.exists() and not p.is_dir():
        raise Exit(f"error: {where} is not a directory; point runbook.state_dir / INVOKE_RUNBOOK_STATE_DIR at a "
                   "directory (it holds the ledger, the PKI and secrets.yml)", code=2)
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise Exit(f"error: {where} cannot be created: {exc.strerror or exc}", code=2) from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise Exit(f"error: {where} is not writable by uid {os.getuid()}; fix its permissions or choose "
                   "another directory", code=2)
    return p


def _check_secrets(sd: Path) -> None:
    """A state/secrets.yml that is unsafe or malformed is refused before anything is recorded (the ledger
    masks every secret it stores, so it would trip over the file half-way)."""
    from runbook.credentials.secrets import _load, secrets_path

    if secrets_path(sd).exists():
        _load(secrets_path(sd))


@contextmanager
def session(c, command: str, *, lock: bool = True, options: Options | None = None,
            hosts: str | None = None) -> Iterator[Ctx]:
    """Validate the inventory and --hosts first (nothing connects, nothing is recorded before that),
    then open the ledger and take the run lock. ctx.selected holds the selected hosts."""
    from runbook.bundle.manifest import BundleError
    from runbook.credentials.secrets import SecretsError

    check_config(c)
    inv = inventory_of(c)
    try:
        selected = inv.select(hosts)
    except InventoryError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    sd = state_dir(c, inv)
    try:
        _check_secrets(sd)
    except SecretsError as exc:
        raise Exit(f"error: {exc}", code=2) from None
    bundle = Path(setting(c, "bundle_dir"))
    ctx = Ctx(inventory=inv, transport=SshTransport(), state_dir=sd,
              bundle_dir=bundle if bundle.is_absolute() else Path.cwd() / bundle,
              options=options or Options(parallel=setting(c, "parallel")), selected=selected,
              observer=ui.RichObserver(), settings=dict(c.config.get("runbook", None) or {}))
    ledger = Ledger(sd / f"{inv.cluster.name}.db", redact=ctx.redact)
    ctx.ledger = ledger
    if lock:
        try:
            ledger.acquire(command, sys.argv[1:])
        except LedgerLocked as exc:
            raise Exit(f"error: {exc}", code=3) from None
        if ledger.stale_lock:
            ui.console.print(f"[yellow]took over a run lock left by a dead process ({ledger.stale_lock})[/]")
    outcome, summary = "failed", ""
    try:
        yield ctx
        outcome = "ok"
    except Quit as exc:
        outcome, summary = "quit", str(exc)
        raise Exit(str(exc), code=exc.exit_code) from None
    except RunFailed as exc:
        summary = str(exc)
        raise Exit(f"\n{ctx.redact(summary)}", code=exc.exit_code) from None
    except Exit as exc:
        summary = str(exc.message or "")
        raise
    except RunbookError as exc:
        summary = str(exc)
        hint = ""
        if isinstance(exc, BundleError) and not ctx.bundle_dir.is_dir():
            hint = f" (runbook.bundle_dir, from {_origin(c, 'bundle_dir')})"
        raise Exit(f"error: {ctx.redact(str(exc))}{hint}", code=exc.exit_code) from None
    finally:
        ctx.transport.close()
        if lock:
            ledger.release(outcome, summary)
        ledger.db.conn.close()


def run_steps(c, command: str, steps, hosts: str | None, dry: bool, step: bool, verify: bool) -> None:
    """Apply steps on the selected hosts with the operator modes; print plan or summary."""
    check_config(c)
    opts = Options(dry=dry, step=step, verify=verify, parallel=setting(c, "parallel"))
    if step and not sys.stdin.isatty() and os.environ.get("RUNBOOK_STEP_ANSWERS") is None:
        raise Exit("error: --step asks before every step and needs an interactive terminal", code=2)
    if os.environ.get("RUNBOOK_STEP_ANSWERS"):
        answers = iter(os.environ["RUNBOOK_STEP_ANSWERS"].split(","))
        opts.answer = lambda _name: next(answers, "quit")
    with session(c, command, lock=not dry, options=opts, hosts=hosts) as ctx:
        t0 = time.monotonic()
        report = apply(ctx, steps, ctx.selected)
        if dry:
            show_plan(ctx, report)
            return
        ui.console.print(f"[bold green]✓[/] {command}: {ui.summary_line(report, time.monotonic() - t0)}")


def show_plan(ctx: Ctx, report) -> None:
    from runbook.core.export import file_diffs

    ui.console.print(ui.plan_table(report, f"Plan for {ctx.inventory.cluster.name} (dry run: nothing changes)"))
    ui.console.print(ui.plan_reasons(report))
    for d in report.plan:
        if d.run:
            for diff in file_diffs(ctx, d):
                ui.console.print(diff, markup=False)
    failed = getattr(ctx.transport, "_failed", {})
    if failed:  # the plan is shown, but it could not be compared with those hosts: say so in the exit code
        raise Exit("dry run incomplete: could not reach " + "; ".join(str(e) for e in failed.values()), code=1)


def section_install(section_name: str, steps_fn, doc: str):
    """An `install` task for one section (or `up` for the whole runbook)."""

    def install(c, hosts=None, dry=False, step=False, verify=False):
        run_steps(c, f"{section_name}", steps_fn(), hosts, dry, step, verify)

    install.__doc__ = doc
    return task(help=RUN_HELP)(install)
