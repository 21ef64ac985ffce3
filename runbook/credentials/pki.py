"""The cluster's private PKI, kept in state/pki/ (0700) and made with `cryptography` only.

One CA (EC P-256, 10 years) signs one certificate per host. The same host certificate serves
every TLS role the walk-through gives it: etcd peer and client, Patroni REST API and ctl, the
Patroni etcd3 client, and PostgreSQL ``ssl`` — hence serverAuth + clientAuth and SANs that
cover the host name, its FQDN, its address and localhost/127.0.0.1 (Patroni and etcdctl on a
host talk to themselves).

Files: ``ca.crt``, ``ca.key``, ``<host>.crt``, ``<host>.key``; keys are 0600 and every file is
written atomically (temp file + fsync + rename), so a crash never leaves half a key behind.
A host certificate is reused while it is signed by the current CA, matches its key, has exactly
the wanted SANs and more than ``RENEW_DAYS`` left; otherwise it is re-issued.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runbook.core.fsutil import write_atomic
from runbook.errors import RunbookError

CA_DAYS = 3650
HOST_DAYS = 825
RENEW_DAYS = 30
CA_CN = "pg-ha-runbook CA"
LOCAL_DNS = ("localhost",)
LOCAL_IPS = ("127.0.0.1",)
_SKEW = dt.timedelta(minutes=5)  # not-before is back-dated a little for hosts with a slow clock



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


# --------------------------------------------------------------------------- helpers

def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)





def _ensure_dir(pki_dir: Path) -> Path:
    pki_dir = Path(pki_dir)
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    return pki_dir


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PKIError(f"{path}: private key is readable by group/others (mode {mode:04o}); "
                       f"run 'chmod 600 {path}' and consider re-issuing it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


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


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


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


def host_sans(name: str, dns_names: Iterable[str] = (), ips: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """The full SAN set a host certificate gets: its name, extra names/IPs and localhost."""
    dns, ip_set = split_sans([name, *dns_names, *LOCAL_DNS, *ips, *LOCAL_IPS])
    return dns, ip_set


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when *cert* names *ca_cert* as issuer and carries a valid signature by its key."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- CA

def _ca_paths(pki_dir: Path) -> tuple[Path, Path]:
    return pki_dir / "ca.crt", pki_dir / "ca.key"


def _new_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_ca(pki_dir: str | Path, common_name: str = CA_CN) -> CA:
    """Load the CA from *pki_dir*, generating it on first use; never silently replaces one.

    A half-present CA (only ca.crt or only ca.key), a key that does not match the certificate,
    or an expired CA is an error: regenerating would orphan every certificate already on hosts.
    """
    pki_dir = _ensure_dir(Path(pki_dir))
    ca = load_ca(pki_dir)
    if ca is not None:
        return ca
    cert_path, key_path = _ca_paths(pki_dir)
    cert, key = _new_ca(common_name)
    write_atomic(key_path, _key_bytes(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CA(cert, key, cert_path, key_path)


def load_ca(pki_dir: str | Path) -> CA | None:
    """The CA in *pki_dir*, None when there is none yet (neither file); writes nothing.

    Half a CA, a key that does not match, an expired or non-CA certificate: PKIError."""
    pki_dir = Path(pki_dir)
    cert_path, key_path = _ca_paths(pki_dir)
    if not cert_path.exists() and not key_path.exists():
        return None
    for p in (cert_path, key_path):
        if not p.exists():
            raise PKIError(f"{p}: missing while its pair exists in {pki_dir}; restore it from backup, "
                           f"or move both ca.crt and ca.key away to create a new CA (then re-issue "
                           "and redeploy every host certificate)")
    cert, key = load_cert(cert_path), _load_key(key_path)
    if not _same_public_key(cert, key):
        raise PKIError(f"{key_path} does not match {cert_path}; restore the matching pair from backup")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError(f"{cert_path}: not a CA certificate (basicConstraints CA:FALSE or absent)")
    if cert.not_valid_after_utc <= _now():
        raise PKIError(f"{cert_path}: CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; move ca.crt and "
                       "ca.key away to create a new CA, then re-issue and redeploy every certificate")
    return CA(cert, key, cert_path, key_path)


# --------------------------------------------------------------------------- host certificates

def host_paths(pki_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Where *name*'s certificate and key live: ``<pki_dir>/<name>.crt`` / ``.key``."""
    pki_dir = Path(pki_dir)
    return pki_dir / f"{name}.crt", pki_dir / f"{name}.key"


