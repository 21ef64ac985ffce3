"""Every certificate in use, per host and purpose, read from the hosts and compared with state/pki.

One SSH command per host prints the certificate files it holds (public data: no key is read); each is parsed
here: subject, SANs, issuer, not-after, days left, and whether its sha256 equals the file in state/pki (the
record). `findings` turns the rows into audit findings: expired or expiring within N days, differing from
the record, missing, or a CA that itself expires within N days.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from runbook.cluster.context import Ctx
from runbook.credentials.certinfo import cert_sans
from runbook.credentials.pki import leaf_paths
from runbook.credentials.purposes import MAIN_CA, PEER_CA, Purpose
from runbook.inventory import Host

MARK = "==runbook-cert== "


@dataclass
class CertRow:
    host: str
    service: str        # the purpose (etcd-peer, pg-server, ...) or "ca" / "peer-ca"
    path: str
    subject: str = ""
    sans: str = ""
    issuer: str = ""
    not_after: str = ""
    days_left: int | None = None
    seconds_left: float | None = None
    sha256: str = ""
    recorded: str = ""  # sha256 of the file in state/pki ("" when there is none)
    problem: str = ""   # unreadable / missing on the host

    @property
    def matches(self) -> bool:
        return bool(self.sha256) and self.sha256 == self.recorded

    def as_dict(self) -> dict:
        return {**asdict(self), "matches": self.matches}


def tls_dir(ctx: Ctx, host: Host, p: Purpose) -> str:
    """Where a purpose's files live on a host: its own tls_dir, else the etcd directory for etcd purposes and
    Patroni's for the others."""
    if p.tls_dir:
        return p.tls_dir
    return ctx.paths.etcd_tls_dir if p.role == "etcd" else ctx.paths.patroni_tls_dir


def host_files(ctx: Ctx, host: Host) -> list[tuple[str, str, Path]]:
    """(service, path on the host, path of the record in state/pki) for every certificate *host* holds."""
    from runbook.sections.tls_files import cert_files, host_purposes

    out: list[tuple[str, str, Path]] = []
    dirs: dict[str, set[str]] = {}
    for p in host_purposes(host, ctx.inventory):
        d = tls_dir(ctx, host, p)
        dirs.setdefault(d, set()).add(p.ca)
        out.append((p.name, cert_files(d, p, host.name)[0], leaf_paths(ctx.pki_dir, host.name, p.name)[0]))
    for d, cas in dirs.items():
        for which in sorted(cas | {MAIN_CA}):
            out.append((which, f"{d}/{which}.crt", ctx.pki_dir / f"{which}.crt"))
    return out


def read_command(paths: list[str]) -> str:
    return "; ".join(f"echo '{MARK}{p}'; cat {p} 2>/dev/null || echo MISSING" for p in paths)


def parse_read(out: str) -> dict[str, str]:
    """The output of read_command -> {path: PEM text or 'MISSING'}."""
    got: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        if line.startswith(MARK):
            cur = line[len(MARK):]
            got[cur] = []
        elif cur is not None:
            got[cur].append(line)
    return {k: "\n".join(v).strip() + "\n" for k, v in got.items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def row_of(host: str, service: str, path: str, pem: str | None, record: Path,
           now: dt.datetime | None = None) -> CertRow:
    """One row from the PEM read on the host (None or 'MISSING' = not there) and the record in state/pki."""
    now = now or dt.datetime.now(dt.UTC)
    r = CertRow(host, service, path, recorded=_sha(record.read_bytes()) if record.exists() else "")
    if pem is None or pem.strip() in ("", "MISSING"):
        r.problem = "missing on the host"
        return r
    r.sha256 = _sha(pem.encode())
    try:
        c = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        r.problem = f"not a PEM certificate ({exc})"
        return r
    dns, ips = cert_sans(c)
    r.subject, r.issuer = c.subject.rfc4514_string(), c.issuer.rfc4514_string()
    r.sans = ", ".join(sorted(dns) + sorted(ips))
    r.not_after = c.not_valid_after_utc.strftime("%Y-%m-%d %H:%M")
    r.days_left = (c.not_valid_after_utc - now).days
    r.seconds_left = (c.not_valid_after_utc - now).total_seconds()
    return r


def collect(ctx: Ctx, hosts: list[Host] | None = None) -> list[CertRow]:
    """Every certificate of every (selected) host, read over SSH; an unreachable host gives one row saying so."""
    rows: list[CertRow] = []
    for h in hosts if hosts is not None else ctx.inventory.hosts:
        files = host_files(ctx, h)
        try:
            r = ctx.transport.run(h, read_command([p for _, p, _ in files]), timeout=60)
        except Exception as exc:  # an unreachable host is a row, the others are still read
            rows.append(CertRow(h.name, "-", "-", problem=f"unreachable: {str(exc).splitlines()[0]}"))
            continue
        got = parse_read(r.stdout)
        rows += [row_of(h.name, svc, path, got.get(path), rec) for svc, path, rec in files]
    for which in (MAIN_CA, PEER_CA):  # the CAs of the record themselves
        f = ctx.pki_dir / f"{which}.crt"
        if f.exists():
            rows.append(row_of("local", which, str(f), f.read_text(), f))
    return rows


def findings(rows: list[CertRow], days: int) -> list[tuple[str, str]]:
    """(host, sentence) for each row that expires within *days*, has expired, differs from state/pki or is
    missing; a CA's own expiry is named as such (every certificate it signed ends with it)."""
    out: list[tuple[str, str]] = []
    for r in rows:
        what = f"{r.service} certificate {r.path}"
        if r.problem:
            out.append((r.host, f"{what}: {r.problem}"))
            continue
        if r.seconds_left is not None and r.seconds_left <= 0:
            out.append((r.host, f"{what} expired on {r.not_after} UTC; run `inv pki.rotate`"))
        elif r.days_left is not None and r.days_left < days:
            hint = ("a new CA: pki.rotate-ca" if r.service in (MAIN_CA, PEER_CA) else "`inv pki.rotate`")
            out.append((r.host, f"{what} expires on {r.not_after} UTC, in {r.days_left} day(s) (< {days}); "
                                f"renew it with {hint}"))
        if r.host != "local" and r.recorded and not r.matches:
            out.append((r.host, f"{what} differs from the record in state/pki (sha256 {r.sha256[:12]} vs "
                                f"{r.recorded[:12]}); `inv cluster.up` puts the recorded one back"))
        if r.host != "local" and not r.recorded:
            out.append((r.host, f"{what} has no record in state/pki"))
    return out
