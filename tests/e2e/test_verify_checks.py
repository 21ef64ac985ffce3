"""--verify's Patroni checks on real hosts, now that they start neither patronictl nor the validator (issue 16):
patroni.dynamic reads the DCS through the local REST API and must see a hand edit made a moment ago (before
Patroni's own loop has read it); patroni.validate trusts a root-only mark of the last validation and must
re-validate when the mark does not match. Each time exactly that (host, step) runs again, and the cluster is
left as converged found it. Host names come from the e2e inventory, never from this file.
"""
from __future__ import annotations

import shlex

import yaml
from helpers import inv, ledger

from runbook.cluster.commands import patronictl
from runbook.cluster.context import Ctx
from runbook.core.context import Options
from runbook.core.transport import SshTransport
from runbook.sections.bundle_files import REMOTE_BUNDLE
from runbook.sections.patroni import VALIDATED


def _reran(state, inventory) -> set[tuple[str, str]]:
    """The (host, step) pairs the last run executed."""
    with ledger(state, inventory.cluster.name) as db:
        run = db.execute("select max(id) from runs").fetchone()[0]
        return set(db.execute("select host, step from checkpoints where run_id = ? and status = 'done'", [run]))


def test_verify_sees_a_fresh_dcs_edit_and_a_validation_mark_that_does_not_match(converged):
    inventory, state = converged
    tr = SshTransport()
    try:
        ctx = Ctx(inventory=inventory, transport=tr, state_dir=state, bundle_dir=state, options=Options())
        first, other = inventory.postgres[0], inventory.postgres[1]

        # the DCS edited by hand just now: the REST API answers from the DCS, not from Patroni's last loop
        r = tr.run(first, patronictl(ctx, "edit-config --force --quiet --set ttl=31"), user="postgres", timeout=60)
        assert r.ok, r.stderr
        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert _reran(state, inventory) == {(first.name, "patroni.dynamic")}, out[-3000:]
        shown = tr.run(first, patronictl(ctx, "show-config"), user="postgres", timeout=60)
        assert yaml.safe_load(shown.stdout)["ttl"] == inventory.cluster.patroni.ttl

        # a mark that stands for another validation: the validator runs again there, and only there
        r = tr.run(other, f"sha256sum /etc/hostname | cut -d' ' -f1 > {shlex.quote(VALIDATED)}", timeout=60)
        assert r.ok, r.stderr
        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert _reran(state, inventory) == {(other.name, "patroni.validate")}, out[-3000:]
        mode = tr.run(other, f"stat -c '%a %U' {shlex.quote(VALIDATED)} {shlex.quote(VALIDATED.rsplit('/', 1)[0])}",
                      timeout=60).stdout.split("\n")
        assert mode[:2] == ["600 root", "700 root"]

        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert "0 (host, step) executed" in out, out[-3000:]
    finally:
        tr.close()


# A byte of a bundle file flipped with its size and mtime put back (only the ctime tells), by root as a
# mistaken hand or a disk would: printed as the file's sha256 before and after.
FLIP = ("import os, sys, hashlib; p = sys.argv[1]; st = os.stat(p); b = bytearray(open(p, 'rb').read()); "
        "b[len(b) // 2] ^= 0xFF; open(p, 'r+b').write(b); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns)); "
        "print(hashlib.sha256(b).hexdigest())")


