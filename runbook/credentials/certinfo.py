"""Reading certificates: parse, fingerprint, SANs, CN, EKU, and what is wrong with one for its purpose.

Shared by the PKI that issues them (runbook.credentials.pki), pki.status and cluster.audit."""
from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runbook.credentials.purposes import CLIENT, SERVER, Purpose
from runbook.errors import RunbookError


class PKIError(RunbookError):
    """The local PKI is unusable; the message says which file and what to do."""


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_cert(path: str | Path) -> x509.Certificate:
    """Parse a PEM certificate; PKIError names the file when it is missing or garbage."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PKIError(f"{path}: cannot read certificate ({exc.strerror})") from exc
    except ValueError as exc:
        raise PKIError(f"{path}: not a PEM certificate ({exc})") from exc


def fingerprint(cert: x509.Certificate | str | Path) -> str:
    """SHA-256 fingerprint as openssl prints it: ``AB:CD:...`` (accepts a cert or a path)."""
    if not isinstance(cert, x509.Certificate):
        cert = load_cert(cert)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def split_sans(names: Iterable[str]) -> tuple[set[str], set[str]]:
    """Split SAN strings into (dns names, ip addresses); IPs are normalised."""
    dns: set[str] = set()
    ips: set[str] = set()
    for n in names:
        try:
            ips.add(str(ipaddress.ip_address(n)))
        except ValueError:
            dns.add(n.lower())
    return dns, ips


def cert_sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """The (dns names, ip addresses) of a certificate's subjectAltName (empty if none)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    dns = {d.lower() for d in ext.get_values_for_type(x509.DNSName)}
    ips = {str(i) for i in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when *cert* names *ca_cert* as issuer and carries a valid signature by its key."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_EKU = {SERVER: ExtendedKeyUsageOID.SERVER_AUTH, CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH}
_EKU_LABEL = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


def cert_eku(cert: x509.Certificate) -> set[str]:
    """The certificate's extendedKeyUsage as {'server', 'client'} (other usages are ignored)."""
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()
    return {k for k, oid in _EKU.items() if oid in eku}


def cert_cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def check_leaf(cert_path: str | Path, ca: CA, purpose: Purpose, cn: str, sans: Iterable[str] = (),
               min_days: int = 0) -> list[str]:
    """Every problem with the certificate at *cert_path* for *purpose*, as sentences; [] means fine.

    Checks: readable PEM; signed by *ca* (else "foreign CA"); validity (not yet valid, expired, fewer than
    *min_days* left); CN exactly *cn*; SANs exactly *sans* (none for a client certificate); EKU exactly the
    purpose's (a server certificate must not be usable as a client, and the other way round)."""
    cert_path = Path(cert_path)
    try:
        cert = load_cert(cert_path)
    except PKIError as exc:
        return [str(exc)]
    problems: list[str] = []
    if not signed_by(cert, ca.cert):
        problems.append(f"{cert_path}: foreign CA: issued by '{cert.issuer.rfc4514_string()}', not signed "
                        f"by {ca.cert_path} ('{ca.cert.subject.rfc4514_string()}')")
    now = _now()
    if cert.not_valid_before_utc > now:
        problems.append(f"{cert_path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                        "(clock skew?)")
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(0):
        problems.append(f"{cert_path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif left < dt.timedelta(days=min_days):
        problems.append(f"{cert_path}: expires on {cert.not_valid_after_utc:%Y-%m-%d}, "
                        f"fewer than {min_days} days left")
    if cert_cn(cert) != cn:
        problems.append(f"{cert_path}: CN is {cert_cn(cert)!r}, want {cn!r}")
    want_dns, want_ips = split_sans(sans)
    have_dns, have_ips = cert_sans(cert)
    missing = sorted(want_dns - have_dns) + sorted(want_ips - have_ips)
    extra = sorted(have_dns - want_dns) + sorted(have_ips - want_ips)
    if missing:
        problems.append(f"{cert_path}: wrong SAN: missing {', '.join(missing)}")
    if extra:
        problems.append(f"{cert_path}: wrong SAN: unexpected {', '.join(extra)}")
    have_eku = cert_eku(cert)
    if have_eku != set(purpose.eku):
        problems.append(f"{cert_path}: extendedKeyUsage is {sorted(have_eku) or 'none'}, want "
                        f"{sorted(purpose.eku)} for {purpose.name}")
    return problems
