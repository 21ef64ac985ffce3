"""`make soak` (RUNBOOK_SOAK=1): a cluster installed by the runbook as it was before certificates by purpose
(commit OLD_REV: one certificate per host, no peer CA, no etcd auth), then taken over by this runbook:
`cluster.up` refuses it and names `pki.migrate`; `pki.migrate` moves it under a writer with 0 acknowledged
rows lost, the same leader throughout, 3 healthy etcd members after; then `cluster.up`, `cluster.audit` and
`pki.status` pass and etcd auth is on.

The old runbook runs from a `git archive` of OLD_REV with this venv (invoke imports the `runbook`
package of the directory it runs in). Re-creates the lab hosts: runs after the modules sharing the session's
cluster (conftest MODULE_ORDER), like test_soak.py.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from helpers import INV, REPO, SCALE, env, inv

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"
# the last commit of main before certificates by purpose were merged (one certificate per host)
OLD_REV = os.environ.get("RUNBOOK_OLD_REV", "80a2b9b")


@pytest.fixture(scope="module")
def old_cluster(lab, tmp_path_factory):
    """Bare lab hosts, a cluster installed on them by the OLD_REV runbook; (inventory, state, old tree)."""
    from runbook.lab import lab as labmod

    if not (REPO / "bundle/manifest.json").exists():
        inv(tmp_path_factory.mktemp("bundle"), "bundle.build", timeout=1200)
    base = tmp_path_factory.mktemp("migrate")
    old = base / "old"
    old.mkdir()
    subprocess.run(f"git archive {OLD_REV} | tar -x -C {old}", shell=True, cwd=REPO, check=True,
                   capture_output=True, timeout=120)  # the old tree, without touching the repository's git
    labmod.down(lab)
    labmod.up(lab)
    state = base / "state"
    e = dict(env(state), INVOKE_RUNBOOK_BUNDLE_DIR=str(REPO / "bundle"))
    t0 = time.monotonic()
    p = subprocess.run([INV, "cluster.up"], cwd=old, env=e, capture_output=True, text=True, timeout=1800 * SCALE,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    print(f"\nold runbook ({OLD_REV}) cluster.up: {time.monotonic() - t0:.0f} s")
    return lab, state, old


def test_a_cluster_of_one_certificate_per_host_is_migrated_under_a_writer(old_cluster):
    from runbook.cluster.context import Ctx
    from runbook.cluster.readers import members, wait
    from runbook.core.transport import SshTransport
    from runbook.procedures.drill import Writer, prepare_table, prove, writer_dsn

    inventory, state, _old = old_cluster
    assert (state / "pki" / f"{inventory.etcd[0].name}.crt").exists()  # the old layout
    refused = inv(state, "cluster.up", check=False)
    assert refused.returncode == 1 and "inv pki.migrate" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    ctx = Ctx(inventory=inventory, transport=SshTransport(), state_dir=state, bundle_dir=REPO / "bundle")
    try:
        lead = next(m for m in members(ctx) if m.is_leader)
        prepare_table(ctx, next(h for h in inventory.postgres if f"patroni_{h.name}" == lead.name))
        w = Writer(writer_dsn(ctx), f"migrate-{int(time.time())}")
        w.start()
        assert wait(lambda: len(w.acked) >= 5, 30, 0.2), f"the writer could not write (errors {w.errors})"
        t0 = time.monotonic()
        out = inv(state, "pki.migrate", "--yes", timeout=1800).stdout
        took = time.monotonic() - t0
        t_mark = time.monotonic()
        assert wait(lambda: sum(at > t_mark for _, at in list(w.acked)) >= 20, 60, 0.5), "no writes after it"
        assert w.stop(30)
        res = prove(ctx, w)
        after = next(m for m in members(ctx) if m.is_leader)
        print(f"\npki.migrate: {took:.0f} s; rows acknowledged {res['acknowledged']}, lost {res['lost']}; longest "
              f"write gap {w.gap(t0, t_mark)[0]:.2f} s; leader {lead.name} -> {after.name}")
        assert "✓ pki.migrate" in out
        assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0
        assert after.name == lead.name  # the leader kept its DCS throughout
        e1 = inventory.etcd[0]
        auth = ctx.transport.run(e1, f"{ctx.paths.ectl} auth status", timeout=60)
        assert "Authentication Status: true" in auth.stdout, auth.stdout + auth.stderr
        health = ctx.transport.run(e1, f"{ctx.paths.ectl} endpoint health 2>&1", timeout=60)
        assert health.stdout.count("is healthy") == len(inventory.etcd), health.stdout
    finally:
        ctx.transport.close()
    assert not list((state / "pki").glob("*.crt")) or {p.name for p in (state / "pki").glob("*.crt")} == \
        {"ca.crt", "peer-ca.crt"}  # the one-per-host certificates moved to state/pki/legacy/
    up = inv(state, "cluster.up", timeout=1500)
    assert up.returncode == 0
    status = inv(state, "pki.status", check=False, timeout=300)
    assert status.returncode == 0, status.stdout[-3000:]
    audit = inv(state, "cluster.audit", check=False, timeout=600)
    assert audit.returncode == 0, audit.stdout[-3000:]


if not SOAK:  # `make soak` only: a whole install by the old runbook, then the migration (minutes)
    del test_a_cluster_of_one_certificate_per_host_is_migrated_under_a_writer
