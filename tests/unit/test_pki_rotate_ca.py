"""The plan of `pki.rotate-ca` on the fake transport: three phases in order, the trust bundle's contents at each
restart, one restart per member per phase, the leader last, issuance from the new CA, the old CA's key kept
aside (0600) until the irreversible `discard`, and a resumed run that repeats no done step (the lab proves it
live: tests/e2e/test_pki_rotate_ca.py under `make soak`)."""
from __future__ import annotations

import json
import re
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from runbook.credentials.pki import load_ca, signed_by
from runbook.errors import ProcedureFailed
from runbook.procedures import pki_rotate_ca as rc
from runbook.sections.tls_files import host_purposes, sans

LEADER = ('{"members": [{"name": "patroni_node01", "host": "node01", "role": "leader", "state": "running"}, '
          '{"name": "patroni_node02", "host": "node02", "role": "sync_standby", "state": "streaming"}]}')
MEMBERS = [{"Member": "patroni_node01", "Host": "node01", "Role": "Leader", "State": "running", "TL": 1},
           {"Member": "patroni_node02", "Host": "node02", "Role": "Sync Standby", "State": "streaming", "TL": 1}]


def _installed(ctx) -> None:
    """state/pki as `cluster.up` leaves it: both CAs, every leaf."""
    for h in ctx.inventory.hosts:
        dns, ips = sans(ctx, h)
        for p in host_purposes(h, ctx.inventory):
            ctx.pki.leaf(h.name, p, dns, ips)


def _fake(ctx, events: list, fail_on: str | None = None) -> None:
    t = ctx.transport
    t.on(r"(?s)python3 -I -S -c .* /cluster$", (0, LEADER))
    t.on(r"list -f json", (0, json.dumps(MEMBERS)))
    seen: dict = {}  # (unit, host) -> the CA files it read when it last started

    def ca_files(unit, host):
        tls = ctx.paths.etcd_tls_dir if unit == "etcd" else ctx.paths.patroni_tls_dir
        return {n: t.files[(host.name, f"{tls}/{n}")][0] for n in ("ca.crt", "peer-ca.crt")
                if (host.name, f"{tls}/{n}") in t.files}

    def started_after(host, cmd):  # the restart checks: the unit read the files as they are now
        unit = re.match(r"systemctl is-active -q (\w+)", cmd).group(1)
        return 0 if seen.get((unit, host.name)) == ca_files(unit, host) else 1
    t.on(r"^systemctl is-active -q (etcd|patroni) && test", started_after)

    def restart(unit):
        def answer(host, cmd):
            n = 1 + sum(1 for e in events if e[:2] == (unit, host.name))
            if fail_on in (f"{unit}@{host.name}", f"{unit}@{host.name}#{n}"):  # this restart fails
                return 1
            seen[(unit, host.name)] = ca_files(unit, host)
            events.append((unit, host.name, seen[(unit, host.name)]))
            return 0
        return answer
    t.on(r"^systemctl restart etcd$", restart("etcd"))
    t.on(r"^systemctl restart patroni$", restart("patroni"))
    t.on(r"pause --wait", lambda h, c: events.append(("pause", h.name, {})) or 0)
    t.on(r"resume --wait", lambda h, c: events.append(("resume", h.name, {})) or 0)


def _pems(b: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(b)]


def test_the_plan_has_three_phases_in_order_and_only_discard_is_irreversible(ctx):
    _installed(ctx)
    phases = rc.phase_steps(ctx, rc.cas_of("all"), "op-1")
    assert [p for p, _ in phases] == list(rc.PHASES)
    names = {p: [s.name.removeprefix("pki.rotate-ca.") for s in steps] for p, steps in phases}
    assert names["trust"] == ["new-ca", "trust-files", "trust-etcd", "trust-pause", "trust-patroni", "trust-resume",
                              "trust-others"]
    assert names["reissue"][:2] == ["switch", "pki.rotate.issue"]  # pki.rotate's own steps, reused
    assert set(names["reissue"][2:]) == {"pki.rotate." + p for p in ("etcd-peer", "etcd-server", "etcd-root",
                                                                      "etcd-client", "rest-server", "rest-client",
                                                                      "pg-server")}
    assert names["untrust"][-1] == "discard"
    marked = [s.name for _, steps in phases for s in steps if s.irreversible]
    assert marked == ["pki.rotate-ca.discard"]
    # the peer CA alone: etcd only (nothing else verifies with it), only the etcd-peer leaves re-issued
    peer = {p: [s.name.removeprefix("pki.rotate-ca.") for s in steps]
            for p, steps in rc.phase_steps(ctx, rc.cas_of("peer"), "op-2")}
    assert peer["trust"] == ["new-ca", "trust-files", "trust-etcd"]
    assert peer["reissue"] == ["switch", "pki.rotate.issue", "pki.rotate.etcd-peer"]
    with pytest.raises(ProcedureFailed, match="--ca both: one of main, peer, all"):
        rc.cas_of("both")


