"""manifest.json + verify_bundle on a small corpus built in tmp_path (no network, no root)."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from runbook.bundle import BundleError, load_manifest, verify_bundle
from runbook.bundle.debs import deb_filename, parse_simulation
from runbook.bundle.etcd import pack, upstream, version_of
from runbook.bundle.manifest import MANIFEST, REQUIREMENTS, make_entry, sha256_file, write_manifest
from runbook.bundle.wheels import Wheel, requirements_txt, tag_ok

FILES = {
    "etcd/etcd-v3.5.16-linux-amd64.tar.gz": ("etcd", "3.5.16", ("etcd",), b"tarball" * 100),
    "debs/debian12/libpq5_15.10-0+deb12u1_amd64.deb": ("deb", "15.10-0+deb12u1", ("postgres",), b"deb" * 300),
    "debs/debian12/postgresql-15_15.10-0+deb12u1_amd64.deb": ("deb", "15.10-0+deb12u1", ("postgres",),
                                                              b"pg" * 50),
    "wheels/patroni-4.1.5-py3-none-any.whl": ("wheel", "4.1.5", ("postgres",), b"wheel" * 40),
    REQUIREMENTS: ("meta", "", ("postgres",), b"patroni==4.1.5 --hash=sha256:00\n"),
}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    entries = []
    for rel, (kind, version, roles, data) in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append(make_entry(root, rel, kind=kind, version=version, source="test", roles=roles))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    return root


def _error(root: Path) -> str:
    with pytest.raises(BundleError) as exc:
        verify_bundle(root)
    return str(exc.value)


def test_good_bundle_verifies_and_api(bundle: Path) -> None:
    m = verify_bundle(bundle)
    assert m.etcd_version == "3.5.16"
    assert m.etcd_tarball().path == "etcd/etcd-v3.5.16-linux-amd64.tar.gz"
    assert m.requirements().path == REQUIREMENTS
    assert [e.path for e in m.files_for({"etcd"})] == ["etcd/etcd-v3.5.16-linux-amd64.tar.gz"]
    assert len(m.files_for({"postgres"})) == 4
    assert len(m.files_for({"etcd", "postgres"})) == 5
    assert len(m.debs()) == 2 and len(m.wheels()) == 1
    e = m.debs()[0]
    assert m.path(e).is_file() and e.sha256 == sha256_file(m.path(e)) and e.size == m.path(e).stat().st_size
    with pytest.raises(BundleError, match="unknown role"):
        m.files_for({"web"})


def test_truncated_file_is_named(bundle: Path) -> None:
    p = bundle / "debs/debian12/libpq5_15.10-0+deb12u1_amd64.deb"
    p.write_bytes(p.read_bytes()[:10])
    msg = _error(bundle)
    assert "libpq5_15.10-0+deb12u1_amd64.deb: truncated: 10 bytes, manifest says 900" in msg
    assert "re-copy" in msg


def test_altered_file_same_size_is_named(bundle: Path) -> None:
    p = bundle / "wheels/patroni-4.1.5-py3-none-any.whl"
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    msg = _error(bundle)
    assert "patroni-4.1.5-py3-none-any.whl: sha256 mismatch" in msg


def test_missing_file_is_named(bundle: Path) -> None:
    (bundle / "etcd/etcd-v3.5.16-linux-amd64.tar.gz").unlink()
    msg = _error(bundle)
    assert "etcd-v3.5.16-linux-amd64.tar.gz: missing" in msg


def test_extra_file_is_named(bundle: Path) -> None:
    (bundle / "wheels/evil-1.0-py3-none-any.whl").write_bytes(b"x")
    msg = _error(bundle)
    assert "wheels/evil-1.0-py3-none-any.whl: extra file, not in the manifest" in msg


def test_every_problem_is_listed(bundle: Path) -> None:
    (bundle / "etcd/etcd-v3.5.16-linux-amd64.tar.gz").unlink()
    (bundle / "stray.txt").write_text("x")
    (bundle / REQUIREMENTS).write_text("")
    msg = _error(bundle)
    assert "3 problem(s)" in msg
    for name in ("etcd-v3.5.16-linux-amd64.tar.gz", "stray.txt", "requirements.txt"):
        assert name in msg


@pytest.mark.parametrize(("text", "expect"), [
    ("{not json", "manifest.json: not valid JSON"),
    ("[]", "manifest.json: expected an object with a 'files' list"),
    ('{"format": 9, "files": []}', "format 9 is not supported"),
    ('{"format": 1, "files": [{"path": "a.deb"}]}', "files[0]: missing key(s) sha256, size, kind"),
    ('{"format": 1, "files": [{"path": "../x.deb", "sha256": "' + "0" * 64 + '", "size": 1, "kind": "deb"}]}',
     "unsafe path '../x.deb'"),
    ('{"format": 1, "files": [{"path": "w.whl", "sha256": "xyz", "size": 1, "kind": "wheel"}]}',
     "(w.whl): sha256 is not 64"),
    ('{"format": 1, "files": [{"path": "w.whl", "sha256": "' + "0" * 64 + '", "size": -1, "kind": "wheel"}]}',
     "(w.whl): size must be"),
    ('{"format": 1, "files": [{"path": "w.zip", "sha256": "' + "0" * 64 + '", "size": 1, "kind": "zip"}]}',
     "(w.zip): kind 'zip'"),
])
def test_malformed_manifest_names_the_file(bundle: Path, text: str, expect: str) -> None:
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError) as exc:
        load_manifest(bundle)
    assert str(bundle / MANIFEST) in str(exc.value)
    assert expect in str(exc.value)


def test_missing_manifest_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle directory"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_manifest(tmp_path)


def test_duplicate_entry_is_refused(bundle: Path) -> None:
    doc = json.loads((bundle / MANIFEST).read_text())
    doc["files"].append(doc["files"][0])
    (bundle / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="listed twice"):
        load_manifest(bundle)


def test_manifest_write_is_atomic_and_sorted(bundle: Path) -> None:
    assert not list(bundle.glob(".manifest.*"))
    paths = [f["path"] for f in json.loads((bundle / MANIFEST).read_text())["files"]]
    assert paths == sorted(paths)


def test_apt_simulation_parsing() -> None:
    out = ("Inst libllvm14 (1:14.0.6-12 Debian:12.10/stable [amd64])\n"
           "Inst perl-base [5.36.0-7+deb12u1] (5.36.0-7+deb12u2 Debian-Security:12/stable-security [amd64])\n"
           "Conf libllvm14 (1:14.0.6-12 Debian:12.10/stable [amd64])\n")
    plan = parse_simulation(out)
    assert plan == [("libllvm14", "1:14.0.6-12", "Debian:12.10/stable", "amd64"),
                    ("perl-base", "5.36.0-7+deb12u2", "Debian-Security:12/stable-security", "amd64")]
    assert deb_filename("libllvm14", "1:14.0.6-12", "amd64") == "libllvm14_1%3a14.0.6-12_amd64.deb"


def test_etcd_versions_and_deterministic_pack(tmp_path: Path) -> None:
    assert upstream("3.5.16-4") == "3.5.16" and upstream("1:3.5.16+dfsg-1") == "3.5.16"
    assert version_of(Path("etcd-v3.5.16-linux-amd64.tar.gz")) == "3.5.16"
    with pytest.raises(BundleError, match="not an etcd release tarball name"):
        version_of(Path("etcd.tgz"))
    for b in ("etcd", "etcdctl"):
        (tmp_path / b).write_bytes(b"\x7fELF" + b.encode())
    files = {b: tmp_path / b for b in ("etcd", "etcdctl")}
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    pack(a, "3.5.16", files, "readme\n")
    pack(b, "3.5.16", files, "readme\n")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.read_bytes()))) as tf:
        assert tf.getnames() == ["etcd-v3.5.16-linux-amd64", "etcd-v3.5.16-linux-amd64/README",
                                 "etcd-v3.5.16-linux-amd64/etcd", "etcd-v3.5.16-linux-amd64/etcdctl"]


def test_wheel_tags_and_requirements(tmp_path: Path) -> None:
    assert tag_ok("patroni-4.1.5-py3-none-any.whl")
    assert tag_ok("psycopg2_binary-2.9.13-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert tag_ok("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl")
    assert not tag_ok("psycopg2_binary-2.9.13-cp312-cp312-manylinux2014_x86_64.whl")
    assert not tag_ok("x-1.0-cp311-cp311-manylinux_2_39_x86_64.whl")
    assert not tag_ok("x-1.0-cp311-cp311-macosx_11_0_arm64.whl")
    ws = [Wheel("patroni", "4.1.5", tmp_path / "p.whl", "a" * 64, False),
          Wheel("python-etcd", "0.4.5", tmp_path / "e.whl", "b" * 64, True)]
    txt = requirements_txt(ws, ("patroni[etcd3]==4.1.5",))
    assert f"patroni[etcd3]==4.1.5 --hash=sha256:{'a' * 64}" in txt
    assert f"python-etcd==0.4.5 --hash=sha256:{'b' * 64}" in txt


def test_every_bundle_task_documents_every_parameter() -> None:
    import inspect

    from runbook.bundle.tasks import ns

    assert sorted(ns.task_names) == ["build", "etcd-from-debian", "verify"]
    for name in ns.task_names:
        t = ns[name]
        assert (t.__doc__ or "").strip(), name
        params = list(inspect.signature(t.body).parameters)[1:]
        assert sorted(params) == sorted(t.help), name