def test_verify_repairs_drift_its_cheap_checks_see(converged):
    """bundle.push (stat record), postgres.packages (dpkg's status) and patroni.wheels (the venv's record): each
    drift made on a real host is seen by --verify, that (host, step) runs again and repairs it, and nothing
    else runs; a bundle file only touched (its ctime moved, its content intact) is re-hashed and passes."""
    inventory, state = converged
    tr = SshTransport()
    try:
        ctx = Ctx(inventory=inventory, transport=tr, state_dir=state, bundle_dir=state, options=Options())
        first, other = inventory.postgres[0], inventory.postgres[1]
        venv_pkg = ctx.paths_for(first).venv_package
        deb = tr.run(first, f"find {REMOTE_BUNDLE} -name '*.deb' | sort | head -1", timeout=60).stdout.strip()
        good = tr.run(first, f"sha256sum {shlex.quote(deb)} | cut -c1-64", timeout=60).stdout.strip()
        assert deb and len(good) == 64
        size = tr.run(first, f"stat -c '%s %.9Y' {shlex.quote(deb)}", timeout=60).stdout.strip()
        r = tr.run(first, f"python3 -I -c {shlex.quote(FLIP)} {shlex.quote(deb)}", timeout=60)
        assert r.ok and r.stdout.strip() != good, r.stderr
        assert tr.run(first, f"stat -c '%s %.9Y' {shlex.quote(deb)}", timeout=60).stdout.strip() == size
        r = tr.run(first, f"dpkg -r {venv_pkg}", timeout=120)  # the package gone (python3.X-venv stays)
        assert r.ok, r.stderr
        touched = tr.run(other, f"f=$(find {REMOTE_BUNDLE} -name '*.deb' | sort | head -1) && touch \"$f\"",
                         timeout=60)
        assert touched.ok, touched.stderr
        v = ctx.paths.patroni_venv
        r = tr.run(other, f"{v}/bin/pip uninstall -y -q psycopg2-binary", timeout=120)  # a package gone from the venv
        assert r.ok, r.stderr

        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert _reran(state, inventory) == {(first.name, "bundle.push"), (first.name, "postgres.packages"),
                                            (other.name, "patroni.wheels")}, out[-3000:]
        assert tr.run(first, f"sha256sum {shlex.quote(deb)} | cut -c1-64", timeout=60).stdout.strip() == good
        assert tr.run(first, f"dpkg-query -W -f='${{Status}}' {venv_pkg}", timeout=60).stdout == "install ok installed"
        assert tr.run(other, f"{v}/bin/python -c 'import psycopg2'", timeout=60).ok

        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert "0 (host, step) executed" in out, out[-3000:]
    finally:
        tr.close()


def test_verify_repairs_drift_its_shared_and_merged_checks_see(converged):
    """The checks that share one probe in a host's batch or merged their calls (runbook.core.shared): on real
    hosts, patroni's etcd permission revoked on one etcd member (etcd.auth: `user get --detail`, one call for
    the user and its role: every member sees it, the permission being the cluster's) and the distribution's
    default cluster created again on a postgres host (postgres.default-off: its config directory, not
    pg_lsclusters) are each seen by --verify, those (host, step) alone run again and repair it;
    the shared endpoint health and REST answer pass on the other steps."""
    inventory, state = converged
    tr = SshTransport()
    try:
        ctx = Ctx(inventory=inventory, transport=tr, state_dir=state, bundle_dir=state, options=Options())
        member, pg = inventory.etcd[0], inventory.postgres[1]
        prefix = inventory.cluster.namespace.rstrip("/") + "/"
        r = tr.run(member, f"{ctx.paths.ectl} role revoke-permission patroni {shlex.quote(prefix)} --prefix=true",
                   timeout=60)
        assert r.ok, r.stderr
        major, name = ctx.paths_for(pg).default_cluster().split()
        r = tr.run(pg, f"pg_createcluster {major} {name} >/dev/null", timeout=120)
        assert r.ok, r.stderr

        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        # the permission is the cluster's: every member's etcd.auth check sees it gone
        assert _reran(state, inventory) == {*((h.name, "etcd.auth") for h in inventory.etcd),
                                            (pg.name, "postgres.default-off")}, out[-3000:]
        role = tr.run(member, f"{ctx.paths.ectl} role get patroni", timeout=60).stdout
        assert role.count(f"(prefix {prefix})") == 2, role  # read and write again
        assert not tr.run(pg, f"test -e /etc/postgresql/{major}/{name}", timeout=60).ok

        out = inv(state, "cluster.up", "--verify", timeout=900).stdout
        assert "0 (host, step) executed" in out, out[-3000:]
    finally:
        tr.close()