def check_cert(cert_path: str | Path, ca: CA, expected_sans: Iterable[str],
               min_days: int = 0, include_local: bool = True) -> list[str]:
    """Every problem with the certificate at *cert_path*, as readable sentences; [] means fine.

    Checks: readable PEM; issued and signed by *ca* (else "foreign CA"); validity window
    (not yet valid, expired, or fewer than *min_days* left); SANs exactly *expected_sans*
    (DNS names and IP strings mixed) plus, with *include_local*, localhost and 127.0.0.1,
    which every host certificate carries; serverAuth and clientAuth in extendedKeyUsage.
    """
    expected_sans = [*expected_sans, *((*LOCAL_DNS, *LOCAL_IPS) if include_local else ())]
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
    want_dns, want_ips = split_sans(expected_sans)
    have_dns, have_ips = cert_sans(cert)
    missing = sorted(want_dns - have_dns) + sorted(want_ips - have_ips)
    extra = sorted(have_dns - want_dns) + sorted(have_ips - want_ips)
    if missing:
        problems.append(f"{cert_path}: wrong SAN: missing {', '.join(missing)}")
    if extra:
        problems.append(f"{cert_path}: wrong SAN: unexpected {', '.join(extra)}")
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = set()
    for oid, label in ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                       (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")):
        if oid not in eku:
            problems.append(f"{cert_path}: extendedKeyUsage lacks {label}")
    return problems


def _issue(ca: CA, name: str, dns: set[str], ips: set[str],
           days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    san = [x509.DNSName(d) for d in sorted(dns)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def ensure_host_cert(pki_dir: str | Path, ca: CA, name: str, dns_names: Iterable[str] = (),
                     ips: Iterable[str] = (), days: int = HOST_DAYS) -> tuple[Path, Path, bool]:
    """Make sure ``<name>.crt``/``.key`` exist, match each other and *ca*, and carry the SANs.

    SANs are *name*, *dns_names* (e.g. the FQDN), *ips* (the host address), ``localhost`` and
    ``127.0.0.1``. Returns (cert_path, key_path, changed); changed is False when the existing
    pair was kept (valid > RENEW_DAYS, signed by *ca*, same SANs, key matches).
    """
    pki_dir = _ensure_dir(Path(pki_dir))
    cert_path, key_path = host_paths(pki_dir, name)
    dns, ip_set = host_sans(name, dns_names, ips)
    if _usable(cert_path, key_path, ca, dns | ip_set):
        return cert_path, key_path, False
    cert, key = _issue(ca, name, dns, ip_set, days)
    write_atomic(key_path, _key_bytes(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path, True


def _usable(cert_path: Path, key_path: Path, ca: CA, sans: set[str]) -> bool:
    """The pair exists, matches, is signed by *ca*, has exactly *sans* and more than RENEW_DAYS left."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    if check_cert(cert_path, ca, sans, min_days=RENEW_DAYS, include_local=False):
        return False
    try:
        return _same_public_key(load_cert(cert_path), _load_key(key_path))
    except PKIError:
        return False


class Pki:
    """The CA and host certificates of one state/pki, for the steps that render TLS files.

    With ``write=False`` (a dry run, an export) nothing is created: an existing CA and usable host
    certificates are read; whatever is missing is made in memory for this run only (an in-memory CA
    when there is none yet), so the plan shows the files a real run would put. Thread-safe."""

    def __init__(self, pki_dir: str | Path, write: bool = True):
        self.dir = Path(pki_dir)
        self.write = write
        self._lock = threading.Lock()
        self._ca: CA | None = None
        self._hosts: dict[tuple, tuple[bytes, bytes]] = {}

    def ca(self) -> CA:
        with self._lock:
            return self._ca_locked()

    def _ca_locked(self) -> CA:
        if self.write:
            return ensure_ca(self.dir)
        if self._ca is None:
            self._ca = load_ca(self.dir)
        if self._ca is None:
            cert, key = _new_ca(CA_CN)
            self._ca = CA(cert, key, *_ca_paths(self.dir))
        return self._ca

    def ca_pem(self) -> bytes:
        """ca.crt as the hosts get it: the file's bytes, or the in-memory CA's PEM."""
        ca = self.ca()
        return ca.cert_path.read_bytes() if ca.cert_path.exists() else ca.cert.public_bytes(serialization.Encoding.PEM)

    def host(self, name: str, dns_names: Iterable[str] = (), ips: Iterable[str] = ()) -> tuple[bytes, bytes, Path]:
        """(certificate PEM, key PEM, where the key lives in state/pki) for host *name*."""
        with self._lock:
            ca = self._ca_locked()
            if self.write:
                cert_path, key_path, _ = ensure_host_cert(self.dir, ca, name, dns_names, ips)
                return cert_path.read_bytes(), key_path.read_bytes(), key_path
            cert_path, key_path = host_paths(self.dir, name)
            dns, ip_set = host_sans(name, dns_names, ips)
            if ca.key_path.exists() and _usable(cert_path, key_path, ca, dns | ip_set):
                return cert_path.read_bytes(), key_path.read_bytes(), key_path
            k = (name, tuple(sorted(dns | ip_set)))
            if k not in self._hosts:
                cert, key = _issue(ca, name, dns, ip_set, HOST_DAYS)
                self._hosts[k] = (cert.public_bytes(serialization.Encoding.PEM), _key_bytes(key))
            return (*self._hosts[k], key_path)
