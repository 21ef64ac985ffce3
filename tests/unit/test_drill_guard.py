"""The drills' lab guard: a drill powers hosts off (or drops a table) only on this machine's lab hosts."""
from __future__ import annotations

import json

import pytest

from runbook.errors import ProcedureFailed
from runbook.procedures.drill import lab_problems, require_lab


@pytest.fixture
def lab_dir(tmp_path, monkeypatch):
    d = tmp_path / "lab"
    monkeypatch.setenv("INVOKE_RUNBOOK_LAB_DIR", str(d))
    return d


def record(lab_dir, host, inventory: str) -> None:
    meta = lab_dir / "hosts" / host.name / "host.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"address": host.address, "inventory": inventory}))


def test_hosts_that_are_not_lab_hosts_are_named(ctx, lab_dir):
    problems = lab_problems(ctx)
    assert len(problems) == len(ctx.inventory.hosts)
    assert all("not a lab host" in p for p in problems)
    with pytest.raises(ProcedureFailed, match="drill.failover refused: it powers lab hosts off and on") as e:
        require_lab(ctx, "drill.failover")
    assert e.value.exit_code == 2  # refused: bad input, not a failure


def test_power_needs_the_lab_of_this_very_inventory(ctx, lab_dir):
    """A copy of the inventory (the restore drill's, with extra hosts) may not power the hosts off; it may
    drop a table on them once they run."""
    for h in ctx.inventory.hosts:
        record(lab_dir, h, "/elsewhere/hosts.yml")
    assert all("belongs to another" in p for p in lab_problems(ctx))
    no_power = lab_problems(ctx, power=False)
    assert no_power and all("is not running" in p for p in no_power)  # nothing boots in a unit test
    with pytest.raises(ProcedureFailed, match="it changes data on the cluster"):
        require_lab(ctx, "drill.restore", power=False)