def test_the_trust_files_hold_old_and_new_then_the_new_alone(ctx):
    _installed(ctx)
    old_main, old_peer = (ctx.pki_dir / "ca.crt").read_bytes(), (ctx.pki_dir / "peer-ca.crt").read_bytes()
    files = {(p, w) for p, _, w in rc.host_ca_files(ctx, ctx.inventory.get("etcd01"), rc.cas_of("all"))}
    assert files == {("/etc/etcd/tls/ca.crt", "ca"), ("/etc/etcd/tls/peer-ca.crt", "peer-ca")}
    node = rc.host_ca_files(ctx, ctx.inventory.get("node01"), rc.cas_of("all"))
    assert [(p, o, w) for p, o, w in node] == [("/opt/patroni/.tls/ca.crt", "postgres", "ca")]
    steps = rc.rotate_ca_steps(ctx, rc.cas_of("all"), "op-1")
    steps[0].actions_fn(ctx, None)[0].fn()  # new-ca
    new_main = (ctx.pki_dir / "ca-next.crt").read_bytes()
    assert stat.S_IMODE((ctx.pki_dir / "ca-next.key").stat().st_mode) == 0o600
    trust = {a.path: a.content for a in steps[1].actions_fn(ctx, ctx.inventory.get("etcd01"))}
    assert _pems(trust["/etc/etcd/tls/ca.crt"]) == _pems(old_main + new_main)
    new_peer = (ctx.pki_dir / "peer-ca-next.crt").read_bytes()
    assert _pems(trust["/etc/etcd/tls/peer-ca.crt"]) == _pems(old_peer + new_peer)
    untrust = next(s for s in steps if s.name == "pki.rotate-ca.untrust-files")
    assert {a.path: a.content for a in untrust.actions_fn(ctx, ctx.inventory.get("node01"))} == \
        {"/opt/patroni/.tls/ca.crt": new_main}


