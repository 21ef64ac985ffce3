"""lab.down's view of the lab dir: its own inventory's hosts, and hosts nobody else can take down."""
from __future__ import annotations

import json
from pathlib import Path

from runbook.inventory import load_inventory
from runbook.lab.lab import _state_hosts

ROOT = Path(__file__).resolve().parents[2]


def test_down_takes_its_own_leftovers_and_orphans_not_other_inventories_hosts(tmp_path):
    inv = load_inventory(ROOT / "hosts.yml")
    other = tmp_path / "other.yml"
    other.write_text("# another inventory sharing the lab dir\n")
    hosts = {"etcd04": str(inv.path), "gone01": str(tmp_path / "deleted.yml"), "theirs01": str(other),
             "nometa01": None, "etcd01": str(inv.path)}
    for name, owner in hosts.items():
        d = tmp_path / "lab" / "hosts" / name
        d.mkdir(parents=True)
        if owner is not None:
            (d / "host.json").write_text(json.dumps({"name": name, "address": "192.0.2.9", "inventory": owner}))
    got = sorted(m.name for m in _state_hosts(inv, tmp_path / "lab"))
    # etcd01 is an inventory host (down takes it anyway); theirs01 belongs to an inventory that still exists
    assert got == ["etcd04", "gone01", "nometa01"]
