"""The offline bundle on real hosts: bundle.push keeps only what the manifest lists, postgres.packages
installs the manifest's list and refuses a downgrade unless runbook.allow_downgrade, and a bundle other
than the approved one (runbook.manifest_sha256) is refused before any host is touched."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import INV, REPO, SCALE, env, executed, inv

from runbook.bundle.manifest import Entry, load_manifest, make_entry, manifest_sha256, write_manifest

pytestmark = pytest.mark.e2e
REMOTE = "/opt/runbook-bundle"
PROBE = "runbook-e2e-probe"


def run_inv(state: Path, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=REPO, env={**env(state), **(extra or {})}, capture_output=True,
                          text=True, timeout=900 * SCALE, stdin=subprocess.DEVNULL)


def probe_deb(where: Path, version: str) -> Path:
    """A tiny real package, built here with dpkg-deb."""
    d = where / f"{PROBE}-{version}"
    (d / "DEBIAN").mkdir(parents=True)
    (d / "DEBIAN/control").write_text(f"Package: {PROBE}\nVersion: {version}\nArchitecture: all\n"
                                      "Maintainer: runbook e2e <root@localhost>\nDescription: downgrade probe\n")
    out = where / f"{PROBE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(d), str(out)], check=True, capture_output=True)
    return out


def installed(tr, host) -> str:
    return tr.run(host, f"dpkg-query -W -f='${{Version}}' {PROBE} 2>/dev/null").stdout.strip()


def test_push_removes_a_stale_file_from_the_hosts_bundle(converged, lab_transport):
    inventory, state = converged
    node = inventory.postgres[0]
    first = load_manifest(REPO / "bundle").debs()[0]
    major = inventory.cluster.postgres_major  # what an older bundle left, in the host's distribution's directory
    stale = f"{REMOTE}/debs/{node.os}/postgresql-{major}_{major}.0-0+old1_amd64.deb"
    assert lab_transport.run(node, f"cp {REMOTE}/{first.path} {stale}").ok
    # the ledger says done: a plain run contacts no host; --verify probes it and finds the stray file
    out = inv(state, "bundle.push", "--hosts", node.name, "--verify").stdout
    assert executed(out) >= 1, out
    assert lab_transport.run(node, f"test -e {stale}").rc == 1, "the stale .deb is still on the host"
    assert lab_transport.run(node, f"sha256sum --quiet -c {REMOTE}/SHA256SUMS").ok
    assert executed(inv(state, "bundle.push", "--hosts", node.name).stdout) == 0  # and now it is a no-op


@pytest.fixture
def probe_bundle(lab, tmp_path):
    """The session's bundle plus PROBE 1.0 (a postgres deb of the PostgreSQL hosts' distribution), as a second
    bundle directory."""
    src = REPO / "bundle"
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst, copy_function=lambda a, b: shutil.copy2(a, b))
    deb = probe_deb(tmp_path, "1.0")
    os_name = lab.postgres[0].os
    rel = f"debs/{os_name}/{deb.name}"
    shutil.copy2(deb, dst / rel)
    m = load_manifest(dst)
    entries: list[Entry] = [*m.files, make_entry(dst, rel, kind="deb", version="1.0", name=PROBE, source="e2e",
                                                 roles=("postgres",), os=(os_name,))]
    write_manifest(dst, entries, etcd_version=m.etcd_version, target=m.target, created=m.created)
    return dst


def test_a_downgrade_is_refused_unless_allowed(converged, lab_transport, probe_bundle, tmp_path):
    inventory, state = converged
    node = inventory.postgres[0]
    newer = probe_deb(tmp_path, "2.0")
    lab_transport.put(node, f"/tmp/{newer.name}", newer.read_bytes())
    assert lab_transport.run(node, f"dpkg -i /tmp/{newer.name} && rm -f /tmp/{newer.name}").ok
    extra = {"INVOKE_RUNBOOK_BUNDLE_DIR": str(probe_bundle)}
    try:
        r = run_inv(state, "cluster.up", "--hosts", node.name, extra=extra)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "postgres.packages" in out and f"{PROBE}: installed 2.0, bundled 1.0" in out, out
        assert f"{node.name}: refusing to downgrade" in out and "runbook.allow_downgrade: true" in out, out
        assert installed(lab_transport, node) == "2.0"  # nothing was installed
        r = run_inv(state, "cluster.up", "--hosts", node.name, extra={**extra, "INVOKE_RUNBOOK_ALLOW_DOWNGRADE": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert installed(lab_transport, node) == "1.0"  # asked for: the bundle's version
    finally:
        lab_transport.run(node, f"dpkg -r {PROBE} >/dev/null 2>&1; true")
        # back to the session's bundle: the probe .deb is not in its manifest, so push removes it
        back = run_inv(state, "cluster.up", "--hosts", node.name)
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-2000:]
    assert lab_transport.run(node, f"ls {REMOTE}/debs/{node.os}/ | grep -c {PROBE}").stdout.strip() == "0"


def test_only_the_approved_bundle_is_pushed(converged, lab_transport):
    inventory, state = converged
    node = inventory.postgres[0]
    digest = manifest_sha256(REPO / "bundle")
    wrong = "f" * 64
    r = run_inv(state, "cluster.up", "--hosts", node.name, extra={"INVOKE_RUNBOOK_MANIFEST_SHA256": wrong})
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "bundle.verify" in out and f"sha256 {digest} is not the approved bundle" in out, out
    assert f"runbook.manifest_sha256: {digest}" in out, out
    r = run_inv(state, "cluster.up", "--hosts", node.name, extra={"INVOKE_RUNBOOK_MANIFEST_SHA256": digest})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
