"""The slot-forgetting script of patroni.remove/replace, run locally against a fake patronictl and psql that
behave as Patroni does: member_slots_ttl 0 makes the slot of an absent member go."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runbook.procedures.membership_slots import _FORGET, slot_name

FAKE_CTL = r'''
import json, sys, yaml
state = sys.argv[1]; args = sys.argv[2:]
cfg = yaml.safe_load(open(state + "/config.yml")) or {}
if args[0] == "show-config":
    print(yaml.safe_dump(cfg))
elif args[0] == "list":
    print(json.dumps([{"Member": m} for m in json.load(open(state + "/members.json"))]))
elif args[0] == "edit-config":
    import os
    busy = state + "/busy"  # another writer changed /config in between: the compare-and-set aborts
    left = int(open(busy).read()) if os.path.exists(busy) else 0
    if left > 0:
        open(busy, "w").write(str(left - 1))
        sys.exit("Error: Config modification aborted due to concurrent changes")
    for k, v in json.load(sys.stdin).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    yaml.safe_dump(cfg, open(state + "/config.yml", "w"))
    open(state + "/edits", "a").write(json.dumps(cfg.get("member_slots_ttl")) + "\n")
    if cfg.get("member_slots_ttl") == 0:  # Patroni forgets the absent members' slots
        members = {m.lower() for m in json.load(open(state + "/members.json"))}
        slots = open(state + "/slots").read().split()
        open(state + "/slots", "w").write("\n".join(s for s in slots if s in members or s in cfg.get("slots", {})))
'''


def fake(tmp_path: Path, slots: list[str], members: list[str], config: dict) -> tuple[str, str]:
    (tmp_path / "slots").write_text("".join(s + "\n" for s in slots))
    (tmp_path / "members.json").write_text(json.dumps(members))
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "ctl.py").write_text(FAKE_CTL)
    ctl = f"{sys.executable} {tmp_path / 'ctl.py'} {tmp_path}"
    return ctl, f"cat {tmp_path / 'slots'}"


def forget(ctl: str, sql: str, slot: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FORGET, ctl, sql, slot, "5"], capture_output=True, text=True,
                          timeout=60)


def test_slot_name_as_patroni_makes_it():
    assert slot_name("patroni_node03") == "patroni_node03"
    assert slot_name("patroni_Up-Node01") == "patroni_up_node01"
    assert len(slot_name("patroni_" + "x" * 80)) == 63


def test_the_slot_goes_and_the_ttl_comes_back(tmp_path):
    ctl, sql = fake(tmp_path, ["patroni_node01", "patroni_node03"], ["patroni_node01", "patroni_node02"],
                    {"ttl": 30})
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "slots").read_text().split() == ["patroni_node01"]
    assert "member_slots_ttl" not in yaml.safe_load((tmp_path / "config.yml").read_text())
    assert (tmp_path / "edits").read_text().split() == ["0", "null"]


def test_a_set_ttl_is_restored_to_its_value(tmp_path):
    ctl, sql = fake(tmp_path, ["patroni_node03"], ["patroni_node01"], {"member_slots_ttl": "1h"})
    assert forget(ctl, sql, "patroni_node03").returncode == 0
    assert yaml.safe_load((tmp_path / "config.yml").read_text())["member_slots_ttl"] == "1h"


def test_refused_while_another_member_is_absent(tmp_path):
    """patroni_node04 is retained for a member that is only down: 0 would drop its slot too."""
    ctl, sql = fake(tmp_path, ["patroni_node03", "patroni_node04", "keep_me"], ["patroni_node01"],
                    {"slots": {"keep_me": {"type": "physical"}}})
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode != 0 and "patroni_node04" in r.stderr and "keep_me" not in r.stderr
    assert not (tmp_path / "edits").exists()  # nothing changed
    assert "patroni_node03" in (tmp_path / "slots").read_text()


def test_refused_while_the_member_is_still_listed(tmp_path):
    ctl, sql = fake(tmp_path, ["patroni_node03"], ["patroni_node01", "patroni_node03"], {})
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode != 0 and "still a member" in r.stderr


@pytest.mark.parametrize("left", [0, "0"])
def test_resumed_after_a_kill_restores_the_ttl(tmp_path, left):
    """Killed between `0` and the restore: the slot is gone, the resumed step only puts the default back."""
    ctl, sql = fake(tmp_path, ["patroni_node01"], ["patroni_node01"], {"member_slots_ttl": left})
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode == 0 and "no slot" in r.stdout
    assert "member_slots_ttl" not in yaml.safe_load((tmp_path / "config.yml").read_text())


def test_a_slot_that_never_goes_fails_bounded_and_restores(tmp_path):
    ctl, sql = fake(tmp_path, ["patroni_node03"], ["patroni_node01"], {})
    stuck = f"sh -c {shlex.quote(sql + '; echo patroni_node03')}"  # Patroni never drops it
    r = forget(ctl, stuck, "patroni_node03")
    assert r.returncode != 0 and "within 5 s" in r.stderr
    assert (tmp_path / "edits").read_text().split() == ["0", "null"]


def test_the_step_runs_the_script_as_postgres(ctx):
    from runbook.procedures.membership_patroni import remove_steps, target_host

    step = remove_steps(ctx, target_host(ctx, "node02"))[-1]
    cmd = step.actions_fn(ctx, ctx.inventory.get("node01"))[0].cmd
    assert cmd.startswith("sudo -u postgres sh -c ") and "patroni_node02" in shlex.split(cmd)[-1]


def test_a_concurrent_config_change_is_retried(tmp_path):
    """edit-config is a compare-and-set: an abort because /config changed in between is tried again."""
    ctl, sql = fake(tmp_path, ["patroni_node03"], ["patroni_node01"], {})
    (tmp_path / "busy").write_text("2")
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "edits").read_text().split() == ["0", "null"]


def test_an_endless_conflict_fails_bounded(tmp_path):
    ctl, sql = fake(tmp_path, ["patroni_node03"], ["patroni_node01"], {})
    (tmp_path / "busy").write_text("99")
    r = forget(ctl, sql, "patroni_node03")
    assert r.returncode != 0 and "concurrent changes" in r.stderr
    assert "patroni_node03" in (tmp_path / "slots").read_text()


def test_the_step_runs_one_host_at_a_time(ctx):
    """Two members editing /config at once abort each other (the landing CI saw it): the step is serial."""
    from runbook.procedures.membership_patroni import remove_steps, target_host

    assert remove_steps(ctx, target_host(ctx, "node02"))[-1].kind == "serial"
