"""runbook.pki: CA and host certificates made with `cryptography`, reused or re-issued."""
from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from runbook.credentials import pki

SANS = ["etcd01", "localhost", "192.168.60.141", "127.0.0.1"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def pki_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "pki"


@pytest.fixture()
def ca(pki_dir: Path) -> pki.CA:
    return pki.ensure_ca(pki_dir)


def test_ca_generated_once_with_safe_modes(pki_dir: Path) -> None:
    ca = pki.ensure_ca(pki_dir)
    assert ca.cert_path == pki_dir / "ca.crt" and ca.key_path == pki_dir / "ca.key"
    assert _mode(pki_dir) == 0o700
    assert _mode(ca.key_path) == 0o600
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    years = (ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    again = pki.ensure_ca(pki_dir)
    assert again.fingerprint == ca.fingerprint


def test_ca_half_present_is_refused(pki_dir: Path) -> None:
    ca = pki.ensure_ca(pki_dir)
    ca.key_path.unlink()
    with pytest.raises(pki.PKIError, match="ca.key: missing"):
        pki.ensure_ca(pki_dir)


def test_ca_key_readable_by_others_is_refused(pki_dir: Path) -> None:
    ca = pki.ensure_ca(pki_dir)
    ca.key_path.chmod(0o644)
    with pytest.raises(pki.PKIError, match="chmod 600"):
        pki.ensure_ca(pki_dir)


def test_host_cert_generation(pki_dir: Path, ca: pki.CA) -> None:
    crt, key, changed = pki.ensure_host_cert(pki_dir, ca, "etcd01", ["etcd01.example.org"], ["192.168.60.141"])
    assert changed
    assert (crt, key) == (pki_dir / "etcd01.crt", pki_dir / "etcd01.key")
    assert _mode(key) == 0o600
    cert = pki.load_cert(crt)
    dns, ips = pki.cert_sans(cert)
    assert dns == {"etcd01", "etcd01.example.org", "localhost"}
    assert ips == {"192.168.60.141", "127.0.0.1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert pki.signed_by(cert, ca.cert)
    assert pki.check_cert(crt, ca, dns | ips) == []
    assert not list(pki_dir.glob(".*")), "no temp files left behind"


def test_host_cert_reused(pki_dir: Path, ca: pki.CA) -> None:
    first = pki.ensure_host_cert(pki_dir, ca, "etcd01", [], ["192.168.60.141"])
    fp = pki.fingerprint(first[0])
    key_bytes = first[1].read_bytes()
    second = pki.ensure_host_cert(pki_dir, ca, "etcd01", [], ["192.168.60.141"])
    assert second[2] is False
    assert pki.fingerprint(second[0]) == fp and second[1].read_bytes() == key_bytes


def test_host_cert_reissued_on_san_change(pki_dir: Path, ca: pki.CA) -> None:
    pki.ensure_host_cert(pki_dir, ca, "node01", [], ["192.168.60.131"])
    crt, _, changed = pki.ensure_host_cert(pki_dir, ca, "node01", ["node01.db.local"], ["192.168.60.131"])
    assert changed
    assert "node01.db.local" in pki.cert_sans(pki.load_cert(crt))[0]


def test_host_cert_reissued_when_expiring(pki_dir: Path, ca: pki.CA) -> None:
    crt, _, _ = pki.ensure_host_cert(pki_dir, ca, "node01", [], ["192.168.60.131"], days=10)
    problems = pki.check_cert(crt, ca, ["node01", "localhost", "192.168.60.131", "127.0.0.1"],
                              min_days=pki.RENEW_DAYS)
    assert any("fewer than 30 days" in p for p in problems)
    crt, _, changed = pki.ensure_host_cert(pki_dir, ca, "node01", [], ["192.168.60.131"])
    assert changed
    left = pki.load_cert(crt).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert left.days > 800


def test_host_cert_reissued_when_key_does_not_match(pki_dir: Path, ca: pki.CA) -> None:
    _, key, _ = pki.ensure_host_cert(pki_dir, ca, "etcd02", [], ["192.168.60.142"])
    other = pki.ensure_host_cert(pki_dir, ca, "etcd03", [], ["192.168.60.143"])[1]
    key.write_bytes(other.read_bytes())  # e.g. a crash between writing key and cert
    assert pki.ensure_host_cert(pki_dir, ca, "etcd02", [], ["192.168.60.142"])[2] is True


def test_foreign_ca_detected_and_reissued(tmp_path: Path, pki_dir: Path, ca: pki.CA) -> None:
    foreign = pki.ensure_ca(tmp_path / "other", common_name="someone else's CA")
    crt, _, _ = pki.ensure_host_cert(tmp_path / "other", foreign, "etcd01", [], ["192.168.60.141"])
    problems = pki.check_cert(crt, ca, SANS)
    assert len(problems) == 1 and "foreign CA" in problems[0]
    # a same-named CA with a different key is foreign too (signature, not just the issuer name)
    twin = pki.ensure_ca(tmp_path / "twin")
    crt2, _, _ = pki.ensure_host_cert(tmp_path / "twin", twin, "etcd01", [], ["192.168.60.141"])
    assert any("foreign CA" in p for p in pki.check_cert(crt2, ca, SANS))
    # and ensure_host_cert replaces a foreign-signed pair in our pki dir
    (pki_dir / "etcd01.crt").write_bytes(crt.read_bytes())
    (pki_dir / "etcd01.key").write_bytes((tmp_path / "other" / "etcd01.key").read_bytes())
    (pki_dir / "etcd01.key").chmod(0o600)
    assert pki.ensure_host_cert(pki_dir, ca, "etcd01", [], ["192.168.60.141"])[2] is True


def test_check_cert_wrong_san_and_expired(pki_dir: Path, ca: pki.CA) -> None:
    crt, _, _ = pki.ensure_host_cert(pki_dir, ca, "etcd01", [], ["192.168.60.141"])
    problems = pki.check_cert(crt, ca, ["etcd02", "localhost", "192.168.60.142", "127.0.0.1"])
    assert any("missing etcd02, 192.168.60.142" in p for p in problems)
    assert any("unexpected etcd01, 192.168.60.141" in p for p in problems)

    key = serialization.load_pem_private_key((pki_dir / "etcd01.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    old = pki.load_cert(crt)
    expired = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now - dt.timedelta(days=1))
               .add_extension(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
               .add_extension(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value, False)
               .sign(ca.key, hashes.SHA256()))
    crt.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    problems = pki.check_cert(crt, ca, SANS)
    assert len(problems) == 1 and "expired on" in problems[0]
    assert pki.ensure_host_cert(pki_dir, ca, "etcd01", [], ["192.168.60.141"])[2] is True


def test_check_cert_unreadable(tmp_path: Path, ca: pki.CA) -> None:
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    assert "not a PEM certificate" in pki.check_cert(bad, ca, SANS)[0]
    assert "cannot read" in pki.check_cert(tmp_path / "missing.crt", ca, SANS)[0]


def test_fingerprint_format(ca: pki.CA) -> None:
    fp = pki.fingerprint(ca.cert_path)
    assert fp == pki.fingerprint(ca.cert) == ca.fingerprint
    parts = fp.split(":")
    assert len(parts) == 32 and all(len(p) == 2 and p == p.upper() for p in parts)


def test_check_cert_local_sans_implicit(pki_dir: Path, ca: pki.CA) -> None:
    crt, _, _ = pki.ensure_host_cert(pki_dir, ca, "node01", ["node01.lan"], ["192.168.60.131"])
    assert pki.check_cert(crt, ca, ["node01", "node01.lan", "192.168.60.131"]) == []
    strict = pki.check_cert(crt, ca, ["node01", "node01.lan", "192.168.60.131"], include_local=False)
    assert strict == [f"{crt}: wrong SAN: unexpected localhost, 127.0.0.1"]
