"""One bundle for Debian 12 and Debian 13 hosts: what is built for which inventory (targets), what each host
gets (files per role and distribution), how etcd is installed (tarball vs the distribution's packages), which
wheelhouse a host installs, and a bundle that lacks a host's needs refused by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from runbook.bundle.build import BuildOptions, targets_of
from runbook.bundle.manifest import BundleError, load_manifest, make_entry, write_manifest
from runbook.bundle.wheels import tag_ok
from runbook.cluster.context import Ctx
from runbook.core.context import Options
from runbook.core.ledger import Ledger
from runbook.core.step import Run
from runbook.core.testing import FakeTransport
from runbook.inventory import load_inventory
from runbook.sections import etcd, patroni, postgres, push
from runbook.sections.bundle_files import _manifest

ROOT = Path(__file__).resolve().parents[2]
# a mixed inventory (an OS migration under way): etcd01 and node02 on Debian 13 is refused (PostgreSQL 15 vs
# 17), so the PostgreSQL hosts stay on one distribution and the etcd hosts mix
MIXED = """\
cluster: {name: t, os: debian12}
hosts:
  etcd01: {address: 192.0.2.11, roles: [etcd], os: debian13}
  etcd02: {address: 192.0.2.12, roles: [etcd]}
  etcd03: {address: 192.0.2.13, roles: [etcd]}
  node01: {address: 192.0.2.21, roles: [postgres]}
  node02: {address: 192.0.2.22, roles: [postgres]}
