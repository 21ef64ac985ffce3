"""Patroni's dynamic configuration comes from one place: cluster.patroni in the inventory (over the
walk-through's values) feeds both bootstrap.dcs in the rendered config and the patroni.dynamic step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runbook.cluster.dynamic import EXACT, bootstrap_dcs, dcs_diff, desired_dynamic, dynamic_command, \
    dynamic_explain
from runbook.cluster.render import Paths, patroni_context, render
from runbook.inventory import InventoryError, load_inventory
from runbook.sections.patroni import section

REPO = Path(__file__).resolve().parents[2]
SECRETS = {k: {"username": u, "password": f"pw-{k}-0123456789abcdef"} for k, u in (
    ("superuser", "postgres"), ("replication", "replicator"), ("rewind", "rewind_user"), ("admin", "admin"),
    ("restapi", "patroni"), ("etcd", "patroni"))}


def _inv(tmp_path: Path, patroni_block: str = ""):
    text = (REPO / "hosts.yml").read_text()
    if patroni_block:
        text = text.replace("cluster:\n", "cluster:\n  patroni:\n" + patroni_block, 1)
    (tmp_path / "hosts.yml").write_text(text)
    return load_inventory(tmp_path / "hosts.yml")


def _bootstrap(inv) -> dict:
    text = render("patroni/config.yml.j2", **patroni_context(inv, inv.get("node01"), SECRETS, Paths()))
    return yaml.safe_load(text)["bootstrap"]["dcs"]


def test_defaults_are_the_walkthrough_values(tmp_path) -> None:
    d = desired_dynamic(_inv(tmp_path))
    assert (d["ttl"], d["loop_wait"], d["retry_timeout"], d["maximum_lag_on_failover"]) == (30, 10, 10, 1048576)
    assert (d["synchronous_mode"], d["synchronous_mode_strict"], d["synchronous_node_count"]) == (True, True, 1)
    assert d["postgresql"]["parameters"]["max_connections"] == 100
    assert d["postgresql"]["parameters"]["log_directory"] == "/data/log"


def test_one_place_feeds_bootstrap_dcs_and_the_step(tmp_path) -> None:
    inv = _inv(tmp_path, "    synchronous_mode_strict: false\n    ttl: 40\n"
                         "    parameters: {max_connections: 150, work_mem: 8MB, log_statement: null}\n")
    dcs = _bootstrap(inv)
    assert dcs == bootstrap_dcs(inv, "/data/log")
    assert dcs["synchronous_mode_strict"] is False and dcs["ttl"] == 40
    params = dcs["postgresql"]["parameters"]
    assert params["max_connections"] == 150 and params["work_mem"] == "8MB"
    assert "log_statement" not in params  # null: absent from a new cluster ...
    want = desired_dynamic(inv)
    assert want["postgresql"]["parameters"]["log_statement"] is None  # ... and removed from a running one
    # the step's command carries the same settings
    step = next(s for s in section.steps if s.name == "patroni.dynamic")
    assert step.explain is dynamic_explain


def test_step_command_changes_with_the_inventory(ctx, tmp_path) -> None:
    before = dynamic_command(ctx, "apply")
    assert '"synchronous_mode_strict": true' in before and '"max_connections": 100' in before
    ctx.inventory = _inv(tmp_path, "    synchronous_mode_strict: false\n")
    after = dynamic_command(ctx, "apply")
    assert '"synchronous_mode_strict": false' in after and after != before  # new fingerprint: the step re-runs


@pytest.mark.parametrize("block, words", [
    ("    loop_wait: 20\n", ["loop_wait + 2 x retry_timeout", "ttl (30)"]),
    ("    synchronous_mode: false\n", ["synchronous_mode_strict: true needs synchronous_mode: true"]),
    ("    parameters: {ssl_cert_file: /x}\n", ["ssl_cert_file: a per-host setting"]),
    ("    parameters: {Work-Mem: 1}\n", ["'Work-Mem': not a PostgreSQL parameter name"]),
    ("    parameters: {max_slot_wal_keep_size: 1GB}\n", ["cluster.max_slot_wal_keep_size"]),
    ("    ttl: abc\n", ["cluster.patroni.ttl"]),
    ("    tll: 30\n", ["cluster.patroni.tll"]),
])
def test_bad_settings_are_clear_errors(tmp_path, block, words) -> None:
    with pytest.raises(InventoryError) as exc:
        _inv(tmp_path, block)
    msg = str(exc.value)
    assert str(tmp_path / "hosts.yml") in msg and "cluster.patroni" in msg
    for w in words:
        assert w in msg, msg


def test_dcs_diff_shows_the_change(tmp_path) -> None:
    inv = _inv(tmp_path, "    synchronous_mode_strict: false\n    parameters: {work_mem: 8MB}\n")
    current = bootstrap_dcs(_inv(tmp_path), "/data/log")  # the DCS of a cluster created with the defaults
    diff = dcs_diff(current, desired_dynamic(inv), EXACT)
    assert "-synchronous_mode_strict: true\n+synchronous_mode_strict: false\n" in diff
    assert "+    work_mem: 8MB\n" in diff
    assert [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))] == [
        "+    work_mem: 8MB", "-synchronous_mode_strict: true", "+synchronous_mode_strict: false"]
    assert dcs_diff(current, desired_dynamic(_inv(tmp_path)), EXACT) == ""  # in line: no diff


def test_explain_reads_show_config(ctx) -> None:
    current = bootstrap_dcs(ctx.inventory, ctx.paths.log_dir)
    current["ttl"] = 45
    ctx.transport.on(r"show-config", (0, yaml.safe_dump(current)))
    node = ctx.inventory.get("node01")
    [diff] = dynamic_explain(ctx, node)
    assert "-ttl: 45\n+ttl: 30\n" in diff and "node01: DCS" in diff
    ctx.transport.on(r"show-config", 1)
    [msg] = dynamic_explain(ctx, node)
    assert "show-config failed" in msg
    assert json.loads(json.dumps(desired_dynamic(ctx.inventory)))  # JSON-safe: shipped as argv to the host


def test_explain_on_an_unreachable_host_says_so(ctx) -> None:
    ctx.transport.down.add("node01")
    [msg] = dynamic_explain(ctx, ctx.inventory.get("node01"))
    assert msg.startswith("--- node01: DCS: cannot read (") and "unreachable" in msg
