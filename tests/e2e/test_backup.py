"""Backups on real hosts: a repository host and a restore host added to the session's cluster; the backup
section (pgBackRest over TLS, archiving, stanza, first full backup, timers), a differential backup, archiving
after a switchover (backup.check on the new leader), and the restore drill (a mistaken DROP TABLE undone by a
point-in-time restore on the restore host). RUNBOOK_SOAK=1 (`make soak`) runs a longer drill and a second
restore.

The two hosts live in a copy of the e2e inventory, are created in the lab for this module only and removed at
its end; the cluster goes back to the session's inventory (no archiving: patroni.dynamic takes archive_mode and
archive_command out of the DCS, the members are restarted for it), so the modules after this one find it as
before.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import time

import pytest
from helpers import executed, wait_for
from test_membership import _HANDED_OUT, extended, run, status

from runbook.inventory import Inventory, load_inventory

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"


def extra_hosts(base: Inventory) -> dict[str, tuple[str, str]]:
    """{name: (address, role)}: <prefix>backup01 and <prefix>spare01 at the next free addresses of the /24."""
    prefix = re.sub(r"etcd\d+$", "", base.etcd[0].name)
    used = {h.address for h in base.hosts} | _HANDED_OUT
    top = max(ipaddress.ip_address(h.address) for h in base.hosts)
    net = ipaddress.ip_network(f"{top}/24", strict=False)
    free = (str(a) for a in net.hosts() if a > top and str(a) not in used)
    out = {f"{prefix}backup01": (next(free), "backup"), f"{prefix}spare01": (next(free), "restore")}
    for name, (addr, _) in out.items():
        _HANDED_OUT.update((name, addr))
    return out


def revert(state, base_path, check: bool = True) -> None:
    """Back to the session's inventory: archive settings out of the DCS, then the restart they need."""
    run(state, base_path, "cluster.up", check=check, timeout=900)
    # members flag "pending restart" at their next loop after edit-config: a second pass takes a late one
    if run(state, base_path, "patroni.restart", "--pending", check=False, timeout=600).returncode:
        run(state, base_path, "patroni.restart", "--pending", check=check, timeout=600)


def info(state, inventory) -> dict:
    return json.loads(run(state, inventory, "backup.list", "--json").stdout)


@pytest.fixture(scope="module")
def backed(converged, tmp_path_factory):
    """(state, inventory path with backup + restore hosts, figures): the backup section installed."""
    from runbook.lab import lab as labmod

    base, state = converged
    add = extra_hosts(base)
    path = extended(base, tmp_path_factory.mktemp("backup") / "hosts-backup.yml", add)
    labmod.up(load_inventory(path), list(add))
    figures: dict = {}
    try:
        t0 = time.monotonic()
        out = run(state, path, "cluster.up", timeout=1200).stdout
        figures["section_s"] = round(time.monotonic() - t0, 1)
        figures["first_full_s"] = float(re.search(r"backup\.full .*\n\s+✓ \S+\s+([\d.]+)s", out).group(1))
        yield state, path, figures
    finally:
        if not figures.get("reverted"):  # test_back_to_the_session_inventory did not get to it
            revert(state, base.path, check=False)
        extra = load_inventory(path)
        labmod.down(Inventory.model_construct(path=path, cluster=base.cluster,
                                              hosts=tuple(extra.get(n) for n in add)))
        print(f"\nbackup figures: {figures}")


def test_section_installs_and_takes_the_first_full_backup(backed):
    state, path, figures = backed
    doc = info(state, path)
    assert doc["status"] == "ok" and [b["type"] for b in doc["backups"]] == ["full"]
    again = run(state, path, "backup.install", timeout=600).stdout  # converged: backup.check's probe passes
    assert executed(again) == 0 and "0 failed" in again, again[-1500:]
    assert figures["first_full_s"] < 120


