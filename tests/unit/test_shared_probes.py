"""Shared probes in a host's --verify batch (runbook.core.shared, issue 16): the generated batch script run for
real by the local shell against stub binaries that count their starts. A command that two checks share runs
once and each check reads the same stdout and exit status it would get running it itself; a command one check
uses, a check on its own, a batch that cannot make its temporary directory: the command runs itself. The etcd
checks that now share or merge their etcdctl calls, and postgres.default-off without pg_lsclusters, each pass
on the right state and fail on every wrong one."""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from runbook.core.batch import batch_script, parse_batch
from runbook.core.shared import shared, to_share
from runbook.sections import etcd, postgres

STUB = """#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *"endpoint health"*) echo "https://x:2379 is healthy: took 1ms"; exit ${{HEALTH_RC:-0}} ;;
  *"auth status"*) echo "Authentication Status: ${{AUTH:-true}}"; echo "AuthRevision: 7" ;;
  *"user get patroni --detail"*) cat {detail} ;;
  *) echo "stub: unexpected $*" >&2; exit 99 ;;
esac
"""
DETAIL = """User: patroni

Role patroni
KV Read:
\t[/patroni/, /patroni0) (prefix /patroni/)
KV Write:
\t[/patroni/, /patroni0) (prefix /patroni/)
"""


@pytest.fixture
def stub(tmp_path) -> tuple[Path, Path, Path]:
    """(etcdctl stub, its log of calls, the file `user get --detail` prints)."""
    log, detail, exe = tmp_path / "calls.log", tmp_path / "detail.txt", tmp_path / "etcdctl"
    exe.write_text(STUB.format(log=log, detail=detail))
    exe.chmod(0o755)
    detail.write_text(DETAIL)
    log.touch()
    return exe, log, detail


def run(script: str, tmp: Path, **env: str) -> dict[int, int]:
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TMPDIR": str(tmpdir), **env})
    assert list(tmpdir.iterdir()) == []  # the shared answers are gone with the batch
    return parse_batch(r.stdout)[1]


def alone(check: str, **env: str) -> int:
    return subprocess.run(["sh", "-c", check], capture_output=True, timeout=60, env={**os.environ, **env}).returncode


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_a_command_two_checks_share_runs_once_and_each_reads_its_output_and_status(stub, tmp_path):
    exe, log, _ = stub
    health = shared(f"{exe} endpoint health")
    checks = [f"true && {health}", f"{health} | grep -q 'is healthy'", "true", f"{exe} auth status | grep -q true"]
    script = batch_script(checks, identity=False)
    assert list(to_share(checks)) and "RUNBOOK_SHARED=$(mktemp -d" in script
    assert run(script, tmp_path) == {0: 0, 1: 0, 2: 0, 3: 0}
    assert [c for c in calls(log) if "health" in c] == ["endpoint health"]  # once, not twice
    log.write_text("")
    rcs = run(script, tmp_path, HEALTH_RC="3")
    assert rcs == {0: 1, 1: 0, 2: 0, 3: 0}  # its status fails the check that tests it; its stdout is the same
    assert [alone(c, HEALTH_RC="3") == 0 for c in checks] == [rc == 0 for _, rc in sorted(rcs.items())]
    assert len([c for c in calls(log) if "health" in c]) == 1 + 2  # the batch once, then each check alone


def test_one_user_a_check_alone_or_no_temporary_directory_runs_the_command_itself(stub, tmp_path):
    exe, log, _ = stub
    health = shared(f"{exe} endpoint health")
    single = batch_script([health, "true"], identity=False)
    assert "mktemp" not in single and not to_share([health, "true"])
    assert run(single, tmp_path) == {0: 0, 1: 0} and len(calls(log)) == 1
    assert alone(health) == 0 and alone(health, HEALTH_RC="2") != 0 and len(calls(log)) == 3
    # the shared directory cannot be made: every reader runs the command itself, same answers
    two = batch_script([health, f"{health} >/dev/null"], identity=False)
    r = subprocess.run(["sh", "-c", two], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TMPDIR": str(tmp_path / "missing"), "HEALTH_RC": "1"})
    assert parse_batch(r.stdout)[1] == {0: 1, 1: 1} and len(calls(log)) == 5


@pytest.fixture
def on_stub(ctx, stub):
    """ctx whose etcdctl is the stub (the commands are built with it, as the hosts' are with theirs)."""
    ctx.paths = dataclasses.replace(ctx.paths, etcd_bin_dir=str(stub[0].parent))
    return ctx


def test_etcd_start_and_existing_share_one_endpoint_health(on_stub, stub, tmp_path):
    ctx, (_, log, _) = on_stub, stub
    h = ctx.inventory.etcd[0]
    conf = tmp_path / "etcd.conf"
    conf.write_text("initial-cluster-state: existing\n")
    start = etcd._start_check(ctx, h).replace("systemctl is-active -q etcd", "true")
    existing = etcd._existing_check(ctx, h).replace(ctx.paths.etcd_conf, str(conf))
    assert set(to_share([start, existing]))
    assert run(batch_script([start, existing], identity=False), tmp_path) == {0: 0, 1: 0}
    assert len(calls(log)) == 1
    assert run(batch_script([start, existing], identity=False), tmp_path, HEALTH_RC="1") == {0: 1, 1: 1}
    conf.write_text("initial-cluster-state: new\n")  # its own part still tells
    assert run(batch_script([start, existing], identity=False), tmp_path) == {0: 0, 1: 1}


@pytest.mark.parametrize("detail, auth, ok", [
    (DETAIL, "true", True),
    (DETAIL, "false", False),  # auth off
    (DETAIL.replace("Role patroni", "Role root"), "true", False),  # another role
    (DETAIL + "\nRole root\nKV Read:\nKV Write:\n", "true", False),  # a second role
    (DETAIL.split("KV Write:")[0] + "KV Write:\n", "true", False),  # read only
    (DETAIL.replace("/patroni/)", "/)"), "true", False),  # the whole key space, not the prefix
    ("", "true", False),  # no such user (etcdctl prints nothing on stdout)
])
def test_etcd_auth_in_two_etcdctl_calls(on_stub, stub, detail, auth, ok):
    _, log, detail_file = stub
    detail_file.write_text(detail)
    check = etcd._auth_check(on_stub, on_stub.inventory.etcd[0])
    assert (alone(check, AUTH=auth) == 0) is ok
    assert len(calls(log)) <= 2


def test_postgres_default_off_without_pg_lsclusters(ctx, tmp_path):
    h = ctx.inventory.postgres[0]
    check = postgres._default_off_check(ctx, h)
    assert "pg_lsclusters" not in check
    major, name = ctx.paths_for(h).default_cluster().split()
    real = f"/etc/postgresql/{major}/{name}/postgresql.conf"
    assert real in check
    conf = tmp_path / major / name / "postgresql.conf"
    local = check.replace(real, str(conf)).replace("! systemctl is-enabled -q postgresql 2>/dev/null", "true")
    assert alone(local) == 0  # no cluster
    conf.parent.mkdir(parents=True)
    conf.write_text("port = 5432\n")
    assert alone(local) != 0  # the package's cluster is there
    conf.unlink()
    conf.symlink_to(tmp_path / "gone.conf")
    assert alone(local) != 0  # a dead link: pg_lsclusters lists it too
