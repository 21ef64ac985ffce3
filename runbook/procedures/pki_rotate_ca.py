"""`pki.rotate-ca`: a new CA without downtime, in three recorded phases of one ledger operation.

Which CA: ``--ca main`` (state/pki/ca.*: every client-facing certificate), ``peer`` (state/pki/peer-ca.*: the
etcd peer certificates only) or ``all`` (both, default). Rotating both costs no extra restart: the same etcd
restart of each phase takes both trust files.

Phase 1, trust both
  new-ca          (control) ``<ca>-next.crt``/``.key`` made in state/pki (0600 key) unless already there
  trust-files     every host: each CA file its services verify with (``ca.crt`` in every TLS directory of its
                  purposes, ``peer-ca.crt`` on etcd hosts) becomes the bundle old CA + new CA
  trust-etcd      one etcd member at a time: restart (etcd reads its trusted CA files only when it starts),
                  every member healthy before the next
  trust-pause     Patroni's maintenance mode: a Patroni restarted now leaves PostgreSQL running
  trust-patroni   replicas first, the leader last: restart Patroni (its etcd client loads its CA when it starts,
                  and a SIGHUP is not relied on to rebuild the REST API's TLS context for a CA file alone: a
                  restart, paused, is sure for both), the member back, then `systemctl reload patroni`
                  (PostgreSQL re-reads ssl_ca_file on reload), and PgBouncer reloaded / pgBackRest's server
                  restarted where the inventory turns them on
  trust-resume    maintenance mode off
  trust-others    HAProxy hosts (cluster.vip): `reload-or-restart haproxy`; backup hosts: pgBackRest's server
Phase 2, re-issue
  switch          (control) ``<ca>.*`` kept aside as ``<ca>-old.*`` (0600), ``<ca>-next.*`` becomes ``<ca>.*``
  pki.rotate.*    the steps of `pki.rotate` (runbook.procedures.pki_rotate, reused, not copied) for every
                  (host, purpose) whose CA rotates: re-issued from the new CA, rolled out host by host, replicas
                  before the leader, each proven by a fresh handshake (verified against the bundle)
Phase 3, trust only the new CA
  untrust-files, untrust-etcd, untrust-pause, untrust-patroni, untrust-resume, untrust-others: as phase 1,
                  with the new CA alone
  discard         (control, irreversible) the old CA's key deleted, its certificate kept as ``<ca>-retired.crt``

Each member restarts at most once per phase (etcd and Patroni in phases 1 and 3; none in phase 2). Every step
is a ledger step of the operation ``pki-rotate-ca`` (--dry, --step, --export, resume); a resumed run skips what
is done and never repeats `discard`.

Between phase 1 and the end of phase 3, `pki.status` reports the hosts' CA files as differing from state/pki
(they hold the bundle): expected until the rotation ends. Clients outside the cluster that verify with the CA
(applications' sslrootcert) need old + new from phase 1 to the end of phase 2; the runbook does not reach them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from runbook.cluster.commands import member_ok, patronictl
from runbook.cluster.context import Ctx
from runbook.core.engine import Report
from runbook.core.step import Local, Put, Run, Section, Step, wait_for
from runbook.credentials.pki import private_key_pem, make_ca
from runbook.credentials.purposes import MAIN_CA, PEER_CA
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.membership_ops import operation_id, run_with_id
from runbook.procedures.pki_migrate import HEALTH_WAIT, etcd_healthy_wait
from runbook.procedures.pki_rotate import issued_marker, leader_last, rotate_steps
from runbook.procedures.pki_status import tls_dir
from runbook.sections.frontdoor import restart_patroni_held
from runbook.sections.tls_files import host_purposes

OP = "pki-rotate-ca"
ORDER = 72
CHOICES = {"main": (MAIN_CA,), "peer": (PEER_CA,), "all": (MAIN_CA, PEER_CA)}
PHASES = ("trust", "reissue", "untrust")
_MEM: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # a dry run's would-be new CA, per (state/pki, CA)


def cas_of(choice: str) -> tuple[str, ...]:
    if choice not in CHOICES:
        raise ProcedureFailed(f"--ca {choice}: one of {', '.join(CHOICES)}", 2)
    return CHOICES[choice]


def files(pki_dir: Path, which: str, tag: str = "") -> tuple[Path, Path]:
    """(certificate, key) of CA *which* in state/pki; *tag*: "" (in use), "next", "old"."""
    base = f"{which}-{tag}" if tag else which
    return pki_dir / f"{base}.crt", pki_dir / f"{base}.key"


def discard_mark(ctx: Ctx, op_id: str) -> Path:
    """Says the operation discarded the old CA key(s) (written by `discard`, removed when the operation ends)."""
    return ctx.pki_dir / f".ca-discarded-{hashlib.sha256(op_id.encode()).hexdigest()[:16]}"


def old_new(ctx: Ctx, which: str, op_id: str = "") -> tuple[bytes, bytes]:
    """(old CA PEM, new CA PEM) at any point of the rotation: before the switch the new one is ``-next``, after
    it the old one is ``-old``; before anything ran (a dry run) the new one is made in memory for the plan."""
    cur, _ = files(ctx.pki_dir, which)
    nxt, _ = files(ctx.pki_dir, which, "next")
    old, _ = files(ctx.pki_dir, which, "old")
    if nxt.exists():
        return cur.read_bytes(), nxt.read_bytes()
    if old.exists():
        return old.read_bytes(), cur.read_bytes()
    retired = ctx.pki_dir / f"{which}-retired.crt"
    if op_id and discard_mark(ctx, op_id).exists() and retired.exists():  # after `discard`, before the end
        return retired.read_bytes(), cur.read_bytes()
    k = (str(ctx.pki_dir), which)
    if k not in _MEM:
        cert, key = make_ca(_cn(ctx, which))
        _MEM[k] = (cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key))
    return (cur.read_bytes() if cur.exists() else ctx.pki.ca_pem(which)), _MEM[k][0]


def _cn(ctx: Ctx, which: str) -> str:
    from runbook.credentials.pki import load_ca

    ca = load_ca(ctx.pki_dir, which)
    base = ca.cert.subject.rfc4514_string().removeprefix("CN=") if ca else which
    return f"{base.split(' (')[0]} ({time.strftime('%Y-%m-%dT%H%MZ', time.gmtime())})"


def ca_file(which: str) -> str:
    return "ca.crt" if which == MAIN_CA else "peer-ca.crt"


def host_ca_files(ctx: Ctx, h: Host, cas: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(path on *h*, owner, CA) of every CA file the services of *h* verify with, for the rotating CAs."""
    out: dict[str, tuple[str, str, str]] = {}
    for p in host_purposes(h, ctx.inventory):
        d = tls_dir(ctx, h, p)
        owner = "root" if p.tls_dir and p.owner == "root" else ("etcd" if p.role == "etcd" else p.owner)
        for which in cas:
            if which == MAIN_CA or p.role == "etcd":
                out.setdefault(f"{d}/{ca_file(which)}", (f"{d}/{ca_file(which)}", owner, which))
    return list(out.values())


