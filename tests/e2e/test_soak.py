"""Robustness proofs on real hosts (issue 7): kill -9 anywhere, converge twice, roll back any step.

One cluster install from bare hosts serves the whole module:

1. Kill anywhere: the install itself is walked through a list of kill points in runbook order; for each
   step, `cluster.up` is SIGKILLed once while the step is `running` on some host, and once right after it
   is recorded `done` on some host. Each next `cluster.up` resumes the previous one and is killed at the
   next point, so every kill point costs one resume (~4 s) on top of the one install. The final resume
   must leave a healthy cluster, an intact ledger, and a further run must execute nothing.
2. Converge twice: a second `cluster.up` executes 0 steps and changes nothing on the hosts (file hashes,
   modes, owners, unit states and MainPIDs compared before and after).
3. Roll back one step on one host (`--cascade`), `cluster.up` restores it, and the cluster is healthy;
   a rollback that would delete a non-empty etcd data dir or PGDATA is refused without --destroy-data.

CI runs a bounded sample (each section's first, middle and last step; a few rollbacks per section);
RUNBOOK_SOAK=1 (`make soak`) runs every step.
"""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest
from helpers import INV, REPO, SCALE, env, executed, inv, ledger

from runbook.cluster.render import Paths

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"
# Long steps are killed some seconds into their action rather than right as they start.
MID = {"bundle.push": 8, "etcd.binaries": 1, "etcd.start": 2, "postgres.packages": 15, "patroni.venv": 2,
       "patroni.bootstrap": 3, "patroni.replicas": 5}
TIMES: dict[str, float] = {}


def _steps():
    from runbook.sections import sections

    return sections()


def optional_and_off(section: str, inventory) -> bool:
    """A section the inventory does not turn on: no host runs its steps."""
    from runbook.sections.frontdoor import SECTIONS

    return (section in SECTIONS and inventory.cluster.vip is None) or \
        (section == "backup" and inventory.backup is None)


