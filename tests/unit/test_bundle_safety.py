"""The bundle's safety: packages installed from the manifest's list (never a glob), downgrades refused
unless allowed, stale files pruned by bundle.push, provenance pinned (etcd sha256, hashed dependencies,
approved manifest)."""
from __future__ import annotations

import pytest

from runbook.bundle.build import BuildOptions, build_bundle, etcd_tarball
from runbook.bundle.manifest import BundleError, approved, load_manifest, make_entry, manifest_sha256, write_manifest
from runbook.bundle.wheels import parse_report, resolved_txt
from runbook.core.step import Local, Run
from runbook.inventory.settings import load_settings
from runbook.sections import postgres, push
from runbook.sections.bundle_files import _manifest

@pytest.fixture
def inv(tmp_path):
    """The reference topology on Debian 12 (the bundle below is a Debian 12 one: tarball, PostgreSQL 15)."""
    from conftest import reference_on

    return reference_on("debian12", tmp_path)


DEBS = {"postgresql-15": "15.14-0+deb12u1", "libpq5": "15.14-0+deb12u1", "python3-venv": "3.11.2-1+b1"}


@pytest.fixture
def bundle(ctx):
    root = ctx.bundle_dir
    files = {"etcd/etcd-v3.5.16-linux-amd64.tar.gz": ("etcd", ("etcd",), "etcd", "3.5.16"),
             "wheels/patroni-4.1.5-py3-none-any.whl": ("wheel", ("postgres",), "patroni", "4.1.5"),
             "wheels/requirements.txt": ("meta", ("postgres",), "", "")}
    files.update({f"debs/debian12/{n}_{v}_amd64.deb": ("deb", ("postgres",), n, v) for n, v in DEBS.items()})
    entries = []
    for rel, (kind, roles, name, version) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        entries.append(make_entry(root, rel, kind=kind, version=version, name=name, source="test", roles=roles))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    _manifest.cache_clear()
    yield root
    _manifest.cache_clear()


def _runs(actions) -> list[Run]:
    return [a for a in actions if isinstance(a, Run)]


def test_packages_installs_exactly_the_manifests_debs(ctx, bundle):
    node = ctx.inventory.postgres[0]
    dpkg = [r.cmd for r in _runs(postgres.packages.actions_fn(ctx, node)) if "dpkg -i" in r.cmd]
    assert len(dpkg) == 1 and "*" not in dpkg[0]
    listed = sorted(w for w in dpkg[0].split() if w.endswith(".deb"))
    assert listed == sorted(f"/opt/runbook-bundle/debs/debian12/{n}_{v}_amd64.deb" for n, v in DEBS.items())


def test_a_downgrade_guard_runs_before_dpkg_unless_allowed(ctx, bundle):
    node = ctx.inventory.postgres[0]
    cmds = [r.cmd for r in _runs(postgres.packages.actions_fn(ctx, node))]
    guard = next(r for r in _runs(postgres.packages.actions_fn(ctx, node)) if "compare-versions" in r.cmd)
    assert cmds.index(guard.cmd) < next(i for i, c in enumerate(cmds) if "dpkg -i" in c)
    assert sorted(guard.stdin.decode().splitlines()) == sorted(f"{n} {v}" for n, v in DEBS.items())
    assert "refusing to downgrade" in guard.cmd and "runbook.allow_downgrade: true" in guard.cmd
    for value, guarded in (("true", False), ("1", False), ("false", True), ("", True)):
        ctx.settings = _settings(ctx, allow_downgrade=value)
        assert any("compare-versions" in r.cmd for r in _runs(postgres.packages.actions_fn(ctx, node))) == guarded


def test_push_prunes_what_the_manifest_does_not_list_and_its_check_sees_extras(ctx, bundle):
    etcd = ctx.inventory.etcd[0]
    runs = [r.cmd for r in _runs(push.push.actions_fn(ctx, etcd))]
    prune = next(c for c in runs if "rm -f" in c)
    assert "find /opt/runbook-bundle -type f" in prune and "/opt/runbook-bundle/SHA256SUMS" in prune
    assert runs.index(prune) < next(i for i, c in enumerate(runs) if "sha256sum --quiet -c" in c)
    # an etcd host holds the tarball + SHA256SUMS + SIZES: one more file makes the check fail
    assert '= 3 ]' in push.push.check_fn(ctx, etcd)