def bundle(ctx: Ctx, which: str, phase: str, op_id: str = "") -> bytes:
    """What a CA file holds in *phase*: old + new CA (trust), the new CA alone (untrust)."""
    old, new = old_new(ctx, which, op_id)
    return old + new if phase == "trust" else new


def _has(ctx: Ctx, h: Host, name: str) -> bool:
    return any(p.name == name for p in host_purposes(h, ctx.inventory))


def _others(ctx: Ctx, h: Host) -> list[str]:
    """Commands making the services other than etcd and Patroni on *h* read their CA file again."""
    cmds = []
    if _has(ctx, h, "haproxy-client"):
        cmds.append("systemctl try-reload-or-restart haproxy")
    if _has(ctx, h, "pgbackrest") and not h.has("postgres"):
        cmds.append("systemctl try-restart pgbackrest-server")
    return cmds


def _started_after(unit: str, path: str) -> str:
    """Shell: *unit* is running and was (re)started after *path* was last written."""
    return (f"systemctl is-active -q {unit} && test \"$(stat -c %Y {path})\" -le "
            f"\"$(date -d \"$(systemctl show -p ActiveEnterTimestamp --value {unit})\" +%s)\"")


def _phase(sec: Section, phase: str, cas: tuple[str, ...], op_id: str) -> list[Step]:
    what = "old + new CA" if phase == "trust" else "the new CA alone"

    def files_actions(ctx: Ctx, h: Host) -> list:
        return [Put(path, bundle(ctx, which, phase, op_id), mode="0644", owner=owner)
                for path, owner, which in host_ca_files(ctx, h, cas)]

    files_actions.__doc__ = (f"Every CA file the host's services verify with holds {what} (nothing reads it "
                             "before the restarts below)")
    files_step = sec.step(f"{phase}-files", role="all")(files_actions)

    def etcd_file(ctx: Ctx, h: Host) -> str:
        return f"{ctx.paths.etcd_tls_dir}/{ca_file(cas[0])}"

    def etcd_actions(ctx: Ctx, h: Host) -> list:
        return [Run("systemctl restart etcd", timeout=120), Run(etcd_healthy_wait(ctx, h), timeout=HEALTH_WAIT + 30)]

    etcd_actions.__doc__ = (f"One member at a time: restart etcd (it reads its trusted CA files only when it "
                            f"starts: now {what}); every member healthy before the next")
    etcd = sec.step(f"{phase}-etcd", role="etcd", kind="serial",
                    host_order=lambda ctx, hs: sorted(hs, key=lambda h: h.name))(etcd_actions)
    etcd = replace(etcd, check_fn=lambda ctx, h: f"{_started_after('etcd', etcd_file(ctx, h))} && "
                                                 f"{etcd_healthy_wait(ctx, h)}")
    steps: list[Step] = [files_step, etcd]
    if MAIN_CA not in cas:  # the peer CA: etcd alone verifies with it
        return steps

    first = lambda ctx, hosts: hosts[:1]  # noqa: E731

    @sec.step(f"{phase}-pause", role="postgres", only=first)
    def pause(ctx: Ctx, h: Host) -> list:
        """Patroni's maintenance mode: a Patroni restarted now leaves PostgreSQL running"""
        return [Run(f"{patronictl(ctx, 'pause --wait')} || {patronictl(ctx, 'list')} | grep -q 'Maintenance mode: on'",
                    timeout=120)]

    @sec.step(f"{phase}-patroni", role="postgres", kind="serial", host_order=leader_last)
    def patroni(ctx: Ctx, h: Host) -> list:
        back = Run(wait_for(member_ok(ctx, h), HEALTH_WAIT), timeout=HEALTH_WAIT + 30)
        acts: list = [*restart_patroni_held(ctx, h, back), Run("systemctl reload patroni", timeout=60)]
        if _has(ctx, h, "pgbouncer-server"):
            acts.append(Run("systemctl try-reload-or-restart pgbouncer", timeout=60))
        if _has(ctx, h, "pgbackrest"):
            acts.append(Run("systemctl try-restart pgbackrest-server", timeout=60))
        return acts

    patroni.doc = (f"Replicas first, the leader last: restart Patroni (its etcd client and REST API load their CA "
                   f"when they start: now {what}; PostgreSQL stays up, paused), the member back, then reload "
                   "(PostgreSQL re-reads ssl_ca_file); PgBouncer reloaded, pgBackRest's server restarted if held; "
                   "with the front door, HAProxy keeps routing to the member unchecked while its Patroni restarts")

    @patroni.check
    def _patroni_check(ctx: Ctx, h: Host) -> str:
        return f"{_started_after('patroni', f'{ctx.paths.patroni_tls_dir}/ca.crt')} && {member_ok(ctx, h)}"

    @sec.step(f"{phase}-resume", role="postgres", only=first)
    def resume(ctx: Ctx, h: Host) -> list:
        """Maintenance mode off"""
        return [Run(f"{patronictl(ctx, 'resume --wait')} || ! {patronictl(ctx, 'list')} | grep -q 'Maintenance "
                    "mode: on'", timeout=120)]

    @sec.step(f"{phase}-others", role="all", kind="serial", only=lambda ctx, hs: [h for h in hs if _others(ctx, h)])
    def others(ctx: Ctx, h: Host) -> list:
        """HAProxy (reload) and pgBackRest's server on backup hosts (restart) read their CA file again"""
        return [Run(c, timeout=60) for c in _others(ctx, h)]

    return [*steps, pause, patroni, resume, others]