def kill_points(inventory) -> list[tuple[str, str]]:
    """(step, 'running' | 'done') in runbook order: every step with RUNBOOK_SOAK=1, else a sample. The optional
    sections have no host in the soak's inventory: the front door without cluster.vip (test_frontdoor.py),
    backup without a backup host (test_backup.py)."""
    out = []
    for sec in _steps():
        if optional_and_off(sec.name, inventory):
            continue
        picks = range(len(sec.steps)) if SOAK else sorted({0, len(sec.steps) // 2, len(sec.steps) - 1})
        steps = [sec.steps[i] for i in picks]
        out += [(s.name, p) for s in steps for p in ("running", "done")]
    return out


@pytest.fixture(scope="module")
def soak(lab, tmp_path_factory):
    """Bare lab hosts (recreated) and an empty state dir; the bundle must be built."""
    from runbook.lab import lab as labmod

    if not (REPO / "bundle/manifest.json").exists():
        inv(tmp_path_factory.mktemp("bundle"), "bundle.build", timeout=1200)
    labmod.down(lab)
    labmod.up(lab)
    state = tmp_path_factory.mktemp("soak") / "state"
    yield lab, state
    print("\nsoak timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def tr(soak):
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


def _max_run(state) -> int:
    try:
        with ledger(state) as db:
            return db.execute("select coalesce(max(id), 0) from runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def kill_at(state, step: str, point: str, log) -> str:
    """Start `inv cluster.up`; SIGKILL its process group when `step` is `point` on some host in this run.
    Returns what the ledger says about that step just after the kill."""
    after = _max_run(state)
    sql = ("select 1 from checkpoints where step = ? and status = ? and run_id > ?", (step, point, after))
    with open(log, "a") as out:
        out.write(f"\n==== kill at {step} {point}\n")
        out.flush()
        p = subprocess.Popen([INV, "cluster.up"], cwd=REPO, env=env(state), stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    deadline, db, hit = time.monotonic() + 900 * SCALE, None, False
    try:
        while time.monotonic() < deadline and not hit:
            ended = p.poll() is not None
            try:
                db = db or ledger(state)
                hit = db.execute(*sql).fetchone() is not None
            except sqlite3.OperationalError:
                db = None  # not created yet
            if ended and not hit:
                if p.returncode == 0 and _done_everywhere(state, step):
                    # sections overlap: the step finished in this run before it could be seen `running`
                    return "not reached: done within the run (sections overlap)"
                raise AssertionError(f"cluster.up ended (rc {p.returncode}) before {step} was {point}; see {log}")
            time.sleep(0.002)
        assert hit, f"{step} not {point} within the budget; see {log}"
        if point == "running" and step in MID:
            time.sleep(MID[step])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        if db is not None:
            db.close()
    with ledger(state) as db:
        rows = db.execute("select host, status from checkpoints where step = ? order by host", (step,)).fetchall()
    return " ".join(f"{h}={s}" for h, s in rows)


def assert_healthy(state) -> None:
    st = inv(state, "cluster.status").stdout
    assert re.search(r"Leader\s.*running", st) and "streaming" in st, st[-3000:]
    inv(state, "etcd.health")


def leader_and_replica(soak) -> tuple[str, str]:
    inventory, state = soak
    st = inv(state, "cluster.status").stdout
    by_addr = {h.address: h.name for h in inventory.postgres}
    lead = [by_addr[a] for line in st.splitlines() if "Leader" in line
            for a in re.findall(r"\d+\.\d+\.\d+\.\d+", line) if a in by_addr]
    assert len(lead) == 1, st[-3000:]
    other = [h.name for h in inventory.postgres if h.name != lead[0]]
    return lead[0], other[0]


def _done_everywhere(state, step: str) -> bool:
    """The step is recorded done, and not running, on every host that has a record of it."""
    try:
        with ledger(state) as db:
            rows = db.execute("select status from checkpoints where step = ?", (step,)).fetchall()
    except sqlite3.OperationalError:
        return False  # no ledger yet
    return bool(rows) and all(r[0] == "done" for r in rows)


def test_install_killed_at_every_kill_point_then_resumed(soak, tmp_path):
    inventory, state = soak
    log = tmp_path / "cluster-up.log"
    t0 = time.monotonic()
    results = []
    for step, point in kill_points(inventory):
        t = time.monotonic()
        if _done_everywhere(state, step):
            # sections overlap (Step.needs): a step of a later kill point may be finished by an earlier run
            results.append(f"{step:<20} {point:<8}   -    already done by an earlier run (sections overlap)")
            continue
        seen = kill_at(state, step, point, log)
        results.append(f"{step:<20} {point:<8} {time.monotonic() - t:5.1f}s  {seen}")
        with ledger(state) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print("\nkill points (step, point, time to the kill, ledger after it):\n" + "\n".join(results))
    inv(state, "cluster.up", timeout=1500)  # the last point may be reached as the run ends: no stale lock then
    TIMES["install with kills"] = time.monotonic() - t0
    assert_healthy(state)
    with ledger(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        bad = db.execute("select host, step, status from checkpoints where status != 'done'").fetchall()
    assert bad == []
    assert executed(inv(state, "cluster.up").stdout) == 0


SNAPSHOT = ("for f in $(find /etc/etcd /etc/patroni /etc/systemd/system/etcd.service "
            "/etc/systemd/system/patroni.service /opt/patroni/.tls /etc/hosts /usr/bin/etcd /usr/bin/etcdctl "
            "/usr/bin/etcdutl /usr/local/bin/ectl /etc/profile.d/patroni.sh -type f 2>/dev/null | sort); do "
            "echo \"$(sha256sum $f | cut -d' ' -f1) $(stat -c '%n %a %U %G' $f)\"; done; "
            "for u in etcd patroni; do echo \"$u $(systemctl is-active $u) $(systemctl is-enabled $u 2>&1) "
            "$(systemctl show -p MainPID --value $u)\"; done")


def snapshot(tr, inventory) -> dict[str, str]:
    out = {}
    for h in inventory.hosts:
        r = tr.run(h, SNAPSHOT, timeout=60)
        assert r.ok, r.stderr
        out[h.name] = r.stdout
    return out


def test_converge_twice_changes_nothing(soak, tr):
    inventory, state = soak
    before = snapshot(tr, inventory)
    assert "etcd active enabled" in before[inventory.etcd[0].name]
    assert "patroni active enabled" in before[inventory.postgres[0].name]
    assert executed(inv(state, "cluster.up").stdout) == 0
    after = snapshot(tr, inventory)
    for h in before:
        assert before[h] == after[h], f"{h} changed:\n{before[h]}\n---\n{after[h]}"


def test_rollback_refused_for_non_empty_data_dirs(soak, tr):
    inventory, state = soak
    _, replica = leader_and_replica(soak)
    pgdata = Paths(pg_major=inventory.cluster.postgres_major).pgdata()
    for step, host, data, unit in (("etcd.user", inventory.etcd[0].name, "/var/lib/etcd/default/member", "etcd"),
                                   ("postgres.dirs", replica, f"{pgdata}/PG_VERSION", "patroni")):
        p = inv(state, "runbook.rollback", step, "--hosts", host, "--cascade", check=False)
        assert p.returncode != 0 and "--destroy-data" in p.stdout + p.stderr, p.stdout + p.stderr
        r = tr.run(inventory.get(host), f"test -e {data} && systemctl is-active {unit}", timeout=30)
        assert r.ok, f"{host}: {data} gone or {unit} stopped after a refused rollback: {r.stdout} {r.stderr}"
    assert executed(inv(state, "cluster.up").stdout) == 0  # nothing was rolled back


def rollback_plan(soak) -> list[tuple[str, str, bool]]:
    """(step, host, --destroy-data) to roll back and re-apply, in an order that keeps the cluster whole."""
    inventory, _ = soak
    etcd = [h.name for h in inventory.etcd]
    first, other = inventory.postgres[0].name, inventory.postgres[1].name
    if not SOAK:
        return [("cluster.verify", "local", False), ("etcd.config", etcd[1], False), ("etcd.start", etcd[2], False),
                ("etcd.existing", etcd[0], False), ("postgres.tls", other, False), ("postgres.dirs", other, True),
                ("patroni.config", other, False), ("patroni.replicas", other, False),
                ("patroni.bootstrap", first, False)]
    from runbook.sections import all_steps

    plan = []
    for i, s in enumerate(all_steps()):
        if optional_and_off(s.section, inventory):
            continue
        if s.role == "local":
            plan.append((s.name, "local", False))
        elif s.role == "etcd":
            if s.name in ("etcd.binaries", "etcd.user"):
                continue  # their cascade deletes a joined member's data: refused (see the test above)
            plan.append((s.name, etcd[i % 3], False))
        else:  # postgres and all: a postgres host (an etcd host's cascade would reach etcd.user)
            host = first if s.only is not None and s.name != "patroni.replicas" else other
            plan.append((s.name, host, s.index <= 3003 or s.role == "all"))
    return plan


def test_rollback_each_step_then_reapply(soak):
    inventory, state = soak
    t0 = time.monotonic()
    results = []
    for step, host, destroy in rollback_plan(soak):
        t = time.monotonic()
        args = (["runbook.rollback", step, "--cascade"] + ([] if host == "local" else ["--hosts", host])
                + (["--destroy-data"] if destroy else []))
        rb = inv(state, *args, timeout=600).stdout
        assert f"rolled back {step} on {host}" in " ".join(rb.split()), rb
        with ledger(state) as db:
            assert db.execute("select status from checkpoints where host = ? and step = ?",
                              (host, step)).fetchone()[0] == "rolled_back"
        out = inv(state, "cluster.up", timeout=1500).stdout
        n = executed(out)
        assert n >= 1
        assert_healthy(state)
        with ledger(state) as db:
            bad = db.execute("select host, step, status from checkpoints where status != 'done'").fetchall()
        assert bad == [], bad
        results.append(f"{step:<20} {host:<10} {'--destroy-data' if destroy else '':<15} "
                       f"{n:>2} re-applied  {time.monotonic() - t:5.1f}s")
    TIMES["rollbacks"] = time.monotonic() - t0
    print("\nrollbacks (step, host, re-applied (host, step), time):\n" + "\n".join(results))
    assert executed(inv(state, "cluster.up").stdout) == 0