def test_diff_backup_and_archiving_after_a_switchover(backed):
    state, path, figures = backed
    t0 = time.monotonic()
    run(state, path, "backup.run", "--type", "diff", timeout=600)
    figures["diff_s"] = round(time.monotonic() - t0, 1)
    before = info(state, path)
    assert [b["type"] for b in before["backups"]][-1] == "diff"
    old = next(m for m in status(state, path)["members"] if m["leader"])
    # the pre-checks want the sync standby at lag 0: right after a backup's WAL switch it may lag a little;
    # a refused switchover changes nothing, so it is asked again (bounded)
    wait_for(lambda: run(state, path, "patroni.switchover", "--force", check=False, timeout=300).returncode == 0,
             120, 3)
    new = wait_for(lambda: next((m for m in status(state, path)["members"] if m["leader"] and m["name"] != old["name"]
                                 and any(r["streaming"] for r in status(state, path)["members"])), None), 120, 2)
    out = run(state, path, "backup.check", timeout=300).stdout
    assert re.search(rf"backup\.check\.leader .*\n\s+✓ {new['name'].removeprefix('patroni_')}", out), out[-1500:]
    after = info(state, path)
    # WAL of the new leader's timeline reached the repository
    assert after["wal"]["max"][:8] > before["wal"]["max"][:8], (before["wal"], after["wal"])
    figures["wal_after_switchover"] = f"{before['wal']['max']} -> {after['wal']['max']}"


def test_pgbackrest_certificates_rotate_and_the_next_backup_uses_them(backed):
    """`pki.rotate --service pgbackrest` on every host holding one (PostgreSQL, repository, restore host):
    each running pgBackRest server serves its new certificate, and the next backup (the repository host's
    client to the leader's server, both on new pairs) and `backup.check` (archiving) pass."""
    state, path, figures = backed

    def rows() -> dict:
        doc = json.loads(run(state, path, "pki.status", "--json").stdout)
        return {(r["host"], r["service"]): r for r in doc["rows"]}

    before = rows()
    mine = [k for k in before if k[1] == "pgbackrest"]
    t0 = time.monotonic()
    run(state, path, "pki.rotate", "--service", "pgbackrest", timeout=600)
    figures["pgbackrest_rotate_s"] = round(time.monotonic() - t0, 1)
    after = rows()
    assert len(mine) == len(load_inventory(path).postgres) + 2, mine  # + the repository and restore hosts
    assert all(after[k]["sha256"] != before[k]["sha256"] and after[k]["matches"] for k in mine), \
        [(k, before[k]["sha256"][:12], after[k]["sha256"][:12]) for k in mine]
    run(state, path, "backup.run", "--type", "incr", timeout=600)
    assert [b["type"] for b in info(state, path)["backups"]][-1] == "incr"
    run(state, path, "backup.check", timeout=300)


def test_restore_drill(backed):
    state, path, figures = backed
    secs = "30" if SOAK else "2"
    out = run(state, path, "drill.restore", "--before", secs, "--after", secs, timeout=900).stdout
    assert "✓ drill.restore" in out, out[-2500:]
    m = re.search(r"restored in ([\d.]+) s", out)
    figures["restore_s"] = float(m.group(1))
    assert re.search(r"restored_after_t\s+│ 0 ", out), out[-2500:]
    if SOAK:  # a second restore onto the same host: the previous copy is wiped, the target is the time now
        t = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 1))
        again = run(state, path, "backup.restore", "--target-time", t, "--yes", timeout=900).stdout
        assert "last recovered transaction at 20" in again, again[-1500:]


def test_back_to_the_session_inventory(backed, converged):
    """The modules after this one find the cluster as before: archiving off, no restart pending, healthy, and
    `cluster.audit` clean with its warning that no backups are configured."""
    state, path, figures = backed
    base, _ = converged
    t0 = time.monotonic()
    revert(state, base.path)
    figures["revert_s"] = round(time.monotonic() - t0, 1)
    figures["reverted"] = True
    ms = status(state, base.path)["members"]
    assert sorted((m["leader"], m["streaming"]) for m in ms) == [(False, True), (True, False)], ms
    out = run(state, base.path, "cluster.audit", timeout=600).stdout
    assert "no findings" in out and "no backups configured" in out, out[-2000:]