def _move(src: Path, dst: Path, mode: int) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, dst)


def phase_steps(ctx: Ctx, cas: tuple[str, ...], op_id: str) -> list[tuple[str, list[Step]]]:
    """The operation's steps by phase: [("trust", ...), ("reissue", ...), ("untrust", ...)]."""
    sec = Section("pki.rotate-ca", ORDER, "a new CA without downtime: trust both, re-issue, trust the new one")
    mark = discard_mark(ctx, op_id)

    @sec.step("new-ca", role="local")
    def new_ca(ctx: Ctx, h: Host) -> list:
        """A new CA per rotating CA in state/pki as <ca>-next.crt/.key (key 0600); the one in use unchanged"""
        def run() -> str:
            made = []
            for which in cas:
                crt, key = files(ctx.pki_dir, which, "next")
                if crt.exists() and key.exists():
                    continue
                cert, k = make_ca(_cn(ctx, which))
                _write(key, private_key_pem(k), 0o600)
                _write(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
                made.append(crt.name)
            return f"made {', '.join(made) or 'nothing (already there)'} in {ctx.pki_dir}"
        return [Local(f"make {', '.join(f'{w}-next' for w in cas)} in state/pki", run, key=",".join(cas))]

    @new_ca.check
    def _new_check(ctx: Ctx, h: Host) -> bool:
        return all(files(ctx.pki_dir, w, "next")[1].exists() or files(ctx.pki_dir, w, "old")[1].exists()
                   for w in cas)

    trust = _phase(sec, "trust", cas, op_id)

    @sec.step("switch", role="local")
    def switch(ctx: Ctx, h: Host) -> list:
        """state/pki: <ca>.* kept aside as <ca>-old.* (0600), <ca>-next.* become <ca>.*: issuance from the new CA
        (file by file, each step atomic: a resumed run finishes a half-done switch)"""
        def run() -> str:
            for which in cas:
                for cur, nxt, old in zip(files(ctx.pki_dir, which), files(ctx.pki_dir, which, "next"),
                                         files(ctx.pki_dir, which, "old"), strict=True):
                    if not nxt.exists():
                        continue
                    if not old.exists():
                        _move(cur, old, 0o600)
                    os.replace(nxt, cur)
            return f"issuing from the new {', '.join(cas)}; the old kept as {', '.join(f'{w}-old.*' for w in cas)}"
        return [Local("switch state/pki to the new CA(s), the old ones kept aside", run, key=",".join(cas))]

    @switch.check
    def _switch_check(ctx: Ctx, h: Host) -> bool:
        return all(not files(ctx.pki_dir, w, "next")[0].exists() and not files(ctx.pki_dir, w, "next")[1].exists()
                   and (files(ctx.pki_dir, w, "old")[1].exists() or mark.exists()) for w in cas)

    @switch.undo
    def _switch_undo(ctx: Ctx, h: Host) -> list:
        def run() -> str:
            for which in cas:
                for cur, nxt, old in zip(files(ctx.pki_dir, which), files(ctx.pki_dir, which, "next"),
                                         files(ctx.pki_dir, which, "old"), strict=True):
                    if old.exists():
                        os.replace(cur, nxt)
                        os.replace(old, cur)
            return "state/pki issues from the old CA(s) again"
        return [Local("put the old CA(s) back in use in state/pki", run, key=",".join(cas))]

    pairs = [(h, p) for h in ctx.inventory.hosts for p in host_purposes(h, ctx.inventory) if p.ca in cas]
    reissue = rotate_steps(ctx, pairs, op_id)
    untrust = _phase(sec, "untrust", cas, op_id)

    @sec.step("discard", role="local",
              irreversible="deletes the old CA's key (state/pki/<ca>-old.key): nothing can be issued from it again, "
                           "and a rollback to the old CA needs new certificates")
    def discard(ctx: Ctx, h: Host) -> list:
        """The old CA's key deleted from state/pki; its certificate kept as <ca>-retired.crt"""
        def run() -> str:
            for which in cas:
                crt, key = files(ctx.pki_dir, which, "old")
                key.unlink(missing_ok=True)
                if crt.exists():
                    os.replace(crt, ctx.pki_dir / f"{which}-retired.crt")
            _write(mark, op_id.encode() + b"\n", 0o600)
            return f"the old {', '.join(cas)} key(s) deleted; certificate(s) kept as <ca>-retired.crt"
        return [Local("delete the old CA key(s) from state/pki", run, key=",".join(cas))]

    @discard.check
    def _discard_check(ctx: Ctx, h: Host) -> bool:
        return mark.exists()

    return [("trust", [new_ca, *trust]), ("reissue", [switch, *reissue]), ("untrust", [*untrust, discard])]


def _write(path: Path, data: bytes, mode: int) -> None:
    from runbook.core.fsutil import write_atomic

    write_atomic(path, data, mode)


def rotation_refusal(ctx: Ctx, command: str) -> str | None:
    """Why *command* (an install section or a membership procedure) must not run now: a CA rotation is unfinished
    and would lose the trust of one CA on the hosts it converges (None: it may)."""
    left = sorted(f.name for w in (MAIN_CA, PEER_CA)
                  for f in (*files(ctx.pki_dir, w, "next"), files(ctx.pki_dir, w, "old")[1]) if f.exists())
    if not left:
        return None
    return (f"{command} refused: a CA rotation is unfinished (state/pki {ctx.pki_dir} holds {', '.join(left)}): the "
            "hosts trust old + new CA while it runs, and converging now would put back one CA alone and break the "
            "certificates of the other. Run `inv pki.rotate-ca` again with the same --ca (it resumes where it "
            f"stopped; `--dry` shows what is left), then `inv {command}`.")


def target(ctx: Ctx, cas: tuple[str, ...]) -> str:
    return f"{ctx.inventory.cluster.name}:{'+'.join(cas)}"


def rotate_ca_steps(ctx: Ctx, cas: tuple[str, ...], op_id: str) -> list[Step]:
    return [s for _, steps in phase_steps(ctx, cas, op_id) for s in steps]


def finish(ctx: Ctx, op_id: str) -> None:
    """After the last phase: the markers of the operation go (a next rotation is a new operation)."""
    if not ctx.options.dry:
        issued_marker(ctx, op_id).unlink(missing_ok=True)
        discard_mark(ctx, op_id).unlink(missing_ok=True)


def run_rotate_ca(ctx: Ctx, cas: tuple[str, ...]) -> tuple[Report, str, bool]:
    """The whole rotation as one operation: (report, operation id, resumed)."""
    tgt = target(ctx, cas)
    op_id, resumed = operation_id(ctx, OP, tgt)
    out = run_with_id(ctx, OP, tgt, rotate_ca_steps(ctx, cas, op_id), op_id, resumed)
    finish(ctx, op_id)
    return out
