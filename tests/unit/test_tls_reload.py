"""A renewed certificate reaches the service: tls_files() ends with a reload-and-prove action, and its shell
logic is run here for real against stub `systemctl` and `openssl` (a fake host in a temp dir)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runbook.core.step import Put, Run
from runbook.sections import tls_files as tf

STUB_OPENSSL = """#!/bin/sh
# x509 -fingerprint: the "fingerprint" is the first line of the PEM on stdin; s_client: what the port serves
case "$1" in
  x509) read -r line || exit 1; echo "sha256 Fingerprint=$line";;
  s_client) for a; do port=${a##*:}; done; f="$STATE/served_$port"; [ -s "$f" ] && cat "$f" || exit 1;;
esac
"""
STUB_SYSTEMCTL = """#!/bin/sh
case "$1" in
  is-active) [ -e "$STATE/active" ];;
  reload) echo "$2" >> "$STATE/reloads"; [ -e "$STATE/reload_works" ] && for f in "$STATE"/served_*; do
            cp "$STATE/cert" "$f"; done; [ -e "$STATE/reload_breaks" ] && rm -f "$STATE"/served_*; true;;
esac
"""


@pytest.fixture
def host_sim(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("openssl", STUB_OPENSSL), ("systemctl", STUB_SYSTEMCTL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "cert").write_text("NEW\n")
    monkeypatch.setattr(tf, "SERVE_WAIT", 2)

    def run(script: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STATE=str(tmp_path))
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return tmp_path, run


def script(inv, tmp: Path, owner: str = "postgres") -> str:
    """The proof for one certificate on the ports of both Patroni-served purposes (or etcd's client port)."""
    if owner == "etcd":
        unit, reload, ports = tf.SERVED_BY["etcd-server"]
    else:
        unit, reload, ports = tf.SERVED_BY["rest-server"]
        ports = ports + tf.SERVED_BY["pg-server"][2]
    return tf.serve_new_cert(inv.get("node01"), str(tmp / "cert"), unit, reload, ports)


def test_tls_files_end_with_the_reload_and_the_proof(ctx, inv):
    acts = tf.tls_files(ctx, inv.get("node01"), ctx.paths.patroni_tls_dir, "postgres")
    # dir, CA, then per purpose: etcd-client (no proof: a client), rest-server + proof, rest-client, pg-server + proof
    assert [type(a) for a in acts] == [Run, Put, Put, Put, Put, Put, Run, Put, Put, Put, Put, Run]
    rest, pg = acts[6].cmd, acts[-1].cmd
    assert "systemctl is-active -q patroni" in rest and "systemctl reload patroni" in rest
    assert "for p in 8008;" in rest and "rest-server.crt" in rest
    assert "for p in 5432:postgres;" in pg and '-starttls ${1#*:}' in pg and "pg-server.crt" in pg
    etcd = [a.cmd for a in tf.tls_files(ctx, inv.get("etcd01"), ctx.paths.etcd_tls_dir, "etcd") if isinstance(a, Run)]
    assert any("for p in 2379;" in c and "etcd-server.crt" in c for c in etcd)
    assert any("for p in 2380;" in c and "etcd-peer.crt" in c for c in etcd)
    assert not any("systemctl reload" in c for c in etcd)  # etcd re-reads per handshake


def test_not_running_first_install_does_nothing(inv, host_sim):
    tmp, run = host_sim
    r = run(script(inv, tmp))
    assert r.returncode == 0 and "not running" in r.stdout and not (tmp / "reloads").exists()


def test_old_certificate_served_is_reloaded_and_proven(inv, host_sim):
    tmp, run = host_sim
    for f in ("active", "reload_works"):
        (tmp / f).touch()
    for port in (8008, 5432):
        (tmp / f"served_{port}").write_text("OLD\n")
    r = run(script(inv, tmp))
    assert r.returncode == 0, r.stderr
    assert (tmp / "reloads").read_text() == "patroni\n"
    assert "192.168.60.131:8008 serves NEW" in r.stdout and "192.168.60.131:5432 serves NEW" in r.stdout


def test_new_certificate_already_served_needs_no_reload(inv, host_sim):
    tmp, run = host_sim
    (tmp / "active").touch()
    (tmp / "served_8008").write_text("NEW\n")  # PostgreSQL not answering: the REST API alone proves it
    r = run(script(inv, tmp))
    assert r.returncode == 0 and not (tmp / "reloads").exists()
    assert "5432 serves nothing" in r.stdout


def test_a_reload_that_does_not_take_the_file_fails_with_both_fingerprints(inv, host_sim):
    tmp, run = host_sim
    (tmp / "active").touch()
    for port in (8008, 5432):
        (tmp / f"served_{port}").write_text("OLD\n")
    r = run(script(inv, tmp))
    assert r.returncode == 1
    assert "node01: 2 s after systemctl reload patroni, patroni does not serve" in r.stderr
    assert "(NEW)" in r.stderr and "8008 serves OLD" in r.stderr


def test_running_but_serving_no_tls_yet_is_left_to_its_own_section(inv, host_sim):
    """A package's service started with its default config (PgBouncer on localhost) before its section ran:
    no port of it answers TLS, so there is nothing to reload and nothing to prove yet."""
    tmp, run = host_sim
    (tmp / "active").touch()
    r = run(script(inv, tmp, "etcd"))
    assert r.returncode == 0 and "serves no TLS on 192.168.60.131:2379 yet" in r.stdout, r.stdout + r.stderr
    assert not (tmp / "reloads").exists()


def test_a_reload_after_which_nothing_is_served_is_not_proof(inv, host_sim):
    tmp, run = host_sim
    for f in ("active", "reload_breaks"):
        (tmp / f).touch()
    (tmp / "served_8008").write_text("OLD\n")  # Patroni's REST API served the old one, then nothing after the reload
    r = run(script(inv, tmp))
    assert r.returncode == 1 and "8008 serves nothing" in r.stderr, r.stdout + r.stderr
    assert (tmp / "reloads").read_text() == "patroni\n"