def _settings(ctx, **values):
    """The validated settings a session would hand the steps, with `values` as if set in invoke.yaml."""
    return load_settings(values, root=ctx.state_dir.parent, files=[], environ={})


def _verify_action(ctx) -> Local:
    return next(a for a in push.verify.actions_fn(ctx, ctx.inventory.etcd[0]) if isinstance(a, Local))


def test_push_refuses_a_bundle_other_than_the_approved_one(ctx, bundle):
    digest = manifest_sha256(bundle)
    ctx.settings = _settings(ctx, manifest_sha256=digest)
    assert "approved" in _verify_action(ctx).fn()
    other = "0" * 64
    ctx.settings = _settings(ctx, manifest_sha256=other)
    with pytest.raises(BundleError, match=rf"sha256 {digest} is not the approved bundle .*pins {other}.*"
                                          rf"runbook.manifest_sha256: {digest}"):
        _verify_action(ctx).fn()
    assert _verify_action(ctx).key != _verify_action(ctx.__class__(**{**ctx.__dict__, "settings": None})).key


def test_approved_without_a_pin_accepts_any_verified_bundle(bundle):
    m = load_manifest(bundle)
    assert approved(m, "") == manifest_sha256(bundle)
    assert approved(m, manifest_sha256(bundle).upper()) == manifest_sha256(bundle)


def test_an_etcd_tarball_without_its_sha256_is_refused(tmp_path):
    tarball = tmp_path / "etcd-v3.5.16-linux-amd64.tar.gz"
    tarball.write_bytes(b"x")
    with pytest.raises(BundleError, match=r"--etcd-tarball .*no sha256 .*--etcd-sha256 .*runbook.etcd_sha256"):
        etcd_tarball(BuildOptions(bundle_dir=tmp_path / "b", etcd_tarball=str(tarball)), print)
    with pytest.raises(BundleError, match=r"--etcd-tarball .*no sha256"):
        build_bundle(BuildOptions(bundle_dir=tmp_path / "b", etcd_tarball=str(tarball), cache=tmp_path / "c"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before writing anything
    with pytest.raises(BundleError, match="does not match the expected sha256"):
        etcd_tarball(BuildOptions(bundle_dir=tmp_path / "b", etcd_tarball=str(tarball), etcd_sha256="1" * 64), print)


REPORT = {"install": [
    {"metadata": {"name": "Patroni", "version": "4.1.5"},
     "download_info": {"url": "x/patroni-4.1.5-py3-none-any.whl", "archive_info": {"hashes": {"sha256": "a" * 64}}}},
    {"metadata": {"name": "python_etcd", "version": "0.4.5"},
     "download_info": {"url": "x/python-etcd-0.4.5.tar.gz", "archive_info": {"hashes": {"sha256": "b" * 64}}}},
]}


def test_every_resolved_dependency_is_pinned_with_its_hash():
    pins = parse_report(REPORT)
    assert pins == [("patroni", "4.1.5", "a" * 64), ("python-etcd", "0.4.5", "b" * 64)]
    lines = [ln for ln in resolved_txt(pins, ("patroni[etcd3]==4.1.5",)).splitlines() if not ln.startswith("#")]
    assert lines == [f"patroni==4.1.5 --hash=sha256:{'a' * 64}", f"python-etcd==0.4.5 --hash=sha256:{'b' * 64}"]


def test_a_resolved_file_without_a_hash_is_refused():
    local = {"install": [{"metadata": {"name": "x", "version": "1"}, "download_info": {"url": "file:///src/x"}}]}
    with pytest.raises(BundleError, match=r"x==1 without a sha256 .*file:///src/x"):
        parse_report(local)
