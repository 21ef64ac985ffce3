"""`inv cluster.update` in the lab, under the drill writer (issue 18, proofs c, d, e).

(c) CI: Patroni 4.1.4 -> 4.1.5. The session's cluster runs the default bundle (Patroni 4.1.5). A second bundle
    is built with runbook.patroni_version 4.1.4 (same packages, a cached wheelhouse) and the cluster taken to it
    with the same procedure (runbook.allow_downgrade: the setup, not the proof); then, under the writer, the
    update to the session's own bundle: Patroni 4.1.5 on every member, no failover (leader and timeline
    unchanged), not paused afterwards, 0 acknowledged rows lost. The cluster is left as it was found.
(d) soak: a PostgreSQL minor update, 15.18 (Debian 12's release suite, bundle.build --release-only) -> the
    session bundle's (the security archive's newer point release): replicas first, a switchover, the old
    leader; 0 lost.
(e) soak: the update killed with SIGKILL right after it stopped a member, then resumed: it completes, and a
    sampler that asked every member all along never saw two of them down at once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import INV, REPO, SCALE, env, ledger

from runbook.cluster.commands import patronictl
from runbook.cluster.context import Ctx
from runbook.cluster.readers import host_of, members, wait
from runbook.core.transport import SshTransport
from runbook.procedures.drill import Writer, prepare_table, prove, writer_dsn

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"


def run(state: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run([INV, *args], cwd=REPO, env={**env(state), **extra}, capture_output=True, text=True,
                       timeout=timeout * SCALE, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise AssertionError(f"inv {' '.join(args)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def rig(converged):
    inventory, state = converged
    ctx = Ctx(inventory=inventory, transport=SshTransport(), state_dir=state, bundle_dir=REPO / "bundle")
    yield inventory, state, ctx
    ctx.transport.close()


def build(state: Path, where: Path, **extra: str) -> Path:
    """bundle.build into `where` (the session bundle's caches make it cheap); returns the directory."""
    if not (where / "manifest.json").is_file():
        run(state, "bundle.build", "--bundle-dir", str(where), timeout=1200, **extra)
    return where


def patroni_versions(ctx: Ctx) -> dict[str, str]:
    """The Patroni each member runs, as its REST API says (`patronictl version`)."""
    r = ctx.transport.run(ctx.inventory.postgres[0], patronictl(ctx, f"version {ctx.inventory.cluster.name}"),
                          user="postgres", timeout=30)
    assert r.ok, r.stderr
    return dict(re.findall(r"^\s*(\S+): Patroni (\S+)", r.stdout, re.M))


def leader_and_timeline(ctx: Ctx) -> tuple[str, int | None]:
    lead = next(m for m in members(ctx) if m.is_leader)
    return lead.name, lead.timeline


def healthy(ctx: Ctx) -> bool:
    ms = members(ctx)
    return sum(m.is_leader for m in ms) == 1 and any(m.role == "Sync Standby" and m.streaming for m in ms)


def step_durations(inventory, state: Path, run_id: int) -> dict[str, float]:
    with ledger(state, inventory.cluster.name) as db:
        return {step: dur for step, dur in db.execute(
            "select step, duration from checkpoints where step like 'cluster.update.%' and run_id = ?", (run_id,))}


def last_run_id(inventory, state: Path) -> int:
    with ledger(state, inventory.cluster.name) as db:
        return db.execute("select max(id) from runs").fetchone()[0]


def under_writer(ctx: Ctx, kind: str, fn) -> tuple[dict, object]:
    prepare_table(ctx, host_of(ctx, leader_and_timeline(ctx)[0]))
    w = Writer(writer_dsn(ctx), f"{kind}-{int(time.time())}")
    w.start()
    assert wait(lambda: len(w.acked) >= 5, 30, 0.2), f"the writer could not write (errors {w.errors})"
    try:
        out = fn()
        time.sleep(1)
    finally:
        assert w.stop(30)
    return prove(ctx, w), out


def test_patroni_update_under_pause_no_failover_nothing_lost(rig, tmp_path_factory):
    inventory, state, ctx = rig
    older = build(state, tmp_path_factory.mktemp("bundles") / "patroni-4.1.4", INVOKE_RUNBOOK_PATRONI_VERSION="4.1.4")
    assert set(patroni_versions(ctx).values()) == {"4.1.5"}
    # setup: the cluster taken to 4.1.4 by the same procedure (a downgrade needs runbook.allow_downgrade)
    # (refused without runbook.allow_downgrade: tests/unit/test_update_plan.py)
    run(state, "cluster.update", "--bundle", str(older), "--yes", INVOKE_RUNBOOK_ALLOW_DOWNGRADE="1")
    assert set(patroni_versions(ctx).values()) == {"4.1.4"}

    # the proof: 4.1.4 -> 4.1.5 (the session's bundle) under the writer
    dry = run(state, "cluster.update", "--dry").stdout
    assert "Patroni 4.1.4 -> 4.1.5" in dry and "pause" in dry and "resume" in dry, dry[-3000:]
    assert set(patroni_versions(ctx).values()) == {"4.1.4"}  # a dry run changes nothing
    before = leader_and_timeline(ctx)
    t0 = time.monotonic()
    res, out = under_writer(ctx, "update-patroni", lambda: run(state, "cluster.update", "--yes").stdout)
    total = time.monotonic() - t0
    durations = step_durations(inventory, state, last_run_id(inventory, state))
    assert set(patroni_versions(ctx).values()) == {"4.1.5"}, out[-3000:]
    assert leader_and_timeline(ctx) == before  # no failover, no switchover: same leader, same timeline
    r = ctx.transport.run(inventory.postgres[0], patronictl(ctx, "show-config"), user="postgres", timeout=30)
    assert "pause: true" not in r.stdout  # resumed
    assert wait(lambda: healthy(ctx), 60, 2)
    assert "nothing to update" in run(state, "cluster.update", "--dry").stdout
    per_host = {k.split(".")[-1]: v for k, v in durations.items() if "patroni-" in k}
    print(f"\nPatroni 4.1.4 -> 4.1.5: total {total:.1f} s, per host {per_host}; rows acknowledged "
          f"{res['acknowledged']}, present {res['present']}, lost {res['lost']}; longest write gap "
          f"{res['longest_write_gap_s']} s; write errors (retried) {res['write_errors']}")
    assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0


class DownSampler:
    """Asks every PostgreSQL host twice a second whether its PostgreSQL accepts connections; keeps the most
    members seen down at once (an unreachable answer counts as down)."""

    def __init__(self, ctx: Ctx):
        self.ctx, self.worst, self.samples, self._stop = ctx, 0, 0, threading.Event()
        self.tr = SshTransport()
        self.t = threading.Thread(target=self._loop, daemon=True)

    def _down(self, h) -> bool:
        try:
            r = self.tr.run(h, f"pg_isready -q -h {self.ctx.paths.socket_dir}", timeout=10)
            return not r.ok
        except Exception:
            return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            down = sum(self._down(h) for h in self.ctx.inventory.postgres)
            self.worst, self.samples = max(self.worst, down), self.samples + 1
            time.sleep(0.5)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join(30)
        self.tr.close()


def kill_at(state: Path, cluster: str, args: list[str], sql: str, budget: float = 900) -> None:
    """Start `inv args`, SIGKILL its process group once `sql` finds a row in this cluster's ledger."""
    import signal
    import sqlite3

    p = subprocess.Popen([INV, *args], cwd=REPO, env=env(state), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + budget * SCALE
    try:
        while time.monotonic() < deadline:
            assert p.poll() is None, f"inv {' '.join(args)} ended (rc {p.returncode}) before the kill point"
            try:
                with ledger(state, cluster) as db:
                    if db.execute(sql).fetchone():
                        return
            except sqlite3.OperationalError:
                pass  # not created yet
            time.sleep(0.05)
        raise AssertionError(f"kill point not reached within {budget}s: {sql}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def pg_versions(ctx: Ctx) -> dict[str, str]:
    out = {}
    for h in ctx.inventory.postgres:
        r = ctx.transport.run(h, f"dpkg-query -W -f='${{Version}}' postgresql-{ctx.inventory.cluster.postgres_major}",
                              timeout=30)
        out[h.name] = r.stdout.strip()
    return out


if SOAK:  # `make soak` (RUNBOOK_SOAK=1) only: each of these takes minutes (packages on every member)

    def test_postgres_minor_update_replicas_first_switchover_nothing_lost(rig, tmp_path_factory):
        inventory, state, ctx = rig
        major = inventory.cluster.postgres_major
        where = tmp_path_factory.mktemp("bundles")
        # the release suite's own point release (bookworm, without -updates/-security) ...
        release = where / "release-only"
        run(state, "bundle.build", "--release-only", "--bundle-dir", str(release), timeout=1200)
        old_version = next(f["version"] for f in json.loads((release / "manifest.json").read_text())["files"]
                           if f["name"] == f"postgresql-{major}")
        newest = pg_versions(ctx)
        same = set(newest.values()) == {old_version}
        if not same:
            # ... pinned in a bundle that is otherwise current: the release-only closure itself cannot go on
            # hosts whose base system has the security archive's perl-base (its perl wants its own version)
            older = where / f"postgresql-{old_version}"
            run(state, "bundle.build", "--pg-version", old_version, "--bundle-dir", str(older), timeout=1200)
            run(state, "cluster.update", "--bundle", str(older), "--yes", INVOKE_RUNBOOK_ALLOW_DOWNGRADE="1",
                timeout=1800)
            assert set(pg_versions(ctx).values()) == {old_version}
        else:  # one point release only: drill the procedure by re-installing the same version
            dry = run(state, "cluster.update", "--reinstall", "--dry").stdout
            assert "same version: reinstall" in dry, dry[-3000:]
        old = pg_versions(ctx)
        lead0, _ = leader_and_timeline(ctx)
        t0 = time.monotonic()
        args = ("cluster.update", "--yes") + (("--reinstall",) if same else ())
        res, out = under_writer(ctx, "update-postgres", lambda: run(state, *args, timeout=1800).stdout)
        total = time.monotonic() - t0
        durations = step_durations(inventory, state, last_run_id(inventory, state))
        assert pg_versions(ctx) == newest, out[-3000:]
        order = [k.split(".")[-1] for k, _ in sorted(durations.items(), key=lambda kv: kv[0]) if "postgres-" in k]
        assert len(order) == len(inventory.postgres)
        assert leader_and_timeline(ctx)[0] != lead0  # the old leader handed over by the switchover
        assert wait(lambda: healthy(ctx), 120, 2)
        print(f"\nPostgreSQL {set(old.values())} -> {set(newest.values())}: total {total:.1f} s, per step "
              f"{durations}; rows acknowledged {res['acknowledged']}, present {res['present']}, lost {res['lost']}; "
              f"longest write gap {res['longest_write_gap_s']} s")
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0

    def test_update_killed_after_stopping_a_member_resumes_never_two_down(rig):
        inventory, state, ctx = rig
        sql = ("select 1 from events where step like 'cluster.update.postgres-%' and kind = 'run' "
               "and action = 'systemctl stop patroni' and rc = 0")
        with DownSampler(ctx) as sampler:
            kill_at(state, inventory.cluster.name, ["cluster.update", "--reinstall", "--yes"], sql)
            out = run(state, "cluster.update", "--reinstall", "--yes", timeout=1800).stdout
        assert "resuming the interrupted cluster.update" in out, out[-3000:]
        assert wait(lambda: healthy(ctx), 120, 2)
        with ledger(state, inventory.cluster.name) as db:
            stops = db.execute("select host, count(*) from events where step like 'cluster.update.postgres-%' and "
                               "action = 'systemctl stop patroni' and rc = 0 group by host").fetchall()
        print(f"\nkill -9 + resume: {sampler.samples} samples, at most {sampler.worst} member(s) down at once; "
              f"stops per host {stops}")
        assert sampler.samples > 10 and sampler.worst <= 1
