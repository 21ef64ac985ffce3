"""A cluster installed before certificates by purpose (state/pki/<host>.crt, no peer CA, no etcd auth): the
install tasks and procedures refuse it and name `pki.migrate`; pki.migrate's steps keep etcd's quorum (peers
trust both CAs before any peer certificate changes, the peer CA alone only after every peer has its new one)
and Patroni's DCS (Patroni paused and restarted with its credentials and certificates, replicas first, before
etcd auth goes on)."""
from __future__ import annotations

import json
import re

import pytest
from test_bad_inputs import VALID, guard_dir, inv_run, refused  # noqa: F401  (guard_dir: a fixture)

from runbook.core.engine import apply
from runbook.credentials.pki import ensure_ca, issue_leaf
from runbook.credentials.purposes import Purpose
from runbook.procedures import pki_migrate as pm

SWITCHED = [{"Member": "patroni_node02", "Host": "node02", "Role": "Leader", "State": "running", "TL": 2},
            {"Member": "patroni_node01", "Host": "node01", "Role": "Sync Standby", "State": "streaming", "TL": 2}]
OLD = Purpose("host", "all", ("server", "client"), "root", sans=True)  # what the one-per-host certificate was


def _legacy_pki(pki_dir, names) -> None:
    """state/pki as the runbook left it before certificates by purpose: ca.*, <host>.crt/.key, nothing else."""
    from cryptography.hazmat.primitives import serialization

    ca = ensure_ca(pki_dir)
    for n in names:
        cert, key = issue_leaf(ca, OLD, n, {n, "localhost"}, {"127.0.0.1"})
        (pki_dir / f"{n}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki_dir / f"{n}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (pki_dir / f"{n}.key").chmod(0o600)


def test_the_refusal_names_the_hosts_the_danger_and_pki_migrate(ctx):
    assert pm.refusal(ctx, "cluster.up") is None  # a new state/pki: nothing to say
    _legacy_pki(ctx.pki_dir, ["etcd01", "node01"])
    why = pm.refusal(ctx, "cluster.up")
    assert why is not None
    assert "etcd01, node01" in why and "inv pki.migrate" in why and "no quorum" in why and "DCS" in why


@pytest.mark.parametrize("args", [["cluster.up"], ["cluster.up", "--dry"], ["etcd.install"], ["etcd.add", "etcd04"]])
def test_install_tasks_and_procedures_refuse_a_one_certificate_per_host_cluster(guard_dir, tmp_path, args):  # noqa: F811
    _legacy_pki(tmp_path / "state" / "pki", ["etcd01", "etcd02", "etcd03", "node01", "node02"])
    before = sorted(p.name for p in (tmp_path / "state" / "pki").iterdir())
    r = inv_run(args, guard_dir, tmp_path)
    refused(r, tmp_path, f"{args[0]} refused: state/pki", "etcd01, etcd02, etcd03, node01, node02",
            "inv pki.migrate", code=1)
    assert sorted(p.name for p in (tmp_path / "state" / "pki").iterdir()) == before  # nothing issued


def _etcd_auth(t, events=None) -> None:
    """etcd's auth: off until the step etcd.auth's script turns it on."""
    on = []

    def status(host, cmd):
        if "auth enable" in cmd:
            on.append(host.name)
            if events is not None:
                events.append(("auth enable", host.name))
            return 0
        return 0 if on else 1
    t.on(r"auth status", status)


def _run_migration(ctx):
    t = ctx.transport
    _legacy_pki(ctx.pki_dir, [h.name for h in ctx.inventory.hosts])
    events: list[tuple] = []
    conf = ctx.paths.etcd_conf

    def restart_etcd(host, cmd):
        text = t.files[(host.name, conf)][0].decode()
        trust = re.search(r"peer-transport-security:.*?trusted-ca-file: (\S+)", text, re.S).group(1)
        events.append(("etcd restart", host.name, trust.rsplit("/", 1)[1]))
        return 0

    def seen(tag):
        return lambda host, cmd: events.append((tag, host.name)) or 0

    t.on(r"list -f json", (0, json.dumps(SWITCHED)))
    t.on(r"^test \"\$\(sha256sum < /etc/", 1)  # the migration's config checks: not yet
    _etcd_auth(t, events)
    t.on(r"systemctl restart etcd", restart_etcd)
    t.on(r"want=\$\(fp < /etc/etcd/tls/etcd-peer\.crt\)", seen("etcd-peer proven"))
    t.on(r"pause --wait", seen("pause"))
    t.on(r"systemctl restart patroni", seen("patroni restart"))
    t.on(r"resume --wait", seen("resume"))
    apply(ctx, pm.migrate_steps(ctx), list(ctx.inventory.hosts), in_order=True)
    return events


def test_the_migration_keeps_quorum_and_the_leader(ctx):
    events = _run_migration(ctx)
    etcd = ["etcd01", "etcd02", "etcd03"]
    restarts = [e for e in events if e[0] == "etcd restart"]
    # first every member trusts both CAs (one at a time), then the peer CA alone (one at a time)
    assert restarts == [("etcd restart", h, "peer-trust.crt") for h in etcd] + \
        [("etcd restart", h, "peer-ca.crt") for h in etcd]
    i_peer = [i for i, e in enumerate(events) if e[0] == "etcd-peer proven"]
    assert list(dict.fromkeys(events[i][1] for i in i_peer)) == etcd  # one host after the other
    assert events.index(restarts[2]) < i_peer[0] and i_peer[-1] < events.index(restarts[3])
    # Patroni: paused, replicas before the leader, resumed; etcd auth only then
    tail = [e for e in events if e[0] != "etcd restart" and e[0] != "etcd-peer proven"]
    assert tail[:5] == [("pause", "node01"), ("patroni restart", "node01"), ("patroni restart", "node02"),
                        ("resume", "node01"), ("auth enable", "etcd01")]
    assert {e[0] for e in tail[5:]} == {"auth enable"}  # etcd.auth's script on the others: already on
    assert events.index(tail[0]) > events.index(restarts[-1])
    # the etcd-peer files held the host's old pair until etcd-peer, then the peer CA's
    peer = ctx.transport.files[("etcd01", "/etc/etcd/tls/etcd-peer.crt")][0]
    assert peer == (ctx.pki_dir / "etcd01" / "etcd-peer.crt").read_bytes()
    trust = ctx.transport.files[("etcd01", "/etc/etcd/tls/peer-trust.crt")][0]
    assert trust == (ctx.pki_dir / "ca.crt").read_bytes() + (ctx.pki_dir / "peer-ca.crt").read_bytes()
    # Patroni's config has the etcd user and the per-purpose files before its restart
    pconf = ctx.transport.files[("node02", ctx.paths.patroni_conf)][0].decode()
    assert "etcd-client.crt" in pconf and "username: 'patroni'" in pconf.replace('"', "'")
    # state/pki: the one-per-host certificates kept aside; cluster.up is allowed again
    assert pm.legacy_hosts(ctx) == [] and (ctx.pki_dir / "legacy" / "node01.key").exists()
    assert pm.refusal(ctx, "cluster.up") is None


def test_a_resumed_migration_repeats_no_done_step(ctx):
    from runbook.procedures.membership_ops import run_operation

    _legacy_pki(ctx.pki_dir, [h.name for h in ctx.inventory.hosts])
    t = ctx.transport
    t.on(r"list -f json", (0, json.dumps(SWITCHED)))
    t.on(r"^test \"\$\(sha256sum < /etc/", 1)
    _etcd_auth(t)
    t.on(r"systemctl restart patroni", 1)  # the first Patroni restart fails: the run stops there
    with pytest.raises(Exception, match="pki.migrate.patroni"):
        run_operation(ctx, pm.OP, "c", pm.migrate_steps(ctx))
    etcd_restarts = len([c for c in t.commands() if "systemctl restart etcd" in c])
    assert etcd_restarts == 6
    t.on(r"systemctl restart patroni", 0)
    run_operation(ctx, pm.OP, "c", pm.migrate_steps(ctx))
    assert len([c for c in t.commands() if "systemctl restart etcd" in c]) == etcd_restarts  # not again
    assert len([c for c in t.commands() if "pause --wait" in c]) == 1
