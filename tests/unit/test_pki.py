"""runbook.pki: CA and host certificates made with `cryptography`, reused or re-issued."""
from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from runbook.credentials import pki, purposes



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


def test_every_purpose_gets_its_own_key_cn_eku_and_sans(pki_dir: Path) -> None:
    p = pki.Pki(pki_dir)
    host = {"etcd": "etcd01", "postgres": "node01", "balancer": "node01"}
    got = {name: p.leaf(host[pu.role], name, ["h.example.org"], ["192.168.60.141"])
           for name, pu in purposes.PURPOSES.items() if not name.startswith("test-")}
    assert len({lf.key_pem for lf in got.values()}) == len(got), "a key per purpose"
    want_eku = {"etcd-peer": {"server", "client"}, "etcd-server": {"server", "client"}, "etcd-root": {"client"},
                "etcd-client": {"client"}, "rest-server": {"server"}, "rest-client": {"client"},
                "pg-server": {"server"}, "haproxy-client": {"client"}, "pgbouncer-server": {"server"},
                "pgbackrest": {"server", "client"}}
    for name, lf in got.items():
        cert = x509.load_pem_x509_certificate(lf.cert_pem)
        assert pki.cert_eku(cert) == want_eku[name], name
        dns, ips = pki.cert_sans(cert)
        if lf.purpose.sans:
            assert dns == {lf.host, "h.example.org"} and ips == {"192.168.60.141"}, name  # no localhost
        else:
            assert (dns, ips) == (set(), set()), name  # a client certificate names no host
        assert _mode(lf.key_path) == 0o600 and lf.key_path == pki_dir / lf.host / f"{name}.key"
        assert _mode(lf.key_path.parent) == 0o700
        ca = pki.load_ca(pki_dir, lf.purpose.ca)
        assert pki.signed_by(cert, ca.cert) and lf.ca_pem == ca.cert_path.read_bytes()
    cns = {n: pki.cert_cn(x509.load_pem_x509_certificate(lf.cert_pem)) for n, lf in got.items()}
    assert cns == {"etcd-peer": "etcd01", "etcd-server": "etcd01", "etcd-root": "root", "etcd-client": "",
                   "rest-server": "node01", "rest-client": "patroni-rest", "pg-server": "node01",
                   "haproxy-client": "haproxy", "pgbouncer-server": "node01", "pgbackrest": "node01-pgbackrest"}
    # Patroni's etcd client has no CN at all: etcd refuses a CN through its JSON gateway
    client = x509.load_pem_x509_certificate(got["etcd-client"].cert_pem)
    assert client.subject.rfc4514_string() == "OU=etcd-client,O=pg-ha-runbook"
    # peers trust a CA that signs nothing else
    peer_ca, main_ca = pki.load_ca(pki_dir, "peer-ca"), pki.load_ca(pki_dir)
    for name, lf in got.items():
        cert = x509.load_pem_x509_certificate(lf.cert_pem)
        assert pki.signed_by(cert, peer_ca.cert) is (name == "etcd-peer"), name
        assert pki.signed_by(cert, main_ca.cert) is (name != "etcd-peer"), name
    assert not list(pki_dir.rglob(".*")), "no temp files left behind"


def test_leaf_reused_then_reissued_on_san_change_expiry_or_key_mismatch(pki_dir: Path) -> None:
    p = pki.Pki(pki_dir)
    first = p.leaf("node01", "pg-server", [], ["192.168.60.131"])
    assert p.leaf("node01", "pg-server", [], ["192.168.60.131"]) == first  # reused as it is
    other = p.leaf("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"])
    assert other.cert_pem != first.cert_pem and "node01.db.local" in pki.cert_sans(
        x509.load_pem_x509_certificate(other.cert_pem))[0]
    short = p.leaf("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"], days=10, reissue=True)
    problems = p.problems("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"])
    assert any("fewer than 30 days" in x for x in problems), problems
    renewed = p.leaf("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"])
    assert renewed.cert_pem != short.cert_pem
    left = x509.load_pem_x509_certificate(renewed.cert_pem).not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert left.days > 800
    foreign_key = p.leaf("node02", "pg-server", [], ["192.168.60.132"]).key_pem
    renewed.key_path.write_bytes(foreign_key)  # e.g. a crash between writing key and cert
    again = p.leaf("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"])
    assert again.key_pem != foreign_key and again.cert_pem != renewed.cert_pem
    assert p.problems("node01", "pg-server", ["node01.db.local"], ["192.168.60.131"]) == []


