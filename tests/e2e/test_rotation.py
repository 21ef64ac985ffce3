"""Day-2 credentials on real hosts: every password rotated after a switchover under a concurrent writer, and
renewed host certificates that reach etcd, the Patroni REST API and PostgreSQL without a restart.

Host names and addresses come from the e2e inventory (RUNBOOK_E2E_INVENTORY); the cluster is the session's
(conftest `converged`). Figures are printed (pytest -s shows them).
"""
from __future__ import annotations

import hashlib
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from helpers import inv, kill_when

from runbook.cluster.context import Ctx
from runbook.cluster.readers import members, wait
from runbook.core.transport import SshTransport
from runbook.procedures.drill import Writer, prepare_table, prove, writer_dsn

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rig(converged):
    """(inventory, state dir, a Ctx on the session's cluster with its own SSH connections)."""
    inventory, state = converged
    ctx = Ctx(inventory=inventory, transport=SshTransport(), state_dir=state, bundle_dir=state / "unused")
    yield inventory, state, ctx
    ctx.transport.close()


def _passwords(state: Path) -> dict[str, str]:
    return {k: v["password"] for k, v in yaml.safe_load((state / "secrets.yml").read_text()).items()}


def _login(ctx: Ctx, user: str, password: str) -> str:
    """A TLS login from the control machine to the current primary: 'ok' or the server's refusal."""
    parts = dict(kv.split("=", 1) for kv in writer_dsn(ctx).split())
    parts.update(user=user, password=password)
    try:
        with psycopg.connect(**parts) as conn:
            conn.execute("select 1")
        return "ok"
    except psycopg.OperationalError as exc:
        return "refused" if "password authentication failed" in str(exc) else f"error {exc}"


class StreamWatch:
    """Samples `patronictl list` every 0.5 s in a thread: how often every replica was streaming. A patronictl
    refused by etcd (it logs in afresh with the config's etcd password, which runs ahead of etcd's between the
    configs and `user passwd`: runbook.procedures.secrets_etcd) is counted apart, with its time."""

    def __init__(self, ctx: Ctx):
        self.ctx, self.ok_at, self.bad, self.etcd_refused = ctx, [], [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t = SshTransport()  # its own connections: the main thread uses ctx.transport
        c = Ctx(inventory=self.ctx.inventory, transport=t, state_dir=self.ctx.state_dir, bundle_dir=Path("."))
        while not self._stop.wait(0.5):
            try:
                ms = members(c)
            except Exception as exc:
                if "authentication failed, invalid user ID or password" in str(exc):
                    self.etcd_refused.append(time.monotonic())
                else:
                    self.bad.append(f"no answer: {exc}")
                continue
            self.ok_at.append(time.monotonic())
            off = [f"{m.name}={m.role}/{m.state}" for m in ms if not m.is_leader and not m.streaming]
            if off or sum(m.is_leader for m in ms) != 1:
                self.bad.append(", ".join(f"{m.name}={m.role}/{m.state}" for m in ms))
        t.close()

    @property
    def samples(self) -> int:
        return len(self.ok_at)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(30)


def test_rotate_every_password_after_a_switchover_under_a_writer(rig):
    inventory, state, ctx = rig
    inv(state, "patroni.switchover", "--force", timeout=300)  # the leader is no longer the first host
    lead = next(m for m in members(ctx) if m.is_leader)
    old = _passwords(state)
    prepare_table(ctx, next(h for h in inventory.postgres if f"patroni_{h.name}" == lead.name))
    w = Writer(writer_dsn(ctx), f"rotation-{int(time.time())}")
    w.start()
    assert wait(lambda: len(w.acked) >= 5, 30, 0.2), f"the writer could not write (errors {w.errors})"
    t0 = time.monotonic()
    with StreamWatch(ctx) as watch:
        out = inv(state, "secrets.rotate", timeout=600).stdout
        t_rot = time.monotonic() - t0
        ctx._secrets = None
        w.dsn = writer_dsn(ctx)  # a reconnect from now on uses the new admin password
        t_mark = time.monotonic()
        assert wait(lambda: sum(at > t_mark for _, at in list(w.acked)) >= 20, 30, 0.5), "no writes after it"
        # the cluster as patronictl sees it once the rotation is over (a loaded host: ~1-3 s a sample)
        assert wait(lambda: any(at > t_mark for at in list(watch.ok_at)), 30, 0.5), "patronictl never answered after it"
    assert w.stop(30)
    res = prove(ctx, w)
    new = _passwords(state)
    # every password changed, the etcd user's too (in etcd after every Patroni has it: secrets_etcd)
    assert set(new) == set(old) and not [k for k in old if new[k] == old[k]]
    admin = ctx.secrets["admin"]["username"]
    logins = {"admin new": _login(ctx, admin, new["admin"]), "admin old": _login(ctx, admin, old["admin"])}
    gap = w.gap(t0, t_mark)[0]
    print(f"\nrotation after switchover (leader {lead.name}): {t_rot:.1f} s; rows acknowledged {res['acknowledged']}, "
          f"present {res['present']}, lost {res['lost']}; longest write gap during it {gap:.2f} s; write errors "
          f"{res['write_errors']}; stream samples {watch.samples} (+{len(watch.etcd_refused)} refused by etcd), "
          f"not streaming {len(watch.bad)}; logins {logins}")
    assert "✓ secrets.rotate" in out and f"rotated on the leader {lead.name.removeprefix('patroni_')}" in out
    assert res["lost"] == 0 and res["acknowledged"] == res["present"] > 0
    # the daemons kept the cluster (leader, streaming) in every sample patronictl answered: before, during and
    # after; the samples etcd refused (its password window, below) count as tries only
    assert watch.samples + len(watch.etcd_refused) >= 5 and watch.samples >= 2 and watch.bad == [], watch.bad
    # patronictl alone is refused by etcd between the configs and `user passwd`: about one Patroni loop
    window = (watch.etcd_refused[-1] - watch.etcd_refused[0]) if watch.etcd_refused else 0.0
    print(f"patronictl refused by etcd for {window:.1f} s ({len(watch.etcd_refused)} samples)")
    assert window <= inventory.cluster.patroni.loop_wait + 10, window
    assert logins == {"admin new": "ok", "admin old": "refused"}
    assert "verify    TLS logins" in out  # every role: new logs in, old refused (on the leader, over TLS)
    assert not (state / "secrets.rotation.yml").exists()
    journal = inv(state, "cluster.audit", check=False)
    assert journal.returncode == 0, journal.stdout[-3000:]  # no secret in logs, journal or ledger


def test_rotation_killed_after_the_alter_resumes_with_the_same_password(rig):
    inventory, state, ctx = rig
    kill_when(state, ["secrets.rotate", "--role", "admin"],
              "select 1 from checkpoints c join runs r on r.id = c.run_id where c.step = 'secrets.rotate.alter' "
              "and c.status = 'done' and r.command = 'secrets.rotate' and r.outcome = 'running'", budget=300)
    pending = yaml.safe_load((state / "secrets.rotation.yml").read_text())["roles"]["admin"]
    ctx._secrets = None
    user = ctx.secrets["admin"]["username"]
    assert _login(ctx, user, pending["new"]) == "ok"  # applied on the cluster, before any config has it
    assert _login(ctx, user, pending["old"]) == "refused"
    out = inv(state, "secrets.rotate", timeout=600).stdout
    assert "resuming rotation" in out and "✓ alter" not in out  # the ALTER is not repeated
    assert _passwords(state)["admin"] == pending["new"]  # not generated again
    assert not (state / "secrets.rotation.yml").exists()
    print(f"\nkilled after the alter, resumed: {out.strip().splitlines()[-1]}")


# -- certificates ---------------------------------------------------------------------------------
def _served(address: str, port: int, starttls_postgres: bool = False) -> str:
    """SHA-256 of the certificate a fresh TLS handshake gets from address:port (PostgreSQL: SSLRequest first)."""
    c = ssl.create_default_context()
    c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((address, port), timeout=5) as raw:
        if starttls_postgres:
            raw.sendall(struct.pack("!ii", 8, 80877103))
            assert raw.recv(1) == b"S", f"{address}:{port} refused TLS"
        with c.wrap_socket(raw) as s:
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def _file_fp(path: Path) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)).hexdigest()


