"""What a run pays before it does anything: building the invoke collection (every `inv` call, `--list` and
`--help` included) imports no SSH, crypto, template or sqlite-utils library, and the ledger reads and
records a run on an existing ledger file without sqlite-utils. Each check runs in a fresh interpreter:
this process has long imported them all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}  # the repo's invoke.yaml, hosts.yml
HEAVY = ("fabric", "paramiko", "cryptography", "sqlite_utils", "jinja2", "tenacity", "psycopg", "pygments")


def _fresh(code: str, cwd: Path = ROOT) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                         check=False, env=ENV)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_building_the_collection_imports_no_heavy_library():
    got = _fresh("import json, sys\n"
                 "import tasks\n"
                 "up = tasks.ns.collections['cluster'].tasks['up']\n"
                 f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))\n"
                 "print(json.dumps({'heavy': heavy, 'doc': up.__doc__ or '', 'help': sorted(up.help),\n"
                 "                  'tasks': len(tasks.ns.task_names)}))")
    assert got["heavy"] == [], f"importing the collection imported {got['heavy']}: import them inside the task"
    assert "whole runbook" in got["doc"] and {"dry", "hosts", "step", "verify"} <= set(got["help"])
    assert got["tasks"] > 40  # every collection is still there


def test_inv_list_and_help_still_work():
    for argv in (["--list"], ["--help", "cluster.up"], ["--help", "etcd.install"]):
        out = subprocess.run([sys.executable, "-m", "invoke", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=False, env=ENV)
        assert out.returncode == 0, out.stderr
        assert ("cluster.up" in out.stdout) if argv == ["--list"] else ("--verify" in out.stdout)


def test_section_roles_are_still_checked_when_the_task_runs():
    """The roles of `etcd.install` are computed when it runs (not while the collection is built): --hosts
    naming a postgres host is still refused up front."""
    out = subprocess.run([sys.executable, "-m", "invoke", "etcd.install", "--hosts", "node01", "--dry"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False, env=ENV)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "node01 has no etcd role" in out.stdout + out.stderr


def test_the_ledger_reads_and_records_a_run_without_sqlite_utils(tmp_path):
    db = tmp_path / "c.db"
    create = ("from runbook.core.ledger import Ledger\n"
              f"led = Ledger({str(db)!r}); led.acquire('first', []); led.set('etcd01', 'a.b', 'done', "
              "fingerprint='f1'); led.event('etcd01', 'a.b', 'run', 'echo', 0, 'out', ''); led.release('ok')\n"
              "import json; print(json.dumps({}))")
    _fresh(create)
    got = _fresh("import json, sys\n"
                 "from runbook.core.ledger import Ledger\n"
                 f"led = Ledger({str(db)!r})\n"
                 "rid = led.acquire('noop', ['cluster.up'])\n"
                 "recs = [(r.host, r.step, r.status, r.fingerprint) for r in led.all()]\n"
                 "led.set('etcd01', 'a.b', 'done', fingerprint='f2')\n"
                 "led.set('etcd01', 'c.d', 'running')\n"
                 "led.release('ok', 'fine')\n"
                 "runs = [(r['command'], r['outcome']) for r in led.runs()]\n"
                 "evs = [e['stdout'] for e in led.events()]\n"
                 "after = {r.step: (r.status, r.fingerprint, r.run_id) for r in led.all()}\n"
                 "print(json.dumps({'heavy': 'sqlite_utils' in sys.modules, 'rid': rid, 'recs': recs,\n"
                 "                  'runs': runs, 'evs': evs, 'after': after}))")
    assert got["heavy"] is False
    assert got["recs"] == [["etcd01", "a.b", "done", "f1"]]
    assert got["runs"] == [["noop", "ok"], ["first", "ok"]]
    assert got["evs"] == ["out"]
    assert got["after"] == {"a.b": ["done", "f2", got["rid"]], "c.d": ["running", None, got["rid"]]}


def test_loading_the_tasks_leaves_the_collector_on_with_the_start_up_frozen():
    """tasks.py loads the collection with the cyclic collector off, then moves what it loaded out of its sight
    (gc.freeze) and turns it on again: a run's collections do not walk the start-up's objects, and nothing
    is left with the collector off (a long task would grow without bound)."""
    got = _fresh("import gc, json\n"
                 "before = gc.get_freeze_count()\n"
                 "import tasks\n"
                 "print(json.dumps({'enabled': gc.isenabled(), 'before': before, 'frozen': gc.get_freeze_count()}))")
    assert got["enabled"] is True
    assert got["before"] == 0 and got["frozen"] > 20000, got