def test_validity_is_capped_by_the_ca(pki_dir: Path) -> None:
    ca = pki.ensure_ca(pki_dir)
    cert, _ = pki.issue_leaf(ca, purposes.REST_CLIENT, "x", set(), set(), days=100 * 365)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_wrong_eku_cn_san_and_expiry_are_named(pki_dir: Path) -> None:
    ca = pki.ensure_ca(pki_dir)
    p = pki.Pki(pki_dir)
    lf = p.leaf("etcd01", "etcd-server", [], ["192.168.60.141"])
    # a server certificate checked as a client certificate: EKU, CN and SAN all differ
    problems = pki.check_leaf(lf.cert_path, ca, purposes.ETCD_CLIENT, "", [])
    assert any("extendedKeyUsage is ['client', 'server'], want ['client']" in x for x in problems), problems
    assert any("CN is 'etcd01', want ''" in x for x in problems)
    assert any("unexpected etcd01, 192.168.60.141" in x for x in problems)
    problems = pki.check_leaf(lf.cert_path, ca, purposes.ETCD_SERVER, "etcd01", ["etcd02", "192.168.60.142"])
    assert any("missing etcd02, 192.168.60.142" in x for x in problems)
    key = serialization.load_pem_private_key(lf.key_pem, None)
    now = dt.datetime.now(dt.UTC)
    old = pki.load_cert(lf.cert_path)
    expired = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now - dt.timedelta(days=1))
               .add_extension(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
               .add_extension(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value, False)
               .sign(ca.key, hashes.SHA256()))
    lf.cert_path.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    problems = pki.check_leaf(lf.cert_path, ca, purposes.ETCD_SERVER, "etcd01", ["etcd01", "192.168.60.141"])
    assert len(problems) == 1 and "expired on" in problems[0]
    assert p.leaf("etcd01", "etcd-server", [], ["192.168.60.141"]).cert_pem != lf.cert_pem  # re-issued


def test_foreign_ca_detected_and_reissued(tmp_path: Path, pki_dir: Path, ca: pki.CA) -> None:
    twin = pki.Pki(tmp_path / "twin")  # a same-named CA with another key: foreign by signature, not name
    lf = twin.leaf("etcd01", "etcd-server", [], ["192.168.60.141"])
    problems = pki.check_leaf(lf.cert_path, ca, purposes.ETCD_SERVER, "etcd01", ["etcd01", "192.168.60.141"])
    assert len(problems) == 1 and "foreign CA" in problems[0]
    crt, key = pki.leaf_paths(pki_dir, "etcd01", "etcd-server")
    crt.parent.mkdir(mode=0o700)
    crt.write_bytes(lf.cert_pem)
    key.write_bytes(lf.key_pem)
    key.chmod(0o600)
    assert pki.Pki(pki_dir).leaf("etcd01", "etcd-server", [], ["192.168.60.141"]).cert_pem != lf.cert_pem


def test_check_leaf_unreadable(tmp_path: Path, ca: pki.CA) -> None:
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    assert "not a PEM certificate" in pki.check_leaf(bad, ca, purposes.PG_SERVER, "x")[0]
    assert "cannot read" in pki.check_leaf(tmp_path / "missing.crt", ca, purposes.PG_SERVER, "x")[0]


def test_dry_run_writes_nothing_and_drop_host(tmp_path: Path, pki_dir: Path) -> None:
    dry = pki.Pki(tmp_path / "dry", write=False)
    a = dry.leaf("node01", "pg-server", [], ["192.168.60.131"])
    assert dry.leaf("node01", "pg-server", [], ["192.168.60.131"]) == a and not (tmp_path / "dry").exists()
    p = pki.Pki(pki_dir)
    p.leaf("node01", "pg-server", [], ["192.168.60.131"])
    p.leaf("node01", "rest-client")
    assert sorted(f.name for f in p.drop_host("node01")) == ["pg-server.crt", "pg-server.key", "rest-client.crt",
                                                             "rest-client.key"]
    assert not (pki_dir / "node01").exists()


def test_registering_a_purpose(pki_dir: Path) -> None:
    bk = purposes.register(purposes.Purpose("test-backup-server", "postgres", (purposes.SERVER,), "postgres",
                                            sans=True))
    try:
        assert purposes.register(bk) is bk  # idempotent
        with pytest.raises(ValueError, match="already registered differently"):
            purposes.register(purposes.Purpose("test-backup-server", "postgres", (purposes.CLIENT,), "postgres"))
        with pytest.raises(ValueError, match="eku"):
            purposes.register(purposes.Purpose("test-bad", "postgres", ("email",), "postgres"))
        lf = pki.Pki(pki_dir).leaf("node01", "test-backup-server", [], ["192.168.60.131"])
        assert pki.cert_eku(x509.load_pem_x509_certificate(lf.cert_pem)) == {"server"}
        with pytest.raises(ValueError, match="unknown certificate purpose"):
            purposes.get("nope")
    finally:
        purposes.PURPOSES.pop("test-backup-server", None)


def test_fingerprint_format(ca: pki.CA) -> None:
    fp = pki.fingerprint(ca.cert_path)
    assert fp == pki.fingerprint(ca.cert) == ca.fingerprint
    parts = fp.split(":")
    assert len(parts) == 32 and all(len(p) == 2 and p == p.upper() for p in parts)