def _pids(ctx: Ctx, host, units: list[str]) -> list[str]:
    cmd = "; ".join(f"systemctl show -p MainPID --value {u}" for u in units)
    if "patroni" in units:
        cmd += f"; head -n 1 /data/{ctx.inventory.cluster.postgres_major}/postmaster.pid"
    return ctx.transport.run(host, cmd, timeout=30).stdout.split()


def test_renewed_certificates_are_served_without_a_restart(rig):
    inventory, state, ctx = rig
    pg, etcd = inventory.postgres[0], inventory.etcd[0]
    for h in inventory.postgres:  # the bootstrap script is there for the first start only (10.8)
        assert ctx.transport.run(h, f"test ! -e {ctx.paths.post_bootstrap}", timeout=30).ok, h.name
    files = {f"{pg.name}:8008": state / "pki" / pg.name / "rest-server.crt",
             f"{pg.name}:5432": state / "pki" / pg.name / "pg-server.crt",
             f"{etcd.name}:2379": state / "pki" / etcd.name / "etcd-server.crt"}
    old = {k: _file_fp(f) for k, f in files.items()}
    pids = {pg.name: _pids(ctx, pg, ["patroni"]), etcd.name: _pids(ctx, etcd, ["etcd"])}
    for f in files.values():
        f.unlink()  # forces a re-issue (new key and certificate)
    t0 = time.monotonic()
    out = inv(state, "cluster.up", timeout=900).stdout
    took = time.monotonic() - t0
    new = {k: _file_fp(f) for k, f in files.items()}
    served = {f"{pg.name}:8008": _served(pg.address, 8008), f"{pg.name}:5432": _served(pg.address, 5432, True),
              f"{etcd.name}:2379": _served(etcd.address, 2379)}
    after = {pg.name: _pids(ctx, pg, ["patroni"]), etcd.name: _pids(ctx, etcd, ["etcd"])}
    print(f"\nre-issued {pg.name}, {etcd.name}; cluster.up {took:.1f} s; served "
          + ", ".join(f"{k} {v[:16]}" for k, v in served.items()) + f"; pids before {pids} after {after}")
    assert "postgres.tls" in out and "etcd.tls" in out
    assert all(old[h] != new[h] for h in old)
    assert served == new
    assert after == pids and all(p.isdigit() and p != "0" for v in after.values() for p in v)  # no restart
