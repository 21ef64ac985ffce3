"""The step model on real hosts: checks derived from the files a step puts, and a rebuilt host's records.

Scenario 1: on a converged cluster, every file that a step puts is edited by hand on one of that step's
hosts; `cluster.up --verify` re-runs exactly those (host, step) pairs and puts every file back.
Scenario 2: the lab is destroyed and created again (new disks, new machine-ids, same names); a plain
`cluster.up` trusts the ledger (all done: no host contacted, and it says so), `cluster.up --verify` probes
every host, says which are new machines and brings the cluster back.
Host names come from the e2e inventory, never from this file.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from helpers import REPO, inv, ledger, wait_for

from runbook.cluster.context import Ctx
from runbook.core.context import Options
from runbook.core.step import Put


@pytest.fixture(scope="module")
def tr(converged):
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


def _ctx(inventory, state: Path, tr) -> Ctx:
    return Ctx(inventory=inventory, transport=tr, state_dir=state, bundle_dir=REPO / "bundle", options=Options())


def _last_run_steps(state: Path, cluster: str) -> set[tuple[str, str]]:
    with ledger(state, cluster) as db:
        run = db.execute("select max(id) from runs").fetchone()[0]
        return {(h, s) for h, s in db.execute("select host, step from checkpoints where run_id = ? and "
                                              "status = 'done'", [run])}


def test_verify_finds_every_hand_edited_file_and_reruns_exactly_those_steps(converged, tr):
    from runbook.sections import all_steps

    inventory, state = converged
    ctx = _ctx(inventory, state, tr)
    edited: dict[tuple[str, str], list[Put]] = {}
    for i, step in enumerate(all_steps()):
        hosts = step.hosts(ctx, inventory.hosts)
        if not hosts or step.role == "local":
            continue
        host = hosts[i % len(hosts)]  # spread the edits over the step's hosts
        puts = [a for a in step.actions_fn(ctx, host) if isinstance(a, Put)]
        if puts:
            edited[(host.name, step.name)] = puts
    assert len(edited) >= 9, sorted(edited)  # push, etcd tls/config/unit/ectl, postgres, patroni files
    for (host, _), puts in edited.items():
        for p in puts:
            r = tr.run(inventory.get(host), f"echo '# edited by hand' >> {shlex.quote(p.path)}", timeout=60)
            assert r.ok, r.stderr

    out = inv(state, "cluster.up", "--verify", timeout=1500).stdout
    assert _last_run_steps(state, inventory.cluster.name) == set(edited), out[-3000:]
    for (host, _), puts in edited.items():
        for p in puts:
            got = tr.run(inventory.get(host), f"sha256sum {shlex.quote(p.path)}", timeout=60).stdout.split()
            assert got and got[0] in (p.sha256, *p.accept), (host, p.path)
    assert "0 (host, step) executed" in inv(state, "cluster.up", "--verify", timeout=600).stdout


def test_rollback_restores_what_a_put_replaced(converged, tr):
    """The derived undo on a real host: a file the runbook replaced comes back as it was; a file the
    runbook created goes. (etcd.ectl: a later step, etcd.existing, is done too, hence --cascade.)"""
    inventory, state = converged
    h = inventory.etcd[-1]
    ectl, kept = "/usr/local/bin/ectl", "/var/lib/pg-ha-runbook/undo/usr/local/bin/ectl"
    site = "#!/bin/sh\necho the site's own ectl\n"

    def content() -> str | None:
        r = tr.run(h, f"cat {ectl}", timeout=60)
        return r.stdout if r.ok else None

    def rollback() -> None:
        inv(state, "runbook.rollback", "etcd.ectl", "--hosts", h.name, "--cascade", timeout=300)

    # the host had its own ectl before the runbook's
    assert tr.run(h, f"rm -f {kept} {kept}.absent && printf %s {shlex.quote(site)} > {ectl}", timeout=60).ok
    inv(state, "etcd.install", "--hosts", h.name, "--verify", timeout=900)
    assert "endpoint" in content() and tr.run(h, f"test -f {kept}", timeout=60).ok
    rollback()
    assert content() == site
    inv(state, "etcd.install", "--hosts", h.name, timeout=900)
    assert content() != site
    # the runbook created it: the undo removes it, and leaves nothing behind
    assert tr.run(h, f"rm -f {kept} {ectl}", timeout=60).ok
    inv(state, "etcd.install", "--hosts", h.name, "--verify", timeout=900)
    assert tr.run(h, f"test -f {kept}.absent", timeout=60).ok
    rollback()
    assert content() is None and not tr.run(h, f"ls {kept}*", timeout=60).ok
    inv(state, "etcd.install", "--hosts", h.name, timeout=900)
    assert "endpoint" in content()
    assert tr.run(h, f"{ectl} endpoint health", timeout=60).ok


def test_a_recreated_lab_is_recognised_by_verify_and_cluster_up_verify_brings_it_back(converged, tr):
    from runbook.core.offline import NOT_CONTACTED
    from runbook.lab import lab as labmod

    inventory, state = converged
    first = " ".join(inv(state, "cluster.up", timeout=600).stdout.split())
    # after the modules before this one (switchovers, rotated passwords, replaced members) the ledger alone
    # still says all done: no host contacted
    assert NOT_CONTACTED in first and "0 (host, step) executed" in first, first[-2000:]
    tr.close()
    labmod.down(inventory)
    labmod.up(inventory)
    # the ledger says all done: a plain run contacts no host, and says that --verify is what probes them
    plain = " ".join(inv(state, "cluster.up", timeout=600).stdout.split())
    assert NOT_CONTACTED in plain and "0 (host, step) executed" in plain, plain[-2000:]
    out = inv(state, "cluster.up", "--verify", timeout=1800).stdout
    flat = " ".join(out.split())
    for h in inventory.hosts:
        assert f"{h.name} is a new machine: its" in flat, h.name
    rerun = _last_run_steps(state, inventory.cluster.name)
    assert {h for h, _ in rerun} == {h.name for h in inventory.hosts}  # every host's steps ran again
    st = wait_for(lambda: (lambda s: s if "Leader" in s and "streaming" in s else None)(
        inv(state, "cluster.status", check=False).stdout), 120, 3)
    assert "Leader" in st
    assert "0 (host, step) executed" in inv(state, "cluster.up", timeout=600).stdout
