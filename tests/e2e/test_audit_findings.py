"""An audit that can fail: bad states planted on a real PostgreSQL host at once, each one found by
`inv cluster.audit --json`, then everything restored and the audit clean again.

Planted on one node, through the way they happen in real life:
- Patroni's own config (`postgresql.pg_hba`) gets `host all all 0.0.0.0/0 scram-sha-256` on top and an md5 and
  an ident rule (for addresses no client has) at the end, then `systemctl reload patroni` (Patroni rewrites
  pg_hba.conf and reloads PostgreSQL): the audit reads the live rules (pg_hba_file_rules), and its probe from
  the other node gets an authentication request over a connection without TLS;
- a sudo journal entry carrying the rewind password (sent to `logger -t sudo` on stdin, never in argv).
Afterwards: the config put back and reloaded, the journal rotated and vacuumed.

The cluster: the session's (conftest `converged`). Runs after the other modules that share it (conftest
MODULE_ORDER) and leaves it as it found it.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
from helpers import inv, wait_for

pytestmark = pytest.mark.e2e

CONF = "/etc/patroni/config.yml"
ON_TOP = "host all all 0.0.0.0/0 scram-sha-256"
AT_END = ("hostssl all all 10.99.0.0/16 md5", "hostssl all all 10.98.0.0/16 ident")  # (a local ident is read as peer)


def with_bad_hba(conf: str) -> str:
    """Patroni's config with ON_TOP first and AT_END last in postgresql.pg_hba."""
    lines = conf.splitlines(keepends=True)
    start = next(i for i, ln in enumerate(lines) if ln.rstrip() == "  pg_hba:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("    - "):
        end += 1
    assert end > start + 1, "no pg_hba list in the Patroni config"
    return "".join([*lines[:start + 1], f"    - {ON_TOP}\n", *lines[start + 1:end],
                    *(f"    - {r}\n" for r in AT_END), *lines[end:]])


def audit_json(state: Path) -> tuple[int, dict, str]:
    p = inv(state, "cluster.audit", "--json", check=False, timeout=300)
    assert p.returncode in (0, 1), f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.returncode, json.loads(p.stdout), p.stdout + p.stderr


def findings(doc: dict) -> list[tuple[str, str, str]]:
    return [(c["host"], c["check"], f) for c in doc["checks"] for f in c["findings"]]


def test_planted_bad_states_are_each_found_then_the_audit_is_clean_again(converged, lab_transport):
    from runbook.cluster.render import Paths
    from runbook.credentials.secrets import load_secrets
    from runbook.procedures.audit_hba import HBA_SQL, parse_hba_rows
    from runbook.procedures.audit_probes import PLAIN_PROBE, PROBE_ROLE

    inventory, state = converged
    t, paths = lab_transport, Paths()
    node, peer = inventory.postgres[-1], inventory.postgres[0]
    secret = load_secrets(state)["rewind"]["password"]
    original = t.run(node, f"cat {CONF}").stdout
    assert "  pg_hba:\n" in original

    def live_rules() -> list:
        r = t.run(node, f"{paths.pg_bin_dir(inventory.cluster.postgres_major)}/psql -X -h {paths.socket_dir} "
                        f"-d postgres -tA -F '|' -c {shlex.quote(HBA_SQL)}", user="postgres", timeout=30)
        return parse_hba_rows(r.stdout)

    def plain_answer() -> str:  # the audit's own probe, from the peer
        r = t.run(peer, f"{paths.patroni_venv}/bin/python - {PROBE_ROLE} {node.address}:5432", user="postgres",
                  stdin=PLAIN_PROBE.encode(), timeout=30)
        return r.stdout.partition("|")[2].strip()

    def reload_with(conf: str, bad: bool) -> None:
        t.put(node, CONF, conf.encode(), mode="0600", owner="postgres")
        assert t.run(node, "systemctl reload patroni", timeout=60).ok
        wait_for(lambda: (live_rules()[0].text() == ON_TOP) == bad and plain_answer().startswith("auth:") == bad,
                 60)

    t0 = time.monotonic()
    try:
        reload_with(with_bad_hba(original), bad=True)
        line = {r.text(): r.line for r in live_rules()}  # Patroni heads the file with comments: lines from 3
        r = t.run(node, "pw=$(cat); printf 'runbook : TTY=unknown ; PWD=/ ; USER=root ; COMMAND=/usr/bin/psql "
                        "password=%s\\n' \"$pw\" | logger -t sudo", stdin=secret.encode(), timeout=30)
        assert r.ok, r.stderr
        print(f"\nplanted on {node.name} in {time.monotonic() - t0:.1f}s")
        t1 = time.monotonic()
        rc, doc, raw = audit_json(state)
        print(f"audit with the bad states: {time.monotonic() - t1:.1f}s, {doc['findings']} finding(s)")
        assert secret not in raw  # findings name the secret, never show it
    finally:
        reload_with(original, bad=False)
        # an entry cannot be cut out of the journal: archive the files that hold it, then delete them
        t.run(node, "journalctl --rotate && sleep 2 && journalctl --vacuum-time=1s", timeout=60)

    got = findings(doc)
    print("\n".join(f"  {h} | {c} | {f}" for h, c, f in got))
    assert rc == 1 and doc["findings"] == len(got)
    assert {h for h, _, _ in got} == {node.name}, got
    hba = [f for _, c, f in got if c.startswith("pg_hba")]
    on_top, nossl, superuser = line[ON_TOP], line["hostnossl all all 0.0.0.0/0 reject"], line[
        f"hostssl all {load_secrets(state)['superuser']['username']} 0.0.0.0/0 reject"]
    assert hba[0] == f"pg_hba line {on_top}: `{ON_TOP}` accepts connections without TLS (want hostssl, or reject)"
    assert any(f.startswith(f"pg_hba line {nossl}: the reject `hostnossl all all 0.0.0.0/0 reject` comes after "
                            f"accepting line(s) {on_top} ") for f in hba), hba
    assert any(f.startswith(f"pg_hba line {superuser}: the reject") and f"line(s) {on_top} " in f
               for f in hba), hba  # the superuser's reject is defeated too: `host` covers TLS connections
    assert any(f"line {line[AT_END[0]]}: `{AT_END[0]}` uses md5" in f for f in hba), hba
    assert any(f"line {line[AT_END[1]]}: `{AT_END[1]}` uses ident" in f for f in hba), hba
    assert len(hba) == 5, hba
    plain = [f for _, c, f in got if c == f"PostgreSQL refuses a client without TLS ({node.address}:5432)"]
    assert plain == [f"{node.address}:5432 accepted a login without TLS from {peer.name} and asked for SCRAM "
                     "(SASL): pg_hba (or the pooler) lets clients in over a connection without TLS"], got
    sudo = [f for _, c, f in got if c == "no secret in the journal's sudo entries"]
    assert len(sudo) == 1 and sudo[0].startswith(f"{node.name}: a sudo journal entry at "), got
    assert "holds the rewind password" in sudo[0], sudo
    assert len(got) == 7, got

    t1 = time.monotonic()
    rc, doc, _ = audit_json(state)
    print(f"audit after the restore: {time.monotonic() - t1:.1f}s, {doc['findings']} finding(s)")
    assert rc == 0 and doc["findings"] == 0, findings(doc)
    names = {c["check"] for c in doc["checks"]}
    assert "no secret in the journal's sudo entries" in names
    assert {f"PostgreSQL refuses a client without TLS ({h.address}:5432)" for h in inventory.postgres} <= names
