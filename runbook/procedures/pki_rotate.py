"""`pki.rotate`: new leaf certificates (new keys) rolled out host by host, each (host, purpose) a ledger step.

1. `pki.rotate.issue` (control machine): every selected (host, purpose) re-issued in state/pki; the previous
   pair is kept as ``<purpose>.crt.prev``/``.key.prev`` next to it. Done once per operation: a resumed run does
   not issue again.
2. `pki.rotate.<purpose>` on each of its hosts, one host at a time, PostgreSQL replicas before the leader:
   the files in place are kept aside on the host (``<purpose>.crt.prev``/``.key.prev``, same owner, 0600), the
   new pair is written atomically, then the one service reading it takes it (etcd re-reads per handshake,
   Patroni on `systemctl reload patroni`, which reloads PostgreSQL too) and a fresh TLS handshake must serve
   the new certificate (server purposes), or be accepted with it (client purposes) before the next host.
   Undo: the kept pair is put back and the service proven to serve it again.

The operation (its id in every step's fingerprint) follows membership_ops: a run that finds it unfinished
resumes it; a finished one makes the next `pki.rotate` a new operation.
"""
from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, replace

from runbook.cluster.context import Ctx
from runbook.core.engine import Report
from runbook.core.step import Local, Run, Section, Step
from runbook.core.transport import put_command
from runbook.credentials.pki import leaf_paths
from runbook.credentials.purposes import PURPOSES, Purpose
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.membership_ops import operation_id, run_with_id
from runbook.procedures.pki_status import tls_dir
from runbook.sections.balancer import checks_pass_after_reload
from runbook.sections.tls_files import SERVE_WAIT, cert_files, host_purposes, sans, serve_new_cert, served_by

OP = "pki-rotate"


@dataclass(frozen=True)
class KeyRun(Run):
    """A Run whose stdin is a private key: the export and the plan name its file in state/pki, never its PEM."""

    source: str = ""

    def describe(self) -> str:
        return f"{self.cmd} < {self.source}"

    def shell(self, mask) -> str:
        return f"{self.cmd} < {self.source}  # the key, from the control machine's state/pki"
ORDER = 70


def selection(ctx: Ctx, hosts: str | None, service: str | None) -> list[tuple[Host, Purpose]]:
    """The (host, purpose) pairs to rotate: every purpose of every selected host, or only *service*."""
    chosen = ctx.inventory.select(hosts)
    if service is not None:
        names = [s.strip() for s in service.split(",") if s.strip()]
        unknown = [n for n in names if n not in PURPOSES]
        if unknown or not names:
            raise ProcedureFailed(f"--service {service}: unknown purpose(s) {', '.join(unknown) or '(empty)'}; "
                                  f"one or more of {', '.join(PURPOSES)}", 2)
    out = [(h, p) for h in chosen for p in host_purposes(h, ctx.inventory) if service is None or p.name in names]
    if not out:
        raise ProcedureFailed(f"nothing to rotate: no host of --hosts {hosts or '(all)'} holds "
                              f"{service or 'a certificate'}", 2)
    return out


def target_of(pairs: list[tuple[Host, Purpose]]) -> str:
    return ",".join(sorted({f"{h.name}/{p.name}" for h, p in pairs}))


def issued_marker(ctx: Ctx, op_id: str):
    """Says the operation's certificates are issued (its id names hosts and purposes: hashed for a file name)."""
    return ctx.pki_dir / f".issued-{hashlib.sha256(op_id.encode()).hexdigest()[:16]}"


