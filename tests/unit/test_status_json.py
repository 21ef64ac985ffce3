"""`--json` of etcd.status, cluster.status and runbook.status (stable keys), on the fake transport with output
captured from the lab, and the width of the console off a terminal (a log, a pipe, CI)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from runbook.tasks.records import ledger_doc
from runbook.tasks.sections import etcd_doc, members_doc

DATA = Path(__file__).resolve().parents[1] / "data" / "captured"
ENDPOINT_KEYS = {"endpoint", "id", "version", "db_size_bytes", "leader", "raft_term", "raft_index", "errors"}


def _etcd_answers(ctx, down: str | None = None):
    """Each etcd host answers `endpoint status` about itself (as in the lab), one of them may be down."""
    captured = json.loads((DATA / "etcdctl-endpoint-status.json").read_text())

    def answer(host, cmd):
        return 0, json.dumps([e for e in captured if f"//{host.name}:" in e["Endpoint"]])

    ctx.transport.on(r"endpoint status", answer)
    if down:
        ctx.transport.down.add(down)


def test_etcd_doc_keys_and_values(ctx):
    _etcd_answers(ctx, down="etcd03")
    doc = etcd_doc(ctx)
    assert set(doc) == {"endpoints", "unreachable"}
    assert [e["endpoint"] for e in doc["endpoints"]] == ["https://etcd01:2379", "https://etcd02:2379"]
    assert all(set(e) == ENDPOINT_KEYS for e in doc["endpoints"])
    assert [e["leader"] for e in doc["endpoints"]] == [True, False]
    assert doc["endpoints"][0]["db_size_bytes"] == 45056 and doc["endpoints"][0]["raft_index"] == 89
    assert [(u["host"], u["endpoint"]) for u in doc["unreachable"]] == [("etcd03", "https://etcd03:2379")]
    assert "unreachable" in doc["unreachable"][0]["error"]
    json.dumps(doc)  # serialisable as it is


def test_members_doc_keys_and_values(ctx):
    ctx.transport.on(r"patronictl .*list -f json", (0, (DATA / "patronictl-list.json").read_text()))
    ms = members_doc(ctx)
    assert [set(m) for m in ms] == [{"name", "host", "role", "state", "timeline", "lag", "leader", "streaming"}] * 2
    assert [(m["name"], m["role"], m["leader"], m["streaming"]) for m in ms] == [
        ("patroni_node01", "Leader", True, False), ("patroni_node02", "Sync Standby", False, True)]
    assert ms[1]["lag"] == 0 and ms[0]["timeline"] == 1


def test_ledger_doc_in_run_order(ctx):
    ctx.ledger.set("etcd01", "etcd.config", "done", fingerprint="f", mode="auto")
    ctx.ledger.set("local", "bundle.verify", "done", fingerprint="f", mode="auto")
    ctx.ledger.set("etcd02", "etcd.config", "failed", error="boom")
    doc = ledger_doc(ctx)
    assert set(doc) == {"cluster", "hosts", "steps", "checkpoints"}
    assert doc["cluster"] == "patroni_cluster" and doc["hosts"][0] == "local" and "node02" in doc["hosts"]
    assert doc["steps"].index("bundle.verify") < doc["steps"].index("etcd.config")
    assert [(r["host"], r["step"], r["status"]) for r in doc["checkpoints"]] == [
        ("local", "bundle.verify", "done"), ("etcd01", "etcd.config", "done"), ("etcd02", "etcd.config", "failed")]
    assert set(doc["checkpoints"][0]) == {"host", "step", "status", "mode", "started", "finished", "note"}


def test_console_off_a_terminal_is_wide_enough(monkeypatch):
    from rich.table import Table

    from runbook.console import LOG_WIDTH, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    c = make_console(file=out)
    assert not c.is_terminal and c.width == LOG_WIDTH
    t = Table()
    for col in ("endpoint", "id", "version", "db size", "leader", "raft term", "raft index", "errors"):
        t.add_column(col)
    t.add_row("https://etcd01:2379", "a31313bd2a8f9c77", "3.5.16", "44 KiB", "yes", "3", "89", "")
    c.print(t)
    assert "https://etcd01:2379" in out.getvalue() and "a31313bd2a8f9c77" in out.getvalue()
    assert "…" not in out.getvalue()
    monkeypatch.setenv("COLUMNS", "200")
    assert make_console(file=io.StringIO()).width == 200


def test_runbook_status_json_from_the_cli(tmp_path, tmp_path_factory):
    """`inv runbook.status --json` on a fresh state dir: parseable JSON on stdout, nothing created."""
    from test_bad_inputs import inv_run
    from test_cli_errors import GUARD

    guard = tmp_path_factory.mktemp("netguard")
    (guard / "sitecustomize.py").write_text(GUARD)
    r = inv_run(["runbook.status", "--json"], guard, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["cluster"] == "corpus" and doc["checkpoints"] == [] and "etcd.config" in doc["steps"]
    assert not (tmp_path / "state").exists()


def test_the_etcd_hosts_are_asked_at_once_and_listed_in_order(ctx):
    """Each answer waits (bounded, 10 s) until all three hosts were asked: one after the other, the first would
    time out and show as unreachable."""
    import threading

    captured = json.loads((DATA / "etcdctl-endpoint-status.json").read_text())
    asked = threading.Barrier(3, timeout=10)

    def answer(host, cmd):
        asked.wait()
        return 0, json.dumps([e for e in captured if f"//{host.name}:" in e["Endpoint"]])

    ctx.transport.on(r"endpoint status", answer)
    doc = etcd_doc(ctx)
    assert doc["unreachable"] == []
    assert [e["endpoint"] for e in doc["endpoints"]] == [f"https://etcd0{i}:2379" for i in (1, 2, 3)]