"""
D13 = MIXED.replace(", os: debian13}", "}").replace("{name: t, os: debian12}", "{name: t, os: debian13}")
FILES = {
    "etcd/etcd-v3.5.16-linux-amd64.tar.gz": ("etcd", ("etcd",), ("debian12",)),
    "debs/debian12/postgresql-15_15.14_amd64.deb": ("deb", ("postgres",), ("debian12",)),
    "debs/debian13/postgresql-17_17.6_amd64.deb": ("deb", ("postgres",), ("debian13",)),
    "debs/debian13/etcd-server_3.5.16-4_amd64.deb": ("deb", ("etcd",), ("debian13",)),
    "debs/debian13/etcd-client_3.5.16-4_amd64.deb": ("deb", ("etcd",), ("debian13",)),
    "wheels/cp311/psycopg2_binary-2.9.13-cp311-cp311-manylinux2014_x86_64.whl": ("wheel", ("postgres",), ("debian12",)),
    "wheels/cp311/requirements.txt": ("meta", ("postgres",), ("debian12",)),
    "wheels/cp313/psycopg2_binary-2.9.13-cp313-cp313-manylinux2014_x86_64.whl": ("wheel", ("postgres",), ("debian13",)),
    "wheels/cp313/requirements.txt": ("meta", ("postgres",), ("debian13",)),
}


def _ctx(tmp_path: Path, text: str, files: dict = FILES) -> Ctx:
    (tmp_path / "hosts.yml").write_text(text)
    inv = load_inventory(tmp_path / "hosts.yml")
    c = Ctx(inventory=inv, transport=FakeTransport(), state_dir=tmp_path / "state",
            bundle_dir=tmp_path / "bundle", options=Options())
    c.local = c.transport
    c.ledger = Ledger(c.state_dir / "test.db", redact=c.redact)
    root = c.bundle_dir
    entries = []
    for rel, (kind, roles, oses) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        entries.append(make_entry(root, rel, kind=kind, version="1", source="test", roles=roles, os=oses,
                                  name=rel.rsplit("/", 1)[-1].split("_")[0]))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12+debian13"}, created="now")
    _manifest.cache_clear()
    return c


@pytest.fixture(autouse=True)
def _fresh_manifest_cache():
    yield
    _manifest.cache_clear()


def _cmds(actions) -> list[str]:
    return [a.cmd for a in actions if isinstance(a, Run)]


def test_targets_are_the_inventorys_distributions_and_roles(tmp_path):
    from runbook.bundle.tasks import _inventory_cluster
    from runbook.inventory.settings import load_settings

    (tmp_path / "hosts.yml").write_text(MIXED)
    s = load_settings({"inventory": str(tmp_path / "hosts.yml")}, root=tmp_path, files=[], environ={})
    cl = _inventory_cluster(s, None)
    assert cl["targets"] == {"debian13": ("etcd",), "debian12": ("backup", "balancer", "etcd", "postgres", "restore")}
    assert targets_of(BuildOptions(bundle_dir=tmp_path, targets=cl["targets"])) == cl["targets"]
    assert targets_of(BuildOptions(bundle_dir=tmp_path, os_name="debian13")) == {"debian13": ("etcd", "postgres")}


def test_each_host_gets_its_distributions_files(tmp_path):
    c = _ctx(tmp_path, MIXED)
    m = load_manifest(c.bundle_dir)
    e13, e12 = c.inventory.get("etcd01"), c.inventory.get("etcd02")
    assert [e.path for e in m.files_for(set(e13.roles), e13.os)] == [
        "debs/debian13/etcd-client_3.5.16-4_amd64.deb", "debs/debian13/etcd-server_3.5.16-4_amd64.deb"]
    assert [e.path for e in m.files_for(set(e12.roles), e12.os)] == ["etcd/etcd-v3.5.16-linux-amd64.tar.gz"]
    assert m.requirements("debian13").path == "wheels/cp313/requirements.txt"
    assert m.requirements("debian12").path == "wheels/cp311/requirements.txt"
    push_cmds = [a for a in push.push.actions_fn(c, e13) if type(a).__name__ == "Upload"]
    assert len(push_cmds) == 2 and '= 4 ]' in push.push.check_fn(c, e13)


def test_etcd_on_debian13_from_its_own_packages_without_starting_theirs(tmp_path):
    c = _ctx(tmp_path, MIXED)
    cmds = _cmds(etcd.binaries.actions_fn(c, c.inventory.get("etcd01")))
    dpkg = next(x for x in cmds if "dpkg -i" in x)
    assert "/opt/runbook-bundle/debs/debian13/etcd-server_3.5.16-4_amd64.deb" in dpkg and "*" not in dpkg
    assert "/usr/sbin/policy-rc.d" in dpkg and "exit 101" in dpkg  # the package's service does not start
    assert cmds[-1].endswith("grep -qF 'etcd Version: 3.5.16'")
    assert not any("tar -xzf" in x for x in cmds)
    undo = _cmds(etcd.binaries.undo_fn(c, c.inventory.get("etcd01")))
    assert "dpkg -r etcd-server etcd-client" in undo[0]
    # Debian 12: the release tarball, as before
    assert any("tar -xzf" in x for x in _cmds(etcd.binaries.actions_fn(c, c.inventory.get("etcd02"))))


def test_debian13_postgres_host_installs_17_and_the_cp313_wheelhouse(tmp_path):
    c = _ctx(tmp_path, D13)
    node = c.inventory.get("node01")
    dpkg = next(x for x in _cmds(postgres.packages.actions_fn(c, node)) if "dpkg -i" in x)
    debs = [w for w in dpkg.split() if w.endswith(".deb")]
    assert debs == ["/opt/runbook-bundle/debs/debian13/postgresql-17_17.6_amd64.deb"]
    assert "postgresql-17" in postgres.packages.check_fn(c, node)
    off = _cmds(postgres.default_off.actions_fn(c, node))
    assert "pg_dropcluster --stop 17 main" in off[0] and "postgresql@17-main" in off[1]
    pip = next(x for x in _cmds(patroni.wheels.actions_fn(c, node)) if "pip install" in x)
    assert "--find-links /opt/runbook-bundle/wheels/cp313 " in pip and "cp313/requirements.txt" in pip


def test_a_bundle_lacking_a_hosts_needs_is_refused_naming_it(tmp_path):
    only12 = {k: v for k, v in FILES.items() if "debian13" not in v[2]}
    c = _ctx(tmp_path, MIXED, only12)
    with pytest.raises(BundleError) as e:
        load_manifest(c.bundle_dir).check_for(c.inventory.hosts)
    assert "etcd01 (debian13): the etcd .deb files" in str(e.value) and "inv bundle.build" in str(e.value)
    c = _ctx(tmp_path, D13, only12)
    with pytest.raises(BundleError) as e:
        load_manifest(c.bundle_dir).check_for(c.inventory.hosts)
    msg = str(e.value)
    assert "node01 (debian13): the wheelhouse for Python 3.13" in msg
    assert "node02 (debian13): the PostgreSQL .deb files" in msg
    load_manifest(_ctx(tmp_path, D13).bundle_dir).check_for(c.inventory.hosts)  # complete: no error


def test_wheel_tags_per_target_python():
    w313 = "psycopg2_binary-2.9.13-cp313-cp313-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    w311 = w313.replace("cp313", "cp311")
    assert tag_ok(w313, (3, 13), (2, 41)) and not tag_ok(w313, (3, 11), (2, 36))
    assert tag_ok(w311) and not tag_ok(w311, (3, 13), (2, 41))
    assert tag_ok("psutil-7.2.2-cp36-abi3-manylinux_2_12_x86_64.whl", (3, 13), (2, 41))
    assert not tag_ok("x-1.0-cp313-cp313-manylinux_2_43_x86_64.whl", (3, 13), (2, 41))  # newer glibc than 13's


def test_debs_install_in_apts_order_and_a_pre_depends_gets_another_pass(tmp_path):
    files = {"debs/debian13/e2fsprogs_1.47_amd64.deb": ("deb", ("postgres",), ("debian13",), 2),
             "debs/debian13/libext2fs2t64_1.47_amd64.deb": ("deb", ("postgres",), ("debian13",), 1),
             "wheels/cp313/requirements.txt": ("meta", ("postgres",), ("debian13",), 0)}
    root = tmp_path / "b"
    entries = []
    for rel, (kind, roles, oses, order) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        entries.append(make_entry(root, rel, kind=kind, version="1", source="t", roles=roles, os=oses, order=order))
    write_manifest(root, entries, etcd_version="", target={}, created="now")
    m = load_manifest(root)
    assert [e.path for e in m.debs("debian13")] == ["debs/debian13/libext2fs2t64_1.47_amd64.deb",
                                                    "debs/debian13/e2fsprogs_1.47_amd64.deb"]
    assert [e.order for e in m.debs("debian13")] == [1, 2]
    cmd = postgres.dpkg_install("a.deb b.deb").cmd
    assert "dpkg -i --skip-same-version a.deb b.deb" in cmd and "'pre-dependency problem'" in cmd
    assert "[ $pre -lt 3 ]" in cmd  # bounded


def test_a_bundle_without_an_optional_roles_closure_is_refused_for_its_host(tmp_path):
    """A backup host added to an inventory whose bundle never had the backup closure: refused by name, before
    anything is pushed (not an empty checksum list on the host)."""
    text = MIXED.replace(", os: debian13}", "}") + "  backup01: {address: 192.0.2.31, roles: [backup]}\n"
    c = _ctx(tmp_path, text, {k: v for k, v in FILES.items() if "debian13" not in v[2]})
    with pytest.raises(BundleError, match=r"backup01 \(debian12\): the .deb files of role backup"):
        load_manifest(c.bundle_dir).check_for(c.inventory.hosts)
    with_backup = dict(FILES, **{"debs/debian12/pgbackrest_2.45_amd64.deb": ("deb", ("backup", "postgres"),
                                                                             ("debian12",))})
    c = _ctx(tmp_path, text, {k: v for k, v in with_backup.items() if "debian13" not in v[2]})
    load_manifest(c.bundle_dir).check_for(c.inventory.hosts)