def test_a_full_rotation_restarts_each_member_once_per_phase_leader_last_and_issues_from_the_new_ca(ctx):
    _installed(ctx)
    old_ca = load_ca(ctx.pki_dir)
    events: list = []
    _fake(ctx, events)
    report, op_id, resumed = rc.run_rotate_ca(ctx, rc.cas_of("all"))
    assert not resumed
    restarts = [(u, h) for u, h, _ in events if u in ("etcd", "patroni")]
    etcd = [("etcd", h) for h in ("etcd01", "etcd02", "etcd03")]
    patroni = [("patroni", "node02"), ("patroni", "node01")]  # the replica first, the leader last
    assert restarts == etcd + patroni + etcd + patroni  # one restart per member per phase, none in phase 2
    assert [e[:2] for e in events if e[0] in ("pause", "resume")] == [("pause", "node01"), ("resume", "node01")] * 2
    new_ca = load_ca(ctx.pki_dir)
    assert new_ca.cert.fingerprint(hashes.SHA256()) != old_ca.cert.fingerprint(hashes.SHA256())
    # every restart of phase 1 saw old + new; of phase 3 the new alone
    first, third = events[:len(events) // 2], events[len(events) // 2:]
    for _, host, files in [e for e in first if e[0] in ("etcd", "patroni")]:
        assert len(_pems(files["ca.crt"])) == 2, host
    for _, host, files in [e for e in third if e[0] in ("etcd", "patroni")]:
        assert _pems(files["ca.crt"]) == _pems((ctx.pki_dir / "ca.crt").read_bytes()), host
    # every leaf in state/pki and on the hosts issued by the new CAs
    peer_ca = load_ca(ctx.pki_dir, "peer-ca")
    for h in ctx.inventory.hosts:
        for p in host_purposes(h, ctx.inventory):
            crt = ctx.pki_dir / h.name / f"{p.name}.crt"
            assert signed_by(x509.load_pem_x509_certificate(crt.read_bytes()),
                             (peer_ca if p.ca == "peer-ca" else new_ca).cert), (h.name, p.name)
    sent = ctx.transport.commands("node01")
    assert any("/opt/patroni/.tls/pg-server.crt" in c and "openssl s_client" in c for c in sent)  # proven served
    # the old keys gone, their certificates kept; no marker left; the operation recorded done
    assert sorted(p.name for p in ctx.pki_dir.glob("*-old.*")) == []
    assert (ctx.pki_dir / "ca-retired.crt").read_bytes() == old_ca.cert.public_bytes(serialization.Encoding.PEM)
    assert not list(ctx.pki_dir.glob(".ca-discarded-*")) and not list(ctx.pki_dir.glob(".issued-*"))
    rec = ctx.ledger.get("local", f"membership:{rc.OP}:{rc.target(ctx, rc.cas_of('all'))}")
    assert rec.status == "done" and rec.note == op_id
    assert ("local", "pki.rotate-ca.discard") in report.executed


def test_the_old_key_is_kept_aside_0600_until_discard_and_a_resumed_run_repeats_nothing(ctx):
    _installed(ctx)
    old_key = (ctx.pki_dir / "ca.key").read_bytes()
    events: list = []
    _fake(ctx, events, fail_on="patroni@node02")  # phase 1's first Patroni restart fails
    with pytest.raises(Exception, match="pki.rotate-ca.trust-patroni"):
        rc.run_rotate_ca(ctx, rc.cas_of("main"))
    assert len([e for e in events if e[0] == "etcd"]) == 3
    events.clear()
    _fake(ctx, events)
    report, _, resumed = rc.run_rotate_ca(ctx, rc.cas_of("main"))
    assert resumed
    # resumed: phase 1's etcd restarts and new-ca not repeated; node02 then node01, then phase 3's restarts
    assert [(u, h) for u, h, _ in events if u in ("etcd", "patroni")] == \
        [("patroni", "node02"), ("patroni", "node01"), ("etcd", "etcd01"), ("etcd", "etcd02"), ("etcd", "etcd03"),
         ("patroni", "node02"), ("patroni", "node01")]
    assert not any(s == "pki.rotate-ca.new-ca" for _, s in report.executed)
    assert not (ctx.pki_dir / "ca-old.key").exists() and (ctx.pki_dir / "ca.key").read_bytes() != old_key


def test_a_run_interrupted_before_discard_keeps_the_old_key_0600_and_never_discards_twice(ctx):
    _installed(ctx)
    old_key = (ctx.pki_dir / "ca.key").read_bytes()
    events: list = []
    _fake(ctx, events, fail_on="etcd@etcd02#2")  # phase 3's restart of etcd02
    with pytest.raises(Exception, match="pki.rotate-ca.untrust-etcd"):
        rc.run_rotate_ca(ctx, rc.cas_of("main"))
    kept = ctx.pki_dir / "ca-old.key"
    assert kept.read_bytes() == old_key and stat.S_IMODE(kept.stat().st_mode) == 0o600
    events.clear()
    _fake(ctx, events)
    report, _, resumed = rc.run_rotate_ca(ctx, rc.cas_of("main"))
    assert resumed and ("local", "pki.rotate-ca.discard") in report.executed and not kept.exists()
    assert [h for u, h, _ in events if u == "etcd"] == ["etcd02", "etcd03"]  # etcd01 took it already
    # a third run of the same rotation: a new operation, never a second discard of the same key
    steps = rc.rotate_ca_steps(ctx, rc.cas_of("main"), "op-x")
    discard = steps[-1]
    assert discard.irreversible and re.search("old CA's key", discard.irreversible)


def test_dry_plans_every_step_on_its_hosts_marks_discard_and_writes_nothing(ctx):
    import dataclasses

    _installed(ctx)
    ctx.transport.on(r"(?s)python3 -I -S -c .* /cluster$", (0, LEADER))
    before = sorted(p.name for p in ctx.pki_dir.rglob("*"))
    steps = rc.rotate_ca_steps(ctx, rc.cas_of("all"), "op-dry")
    hosts = {s.name.removeprefix("pki.rotate-ca."): [h.name for h in s.hosts(ctx, ctx.inventory.hosts)] for s in steps}
    assert hosts["trust-etcd"] == hosts["untrust-etcd"] == ["etcd01", "etcd02", "etcd03"]
    assert hosts["trust-patroni"] == hosts["untrust-patroni"] == ["node02", "node01"]  # the leader last
    assert hosts["trust-pause"] == hosts["trust-resume"] == ["node01"] and hosts["trust-others"] == []
    assert hosts["pki.rotate.pg-server"] == ["node02", "node01"]
    ctx.options = dataclasses.replace(ctx.options, dry=True)
    report, _, _ = rc.run_rotate_ca(ctx, rc.cas_of("all"))
    planned = [(d.step.name, d.host.name, d.step.irreversible) for d in report.plan]
    assert ("pki.rotate-ca.discard", "local", steps[-1].irreversible) in planned
    assert [n for n, _, irr in planned if irr] == ["pki.rotate-ca.discard"]
    assert sorted(p.name for p in ctx.pki_dir.rglob("*")) == before  # nothing written
    assert ctx.ledger.get("local", f"membership:{rc.OP}:{rc.target(ctx, rc.cas_of('all'))}") is None


def test_install_and_membership_runs_are_refused_while_a_rotation_is_unfinished(ctx):
    from runbook.procedures.pki_migrate import refusal

    _installed(ctx)
    assert refusal(ctx, "cluster.up") is None
    steps = rc.rotate_ca_steps(ctx, rc.cas_of("peer"), "op-r")
    steps[0].actions_fn(ctx, None)[0].fn()  # new-ca: peer-ca-next.* in state/pki
    why = refusal(ctx, "etcd.add")
    assert why and "a CA rotation is unfinished" in why and "peer-ca-next.crt" in why and "inv pki.rotate-ca" in why
    switch = next(s for s in steps if s.name == "pki.rotate-ca.switch")
    switch.actions_fn(ctx, None)[0].fn()  # the old key kept aside: still unfinished
    assert "peer-ca-old.key" in (refusal(ctx, "cluster.up") or "")
    next(s for s in steps if s.name == "pki.rotate-ca.discard").actions_fn(ctx, None)[0].fn()
    assert refusal(ctx, "cluster.up") is None
