"""Helpers for the cluster scenarios: run `inv` as an operator would, read the ledger, poll with budgets."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INV = str(REPO / ".venv/bin/inv")
SCALE = float(os.environ.get("RUNBOOK_TIMEOUT_SCALE", "1"))  # slow CI: multiply every budget


def env(state: Path, inventory: Path | None = None) -> dict:
    from runbook.lab.lab import lab_root

    # the runbook's state is per test session; the lab (brought up by conftest) stays where it is
    e = dict(os.environ, INVOKE_RUNBOOK_STATE_DIR=str(state), INVOKE_RUNBOOK_LAB_DIR=str(lab_root()), COLUMNS="160")
    inventory = inventory or os.environ.get("RUNBOOK_E2E_INVENTORY")  # the `lab` fixture's inventory
    if inventory:
        e["INVOKE_RUNBOOK_INVENTORY"] = str(inventory)
    return e


_WALK = re.compile(r"(?<![A-Za-z0-9.-])(etcd0[1-9]|node0[1-9]|192\.168\.60\.1[34][1-9]|patroni_cluster)"
                   r"(?![A-Za-z0-9-])")


def lab_names() -> dict[str, str]:
    """The walk-through's names (etcd01.., node01.., their 192.168.60.x addresses, patroni_cluster) -> those of
    the e2e inventory ($RUNBOOK_E2E_INVENTORY: a helper's lab with its own prefix and subnet), by role order."""
    from runbook.inventory import load_inventory

    path = os.environ.get("RUNBOOK_E2E_INVENTORY") or REPO / "hosts.yml"
    i = load_inventory(Path(path))
    m = {"patroni_cluster": i.cluster.name}
    for n, h in enumerate(i.etcd, 1):
        m[f"etcd0{n}"], m[f"192.168.60.14{n}"] = h.name, h.address
    for n, h in enumerate(i.postgres, 1):
        m[f"node0{n}"], m[f"192.168.60.13{n}"] = h.name, h.address
    return m


def T(text: str) -> str:
    """*text* with the walk-through's names replaced by the e2e inventory's (identity on the repo's hosts.yml)."""
    names = _names()
    return _WALK.sub(lambda mo: names.get(mo.group(1), mo.group(1)), text)


_NAMES: dict[str, str] = {}


def _names() -> dict[str, str]:
    if not _NAMES:
        _NAMES.update(lab_names())
    return _NAMES


def inv(state: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    args = tuple(T(a) for a in args)
    p = subprocess.run([INV, *args], cwd=REPO, env=env(state), capture_output=True, text=True,
                       timeout=timeout * SCALE, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}")
    return p


def executed(out: str) -> int:
    m = re.search(r"(\d+) \(host, step\) executed", out)
    assert m, f"no summary line in:\n{out[-2000:]}"
    return int(m.group(1))


def ledger(state: Path, cluster: str = "") -> sqlite3.Connection:
    """The ledger of ``cluster`` (default: the e2e inventory's cluster name)."""
    if not cluster:
        from conftest import e2e_inventory_path

        from runbook.inventory import load_inventory

        cluster = load_inventory(e2e_inventory_path()).cluster.name
    return sqlite3.connect(f"file:{state / (cluster + '.db')}?mode=ro", uri=True, timeout=5)


def kill_when(state: Path, args: list[str], sql: str, budget: float = 600) -> None:
    """Start `inv args`, SIGKILL its whole process group as soon as `sql` returns a row in the ledger."""
    args, sql = [T(a) for a in args], T(sql)
    out = tempfile.TemporaryFile()  # what it said, shown when it ends on its own before the kill point
    p = subprocess.Popen([INV, *args], cwd=REPO, env=env(state), stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + budget * SCALE
    try:
        while time.monotonic() < deadline:
            if p.poll() is not None:
                out.seek(0)
                said = out.read().decode(errors="replace")[-3000:]
                raise AssertionError(f"inv {' '.join(args)} ended (rc {p.returncode}) before the kill point:\n{said}")
            try:
                with ledger(state) as db:
                    if db.execute(sql).fetchone():
                        break
            except sqlite3.OperationalError:
                pass  # the ledger is not created yet
            time.sleep(0.05)
        else:
            raise AssertionError(f"kill point not reached within {budget}s: {sql}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        out.close()


def wait_for(fn, seconds: float, interval: float = 1.0):
    deadline = time.monotonic() + seconds * SCALE
    last = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # keep polling; report the last error on timeout
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds}s (last: {last!r})")
        time.sleep(interval)