def leader_last(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    """PostgreSQL hosts: replicas first, the leader last (asked of Patroni when the step starts)."""
    from runbook.cluster.readers import leader

    try:
        lead = leader(ctx)
    except RuntimeError:
        lead = None
    return sorted(hosts, key=lambda h: (lead is not None and h.name == lead.name, h.name))


def _proof(ctx: Ctx, host: Host, p: Purpose, crt: str, key: str) -> str | None:
    """Shell proving the service took the pair: a fresh handshake serving it (server purposes), or a handshake
    accepted with it (client purposes: against etcd, or this host's REST API)."""
    served = served_by(ctx, p.name)
    if served:
        return serve_new_cert(host, crt, *served)
    if p.role == "etcd" or p.name == "etcd-client":
        url = f"https://{(ctx.inventory.etcd[0] if p.role != 'etcd' else host).name}:2379/version"
    elif p.name == "rest-client":
        url = f"https://{host.name}:8008/patroni"
    elif p.name == "haproxy-client":  # read when HAProxy loads; its health checks show it to each REST API
        return checks_pass_after_reload()
    else:
        return None
    ca = f"{tls_dir(ctx, host, p)}/ca.crt"
    py = ("import ssl,sys,urllib.request as u; c=ssl.create_default_context(cafile=sys.argv[2]); "
          "c.load_cert_chain(sys.argv[3], sys.argv[4]); r=u.urlopen(sys.argv[1], context=c, timeout=10); "
          "print(sys.argv[1], r.status, 'with', sys.argv[3])")
    return (f"for i in $(seq 10); do python3 -c {shlex.quote(py)} {url} {ca} {crt} {key} && exit 0; sleep 1; done; "
            f"echo '{host.name}: {url} did not accept the client certificate {crt}' >&2; exit 1")


def rotate_steps(ctx: Ctx, pairs: list[tuple[Host, Purpose]], op_id: str) -> list[Step]:
    sec = Section("pki.rotate", ORDER, "re-issue leaf certificates and roll them out host by host")
    want = {(h.name, p.name) for h, p in pairs}

    @sec.step("issue", role="local")
    def issue(ctx: Ctx, h: Host) -> list:
        """Re-issue the selected certificates in state/pki (new keys); the previous pairs kept as .prev
        Once per operation: a resumed rotation rolls out what this step issued, it does not issue again."""
        def run() -> str:
            marker = issued_marker(ctx, op_id)
            if marker.exists():
                return f"already issued for {op_id}"
            for host, p in pairs:
                crt, key = leaf_paths(ctx.pki_dir, host.name, p.name)
                for f in (crt, key):
                    if f.exists():
                        f.with_name(f.name + ".prev").write_bytes(f.read_bytes())
                        f.with_name(f.name + ".prev").chmod(0o600 if f.suffix == ".key" else 0o644)
                dns, ips = sans(ctx, host)
                ctx.pki.leaf(host.name, p, dns, ips, reissue=True)
            marker.write_text(target_of(pairs) + "\n")
            marker.chmod(0o600)
            return f"{len(pairs)} certificate(s) re-issued in {ctx.pki_dir} ({op_id})"
        return [Local(f"re-issue {len(pairs)} certificate(s) in state/pki", run, key=target_of(pairs))]

    @issue.check
    def _issue_check(ctx: Ctx, h: Host) -> bool:
        return issued_marker(ctx, op_id).exists()

    @issue.undo
    def _issue_undo(ctx: Ctx, h: Host) -> list:
        def run() -> str:
            n = 0
            for host, p in pairs:
                for f in leaf_paths(ctx.pki_dir, host.name, p.name):
                    prev = f.with_name(f.name + ".prev")
                    if prev.exists():
                        prev.replace(f)
                        n += 1
            issued_marker(ctx, op_id).unlink(missing_ok=True)
            return f"{n} file(s) of state/pki restored from .prev"
        return [Local("restore the previous certificates in state/pki from .prev", run, key=target_of(pairs))]

    steps: list[Step] = [issue]
    for name in dict.fromkeys(p.name for _, p in pairs):
        steps.append(_rollout_step(sec, PURPOSES[name], want))
    return steps


def _rollout_step(sec: Section, p: Purpose, want: set[tuple[str, str]]) -> Step:
    def only(ctx: Ctx, hosts: list[Host]) -> list[Host]:
        return [h for h in hosts if (h.name, p.name) in want]

    order = leader_last if p.role == "postgres" else (lambda ctx, hosts: sorted(hosts, key=lambda h: h.name))
    doc = (f"Roll out the new {p.name} certificate ({p.service}), one host at a time\n"
           "Keeps the pair in place aside (.prev), writes the new one, makes the service take it and proves it "
           "with a fresh TLS handshake before the next host.")

    def actions(ctx: Ctx, host: Host) -> list:
        crt, key = cert_files(tls_dir(ctx, host, p), p, host.name)
        src_crt, src_key = leaf_paths(ctx.pki_dir, host.name, p.name)
        new_crt, new_key = src_crt.read_bytes(), src_key.read_bytes()
        sha = hashlib.sha256(new_crt).hexdigest()
        keep = (f"if [ -e {crt} ] && [ \"$(sha256sum < {crt} | cut -c1-64)\" != {sha} ]; then "
                f"cp -a {crt} {crt}.prev && cp -a {key} {key}.prev; fi")
        acts: list = [Run(keep),
                      Run(put_command(crt, "0644", p.owner, None), stdin=new_crt),
                      KeyRun(put_command(key, "0600", p.owner, None), stdin=new_key, source=str(src_key))]
        proof = _proof(ctx, host, p, crt, key)
        if proof:
            acts.append(Run(proof, timeout=SERVE_WAIT + 60))
        return acts

    actions.__doc__ = doc
    step = sec.step(p.name, role="all" if p.also else p.role, kind="serial", only=only, host_order=order)(actions)

    def check(ctx: Ctx, host: Host) -> str:
        src_crt, src_key = leaf_paths(ctx.pki_dir, host.name, p.name)
        dsts = cert_files(tls_dir(ctx, host, p), p, host.name)
        sums = " ".join(shlex.quote(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {dst}")
                        for f, dst in zip((src_crt, src_key), dsts, strict=True))
        return f"printf '%s\\n' {sums} | sha256sum --quiet --status -c -"

    def undo(ctx: Ctx, host: Host) -> list:
        crt, key = cert_files(tls_dir(ctx, host, p), p, host.name)
        acts: list = [Run(f"test -e {crt}.prev -a -e {key}.prev || {{ echo '{host.name}: no kept pair "
                          f"{crt}.prev: nothing to restore' >&2; exit 1; }}; mv -f {crt}.prev {crt} && "
                          f"mv -f {key}.prev {key}")]
        proof = _proof(ctx, host, p, crt, key)
        if proof:
            acts.append(Run(proof, timeout=SERVE_WAIT + 60))
        return acts

    return replace(step, check_fn=check, undo_fn=undo)


def run_rotation(ctx: Ctx, pairs: list[tuple[Host, Purpose]]) -> tuple[Report, str, bool]:
    """Apply the rotation of *pairs* as one operation: (report, operation id, resumed)."""
    target = target_of(pairs)
    op_id, resumed = operation_id(ctx, OP, target)
    out = run_with_id(ctx, OP, target, rotate_steps(ctx, pairs, op_id), op_id, resumed)
    if not ctx.options.dry:
        issued_marker(ctx, op_id).unlink(missing_ok=True)
    return out
