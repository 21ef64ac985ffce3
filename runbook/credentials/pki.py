"""The cluster's private PKI, kept in state/pki/ (0700) and made with `cryptography` only.

Two CAs (EC P-256, 10 years): ``ca`` signs every client-facing certificate, ``peer-ca`` signs only etcd
peer certificates (runbook.credentials.purposes says why). A host gets one certificate per *purpose* of
its roles, each with its own key, owner and extendedKeyUsage; only server certificates carry SANs (host
name, FQDN, address) and none carries localhost/127.0.0.1: no service reaches itself by those names.

Files: ``ca.crt``/``ca.key``, ``peer-ca.crt``/``peer-ca.key``, ``<host>/<purpose>.crt``/``.key``; keys are
0600 and every file is written atomically (temp file + fsync + rename), so a crash never leaves half a key.
A certificate is reused while it is signed by its CA, matches its key, has exactly the wanted SANs, CN and
EKU and more than ``RENEW_DAYS`` left; otherwise it is re-issued.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from runbook.core.fsutil import write_atomic
from runbook.credentials.certinfo import (  # noqa: F401  (re-exported: the PKI's public names)
    _EKU, CA, PKIError, _now, cert_cn, cert_eku, cert_sans, check_leaf, fingerprint, load_cert, signed_by, split_sans)
from runbook.credentials.purposes import MAIN_CA, PEER_CA, Purpose
from runbook.credentials.purposes import get as purposes_get

CA_DAYS = 3650
HOST_DAYS = 825
PEER_CA_CN = "pg-ha-runbook etcd peer CA"
RENEW_DAYS = 30
CA_CN = "pg-ha-runbook CA"
_SKEW = dt.timedelta(minutes=5)  # not-before is back-dated a little for hosts with a slow clock



# --------------------------------------------------------------------------- helpers

def _ensure_dir(pki_dir: Path) -> Path:
    pki_dir = Path(pki_dir)
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    return pki_dir


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
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


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def host_sans(name: str, dns_names: Iterable[str] = (), ips: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """The SAN set a server certificate gets: the host's name, extra names and addresses (no localhost)."""
    return split_sans([name, *dns_names, *ips])


# --------------------------------------------------------------------------- CA

def _ca_paths(pki_dir: Path, which: str = "ca") -> tuple[Path, Path]:
    return pki_dir / f"{which}.crt", pki_dir / f"{which}.key"


def make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
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


