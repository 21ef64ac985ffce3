"""Bad inputs, continued: the PKI under state/pki and state/secrets.yml (see test_bad_inputs.py)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_bad_inputs import VALID, checkpoints, inv_run, make_bundle, refused  # noqa: F401
from test_cli_errors import GUARD

from runbook.core.engine import RunFailed, apply
from runbook.credentials import pki
from runbook.credentials.purposes import ETCD_SERVER
from runbook.inventory import LOCAL
from runbook.sections import section_steps
from runbook.sections.tls_files import sans


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory) -> Path:
    """The socket guard that records any connection attempt of an `inv` subprocess (test_cli_errors)."""
    d = tmp_path_factory.mktemp("netguard")
    (d / "sitecustomize.py").write_text(GUARD)
    return d


# -- PKI -----------------------------------------------------------------------------------------------

def _cert(signer_cert: x509.Certificate, signer_key, name: str, names: list[str], *, days_ago: int = 0,
          days: int = 825) -> tuple[bytes, bytes]:
    """A host certificate (PEM cert, PEM key) with an explicit validity window."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    san = []
    for n in names:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            san.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(signer_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(signer_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _plant(ctx, host: str, cert_key: tuple[bytes, bytes]) -> bytes:
    crt, key = pki.leaf_paths(ctx.pki_dir, host, "etcd-server")
    crt.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    crt.write_bytes(cert_key[0])
    key.write_bytes(cert_key[1])
    key.chmod(0o600)
    return cert_key[0]


def _host_names(ctx, name: str) -> list[str]:
    h = next(h for h in ctx.inventory.hosts if h.name == name)
    dns, ips = sans(ctx, h)
    return dns + ips


def _step(name: str):
    return next(s for s in section_steps("etcd") if s.name == name)


def _bad_cert(ctx, kind: str) -> tuple[bytes, bytes]:
    ca = pki.ensure_ca(ctx.pki_dir)
    if kind == "expired":
        return _cert(ca.cert, ca.key, "etcd01", _host_names(ctx, "etcd01"), days_ago=900, days=825)
    if kind == "wrong-san":
        return _cert(ca.cert, ca.key, "etcd01", ["etcd09", "192.168.60.199", "localhost", "127.0.0.1"])
    foreign = pki.ensure_ca(ctx.state_dir / "foreign-pki", common_name="someone else's CA")
    return _cert(foreign.cert, foreign.key, "etcd01", _host_names(ctx, "etcd01"))


PKI_REISSUE = {"expired": "expired on", "wrong-san": "wrong SAN: missing etcd01", "foreign-ca": "foreign CA"}


@pytest.mark.parametrize("kind", list(PKI_REISSUE))
def test_pki_step_reissues_a_bad_host_certificate(ctx, kind):
    """etcd.pki's check reports the problem, the step re-issues the certificate (the designed behaviour)."""
    pki_step = _step("etcd.pki")
    old = _plant(ctx, "etcd01", _bad_cert(ctx, kind))
    ca = pki.ensure_ca(ctx.pki_dir)
    crt = pki.leaf_paths(ctx.pki_dir, "etcd01", "etcd-server")[0]
    problems = pki.check_leaf(crt, ca, ETCD_SERVER, "etcd01", _host_names(ctx, "etcd01"))
    assert any(PKI_REISSUE[kind] in p and str(crt) in p for p in problems), problems
    assert pki_step.check_fn(ctx, LOCAL) is False
    report = apply(ctx, [pki_step], ctx.inventory.hosts)
    assert report.executed == [("local", "etcd.pki")] and not report.failed
    assert crt.read_bytes() != old, "not re-issued"
    assert pki.check_leaf(crt, ca, ETCD_SERVER, "etcd01", _host_names(ctx, "etcd01"), min_days=pki.RENEW_DAYS) == []
    assert ctx.transport.writes == []  # a local step: no host touched


def test_certificate_expired_after_pki_was_done_is_reissued_and_redeployed(ctx):
    """The real-life order: etcd.pki done long ago (same fingerprint, skipped), then the cert expires.
    etcd.tls renders from a fresh certificate, so the new one - not the expired one - goes to the host."""
    steps = [_step("etcd.pki"), _step("etcd.tls")]
    etcd01 = ctx.inventory.select("etcd01")
    apply(ctx, steps, etcd01)
    first = ctx.transport.files[("etcd01", "/etc/etcd/tls/etcd-server.crt")][0]
    expired = _plant(ctx, "etcd01", _bad_cert(ctx, "expired"))
    report = apply(ctx, steps, etcd01)
    assert ("etcd01", "etcd.tls") in report.executed, report
    sent = ctx.transport.files[("etcd01", "/etc/etcd/tls/etcd-server.crt")][0]
    assert sent not in (first, expired)
    ca = pki.ensure_ca(ctx.pki_dir)
    cert = x509.load_pem_x509_certificate(sent)
    assert pki.signed_by(cert, ca.cert) and cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)


def test_pki_step_refuses_a_ca_key_others_can_read(ctx):
    pki.ensure_ca(ctx.pki_dir)
    (ctx.pki_dir / "ca.key").chmod(0o644)
    with pytest.raises(RunFailed) as exc:
        apply(ctx, [_step("etcd.pki")], ctx.inventory.hosts)
    assert f"{ctx.pki_dir / 'ca.key'}: private key is readable by group/others (mode 0644)" in str(exc.value)
    assert "chmod 600" in str(exc.value)
    assert oct((ctx.pki_dir / "ca.key").stat().st_mode & 0o777) == "0o644"  # refused, not "fixed" silently
    assert not (ctx.pki_dir / "etcd01.crt").exists()


PKI_REFUSE = {
    "ca-key-0644": (lambda d: (d / "ca.key").chmod(0o644),
                    ["ca.key: private key is readable by group/others (mode 0644)", "chmod 600"]),
    "ca-key-0640": (lambda d: (d / "ca.key").chmod(0o640), ["ca.key: private key is readable by group/others "
                                                            "(mode 0640)"]),
    "ca-key-missing": (lambda d: (d / "ca.key").unlink(),
                       ["ca.key: missing while its pair exists", "restore it from backup"]),
    "ca-cert-missing": (lambda d: (d / "ca.crt").unlink(), ["ca.crt: missing while its pair exists"]),
    "ca-cert-garbage": (lambda d: (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n"),
                        ["ca.crt: not a PEM certificate"]),
}


@pytest.mark.parametrize("case", list(PKI_REFUSE))
def test_unsafe_or_half_present_ca_is_refused_by_etcd_install_dry(guard_dir, tmp_path, case):
    damage, expect = PKI_REFUSE[case]
    pki_dir = tmp_path / "state" / "pki"
    pki.ensure_ca(pki_dir)
    damage(pki_dir)
    before = sorted(p.name for p in pki_dir.iterdir())
    r = inv_run(["etcd.install", "--dry"], guard_dir, tmp_path, bundle=make_bundle(tmp_path / "bundle"))
    refused(r, tmp_path, str(pki_dir), *expect)
    assert sorted(p.name for p in pki_dir.iterdir()) == before  # no new CA, no host certificate


# -- state/secrets.yml ---------------------------------------------------------------------------------

SECRETS_CASES = {
    "world-readable": ("superuser: {username: postgres, password: abc}\n", 0o644,
                       ["is readable or writable by group/others (mode 0644)", "chmod 600", "rotating"]),
    "group-writable": ("superuser: {username: postgres, password: abc}\n", 0o620, ["(mode 0620)"]),
    "malformed": ("superuser: {username: postgres, password: abc\nadmin: [\n", 0o600,
                  ["invalid YAML", "fix or restore it from backup"]),
    "duplicate-key": ("admin: {username: admin, password: a}\nadmin: {username: admin, password: b}\n", 0o600,
                      ["duplicate key 'admin'"]),
    "wrong-shape": ("restapi: hunter2\n", 0o600, ["restapi: expected {username: <str>, password: <str>}"]),
}


@pytest.mark.parametrize("case", list(SECRETS_CASES))
def test_bad_secrets_file_is_refused_before_anything_is_recorded(guard_dir, tmp_path, case):
    text, mode, expect = SECRETS_CASES[case]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "secrets.yml"
    path.write_text(text)
    path.chmod(mode)
    r = inv_run(["cluster.up"], guard_dir, tmp_path, bundle=make_bundle(tmp_path / "bundle"))
    refused(r, tmp_path, str(path), *expect)
    assert path.read_text() == text and (path.stat().st_mode & 0o777) == mode  # untouched
    assert not list(state.glob("*.db"))  # refused before the ledger: no run recorded, no lock left
