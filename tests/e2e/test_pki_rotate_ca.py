"""`make soak` (RUNBOOK_SOAK=1): `pki.rotate-ca --ca all` on the session's running cluster under the writer
harness (`pki.drill --ca all`): three phases, each member of etcd and Patroni started at most once per phase
(journal), `cluster.status` healthy after each phase, 0 acknowledged rows lost, the longest write gap printed;
then every leaf on the hosts is issued by the new CAs (`pki.status`), the old CA keys are gone from state/pki,
`cluster.audit` passes. A run killed in phase 1 resumes without a second restart of any member; `cluster.up`
afterwards keeps the new CA on the hosts (state/pki and the hosts agree). CI runs the plan's unit
tests (tests/unit/test_pki_rotate_ca.py) only: the rotation restarts every member twice (minutes)."""
from __future__ import annotations

import json
import os
import time

import pytest
from helpers import inv, kill_when, ledger
from test_pki import _status, tr  # noqa: F401  (tr: a fixture)

pytestmark = pytest.mark.e2e
SOAK = os.environ.get("RUNBOOK_SOAK") == "1"


def test_the_ca_is_rotated_in_three_phases_under_a_writer(converged):
    inventory, state = converged
    pki = state / "pki"
    before = _status(state)
    old_issuers = {r["issuer"] for r in before["rows"] if r["host"] != "local"}
    dry = inv(state, "pki.rotate-ca", "--dry", timeout=300).stdout
    assert "pki.rotate-ca.discard" in dry and "irreversible" in dry and "pki.rotate.pg-server" in dry
    assert not (pki / "ca-next.crt").exists()  # --dry wrote nothing
    export = inv(state, "pki.rotate-ca", "--export", timeout=300).stdout
    assert "pki.rotate-ca.trust-etcd" in export and "**Irreversible**" in export

    out = inv(state, "pki.drill", "--ca", "all", timeout=2400).stdout
    res = json.loads(out.split("DRILL-JSON ", 1)[1].splitlines()[0])
    print(f"\npki.drill --ca all: {res['rotation_s']} s; acknowledged {res['acknowledged']}, present "
          f"{res['present']}, lost {res['lost']}, longest write gap {res['longest_write_gap_s']} s; phases: "
          + "; ".join(f"{p['phase']} {p['seconds']} s starts {p['starts']}" for p in res["phases"]))
    assert res["lost"] == 0 and res["acknowledged"] > 0 and res["present"] == res["acknowledged"]
    assert [p["phase"] for p in res["phases"]] == ["trust", "reissue", "untrust"]
    members = [h.name for h in inventory.etcd + inventory.postgres]
    for p in res["phases"]:
        assert p["unhealthy"] == [], p
        want = 0 if p["phase"] == "reissue" else 1  # a restart where the CA is read only at start; none else
        assert {h: p["starts"][h] for h in members} == {h: want for h in members}, p

    after = _status(state)
    assert after["findings"] == [], after["findings"]
    on_hosts = [r for r in after["rows"] if r["host"] != "local"]
    assert on_hosts and all(r["matches"] for r in on_hosts)
    new_issuers = {r["issuer"] for r in on_hosts}
    assert not new_issuers & old_issuers, (new_issuers, old_issuers)  # every leaf from the new CAs
    assert not list(pki.glob("*-old.key")) and (pki / "ca-retired.crt").exists()
    assert not list(pki.glob("*-next.*"))
    st = json.loads(inv(state, "cluster.status", "--json", timeout=300).stdout)
    assert st["error"] is None and not st["etcd"]["unreachable"] and len(st["etcd"]["endpoints"]) == 3
    assert sorted(m["leader"] for m in st["members"]) == [False, True]
    assert all(m["leader"] or m["streaming"] for m in st["members"])
    assert inv(state, "cluster.audit", check=False, timeout=600).returncode == 0



def _starts(tr, h, unit: str, since: float) -> int:  # noqa: F811
    r = tr.run(h, f"journalctl -u {unit} --since @{int(since)} -o cat --no-pager | grep -c '^Started ' || true",
               timeout=30)
    return int(r.stdout.strip().splitlines()[-1])


def test_a_rotation_killed_in_phase_one_resumes_without_a_second_restart(converged, tr):  # noqa: F811
    inventory, state = converged
    pki = state / "pki"
    peer_before = (pki / "peer-ca.crt").read_bytes()
    main_before = (pki / "ca.crt").read_bytes()
    since = time.time() - 1
    # SIGKILL the whole run once two etcd members took the bundle (the third may be restarting right then)
    kill_when(state, ["pki.rotate-ca", "--ca", "peer", "--yes"],
              "select 1 from checkpoints where step = 'pki.rotate-ca.trust-etcd' and status = 'done' "
              f"and host = 'etcd02' and finished > {since}", budget=600)  # this run's, not the drill's
    assert (pki / "peer-ca-next.key").exists() and (pki / "peer-ca.crt").read_bytes() == peer_before
    made = (pki / "peer-ca-next.crt").read_bytes()  # the new CA the killed run made and the hosts now trust
    out = inv(state, "pki.rotate-ca", "--ca", "peer", "--yes", timeout=900).stdout
    assert "resumed the interrupted CA rotation" in out, out[-3000:]
    # each etcd member started once in phase 1 and once in phase 3, whatever the kill interrupted; Patroni never
    starts = {h.name: _starts(tr, h, "etcd", since) for h in inventory.etcd}
    assert starts == {h.name: 2 for h in inventory.etcd}, starts
    assert {h.name: _starts(tr, h, "patroni", since) for h in inventory.postgres} == \
        {h.name: 0 for h in inventory.postgres}
    with ledger(state) as db:
        rec = db.execute("select status from checkpoints where step = 'pki.rotate-ca.discard'").fetchone()
    assert rec[0] == "done"
    assert (pki / "peer-ca.crt").read_bytes() == made  # the resumed run made no second new CA
    assert (pki / "ca.crt").read_bytes() == main_before  # --ca peer: the main CA untouched
    assert not (pki / "peer-ca-old.key").exists() and (pki / "peer-ca-retired.crt").read_bytes() == peer_before
    doc = _status(state)
    assert doc["findings"] == [], doc["findings"]
    peer_ca = next(r for r in doc["rows"] if r["host"] == "local" and r["service"] == "peer-ca")
    assert {r["issuer"] for r in doc["rows"] if r["service"] == "etcd-peer" and r["host"] != "local"} == \
        {peer_ca["subject"]}
    st = json.loads(inv(state, "cluster.status", "--json", timeout=300).stdout)
    assert st["error"] is None and not st["etcd"]["unreachable"] and len(st["etcd"]["endpoints"]) == 3
    inv(state, "cluster.up", timeout=900)  # the install's view after a rotation: nothing of the old CA put back
    after = _status(state)
    assert after["findings"] == [] and all(r["matches"] for r in after["rows"] if r["host"] != "local")


if not SOAK:  # `make soak` only: every etcd and Patroni member restarted twice under the writer (minutes)
    del test_the_ca_is_rotated_in_three_phases_under_a_writer
    del test_a_rotation_killed_in_phase_one_resumes_without_a_second_restart