def ensure_ca(pki_dir: str | Path, common_name: str | None = None, which: str = "ca") -> CA:
    """Load the CA from *pki_dir*, generating it on first use; never silently replaces one.

    A half-present CA (only ca.crt or only ca.key), a key that does not match the certificate,
    or an expired CA is an error: regenerating would orphan every certificate already on hosts.
    """
    pki_dir = _ensure_dir(Path(pki_dir))
    ca = load_ca(pki_dir, which)
    if ca is not None:
        return ca
    cert_path, key_path = _ca_paths(pki_dir, which)
    cert, key = make_ca(common_name or (PEER_CA_CN if which == "peer-ca" else CA_CN))
    write_atomic(key_path, private_key_pem(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CA(cert, key, cert_path, key_path)


def load_ca(pki_dir: str | Path, which: str = "ca") -> CA | None:
    """The CA in *pki_dir*, None when there is none yet (neither file); writes nothing.

    Half a CA, a key that does not match, an expired or non-CA certificate: PKIError."""
    pki_dir = Path(pki_dir)
    cert_path, key_path = _ca_paths(pki_dir, which)
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


# --------------------------------------------------------------------------- leaf certificates

def leaf_paths(pki_dir: str | Path, host: str, purpose: str) -> tuple[Path, Path]:
    """Where *host*'s certificate for *purpose* lives: ``<pki_dir>/<host>/<purpose>.crt`` / ``.key``."""
    d = Path(pki_dir) / host
    return d / f"{purpose}.crt", d / f"{purpose}.key"


def issue_leaf(ca: CA, purpose: Purpose, cn: str, dns: set[str], ips: set[str],
               days: int = HOST_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and a certificate for *purpose*: CN, SANs (server purposes), EKU exactly the purpose's;
    valid *days* (may be < 1 for tests and drills), never past the CA's own not-after."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pg-ha-runbook"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, purpose.name)]))
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
        .add_extension(x509.ExtendedKeyUsage([_EKU[u] for u in purpose.eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if dns or ips:
        san = [x509.DNSName(d) for d in sorted(dns)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(ca.key, hashes.SHA256()), key


def _usable(cert_path: Path, key_path: Path, ca: CA, purpose: Purpose, cn: str, sans: set[str]) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    if check_leaf(cert_path, ca, purpose, cn, sans, min_days=RENEW_DAYS):
        return False
    try:
        return _same_public_key(load_cert(cert_path), _load_key(key_path))
    except PKIError:
        return False


@dataclass(frozen=True)
class Leaf:
    """One issued certificate as the hosts get it: its PEM, its key's PEM, the CA PEM that verifies it,
    and where the key is kept in state/pki (or would be, in a dry run)."""

    purpose: Purpose
    host: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    key_path: Path
    cert_path: Path


class Pki:
    """The CAs and leaf certificates of one state/pki, for the steps that render TLS files.

    ``leaf(host, purpose, dns, ips)`` is the one way to get a certificate: issued on first use, reused
    while usable (see check_leaf), re-issued otherwise; ``reissue`` forces a new key and certificate.
    With ``write=False`` (a dry run, an export) nothing is created: existing CAs and usable certificates are
    read; whatever is missing is made in memory for this run only. Thread-safe."""

    def __init__(self, pki_dir: str | Path, write: bool = True):
        self.dir = Path(pki_dir)
        self.write = write
        self._lock = threading.Lock()
        self._cas: dict[str, CA] = {}
        self._mem: dict[tuple, tuple[bytes, bytes]] = {}

    def ca(self, which: str = MAIN_CA) -> CA:
        with self._lock:
            return self._ca_locked(which)

    def _ca_locked(self, which: str) -> CA:
        if self.write:
            return ensure_ca(self.dir, which=which)
        if which not in self._cas:
            ca = load_ca(self.dir, which)
            if ca is None:
                cert, key = make_ca(PEER_CA_CN if which == PEER_CA else CA_CN)
                ca = CA(cert, key, *_ca_paths(self.dir, which))
            self._cas[which] = ca
        return self._cas[which]

    def ca_pem(self, which: str = MAIN_CA) -> bytes:
        """The CA certificate as the hosts get it: the file's bytes, or the in-memory CA's PEM."""
        ca = self.ca(which)
        return ca.cert_path.read_bytes() if ca.cert_path.exists() else ca.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, host: str, purpose: Purpose | str, dns_names: Iterable[str] = (), ips: Iterable[str] = (),
             *, days: int = HOST_DAYS, reissue: bool = False) -> Leaf:
        """*host*'s certificate for *purpose* (a Purpose or a registered name). Server purposes carry *host*,
        *dns_names* and *ips* as SANs; client purposes carry none. The key file in state/pki is 0600."""
        p = purposes_get(purpose) if isinstance(purpose, str) else purpose
        cn = p.common_name(host)
        dns, ip_set = host_sans(host, dns_names, ips) if p.sans else (set(), set())
        cert_path, key_path = leaf_paths(self.dir, host, p.name)
        with self._lock:
            ca = self._ca_locked(p.ca)
            if not reissue and ca.key_path.exists() and _usable(cert_path, key_path, ca, p, cn, dns | ip_set):
                return self._leaf(p, host, cert_path.read_bytes(), key_path.read_bytes(), key_path, cert_path)
            if self.write:
                cert, key = issue_leaf(ca, p, cn, dns, ip_set, days)
                _ensure_dir(cert_path.parent)
                write_atomic(key_path, private_key_pem(key), 0o600)
                write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
                return self._leaf(p, host, cert_path.read_bytes(), key_path.read_bytes(), key_path, cert_path)
            k = (host, p.name, tuple(sorted(dns | ip_set)))
            if k not in self._mem:
                cert, key = issue_leaf(ca, p, cn, dns, ip_set, days)
                self._mem[k] = (cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key))
            return self._leaf(p, host, *self._mem[k], key_path, cert_path)

    def problems(self, host: str, purpose: Purpose | str, dns_names: Iterable[str] = (), ips: Iterable[str] = (),
                 min_days: int = RENEW_DAYS) -> list[str]:
        """What is wrong with *host*'s certificate for *purpose* in state/pki ([] = usable as it is)."""
        p = purposes_get(purpose) if isinstance(purpose, str) else purpose
        ca = load_ca(self.dir, p.ca)
        if ca is None:
            return [f"{_ca_paths(self.dir, p.ca)[0]}: no CA yet"]
        dns, ip_set = host_sans(host, dns_names, ips) if p.sans else (set(), set())
        cert_path, key_path = leaf_paths(self.dir, host, p.name)
        if not key_path.exists():
            return [f"{key_path}: missing"]
        return check_leaf(cert_path, ca, p, p.common_name(host), dns | ip_set, min_days)

    def _leaf(self, p: Purpose, host: str, crt: bytes, key: bytes, key_path: Path, cert_path: Path) -> Leaf:
        ca = self._ca_locked(p.ca)
        ca_pem = (ca.cert_path.read_bytes() if ca.cert_path.exists()
                  else ca.cert.public_bytes(serialization.Encoding.PEM))
        return Leaf(p, host, crt, key, ca_pem, key_path, cert_path)

    def drop_host(self, host: str) -> list[Path]:
        """Remove every certificate and key of *host* from state/pki (a host leaving the cluster)."""
        d = self.dir / host
        gone = sorted(d.glob("*")) if d.is_dir() else []
        for f in gone:
            f.unlink()
        if d.is_dir():
            d.rmdir()
        return gone
