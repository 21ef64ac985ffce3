"""Debian 12 and Debian 13 from one inventory setting: defaults, per-host overrides, refusals, and the paths
every step takes from runbook.cluster.render.Paths (the one place for what depends on major/distribution)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runbook.cluster.context import Ctx
from runbook.cluster.render import Paths, patroni_context
from runbook.core.testing import FakeTransport
from runbook.inventory import InventoryError, load_inventory
from runbook.inventory import distros as distros_mod
from runbook.inventory.distros import DISTROS, distro

HOSTS = """\
  etcd01: {address: 192.0.2.11, roles: [etcd]%s}
  etcd02: {address: 192.0.2.12, roles: [etcd]}
  etcd03: {address: 192.0.2.13, roles: [etcd]}
  node01: {address: 192.0.2.21, roles: [postgres]}
  node02: {address: 192.0.2.22, roles: [postgres]%s}
"""


def _inv(tmp_path: Path, cluster: str, etcd01: str = "", node02: str = ""):
    p = tmp_path / "hosts.yml"
    p.write_text(f"cluster:\n  name: t\n{cluster}hosts:\n" + HOSTS % (etcd01, node02))
    return load_inventory(p)


SECRETS = {role: {"username": user, "password": f"{role}-Pw_0123456789abcdefghij"[:32]}
           for role, user in (("superuser", "postgres"), ("replication", "replicator"),
                              ("rewind", "rewind_user"), ("admin", "admin"), ("restapi", "patroni"),
                              ("etcd", "patroni"))}


@pytest.mark.parametrize("os_line, major, tag", [("", 15, "cp311"), ("  os: debian12\n", 15, "cp311"),
                                                 ("  os: debian13\n", 17, "cp313")])
def test_major_defaults_to_the_distributions(tmp_path, os_line, major, tag):
    inv = _inv(tmp_path, os_line)
    assert inv.cluster.postgres_major == major
    node = inv.get("node01")
    p = Paths.of(node, inv.cluster.postgres_major)
    assert p.python_tag == tag
    assert p.pg_bin_dir() == f"/usr/lib/postgresql/{major}/bin"
    assert p.pgdata() == f"/data/{major}"
    assert p.default_service() == f"postgresql@{major}-main"
    assert p.default_cluster() == f"{major} main"
    assert p.pg_package() == f"postgresql-{major}"
    assert p.venv_package == "python3-venv"


def test_debian13_patroni_config_uses_postgresql_17_binaries(tmp_path):
    inv = _inv(tmp_path, "  os: debian13\n")
    node = inv.get("node01")
    c = patroni_context(inv, node, SECRETS, Paths.of(node, 17))
    assert c["bin_dir"] == "/usr/lib/postgresql/17/bin"
    assert c["data_dir"] == "/data/17"
    assert c["pg_config"] == "/usr/lib/postgresql/17/bin/pg_config"


def test_major_the_distribution_does_not_ship_is_refused(tmp_path):
    with pytest.raises(InventoryError) as e:
        _inv(tmp_path, "  os: debian13\n  postgres_major: 15\n")
    msg = str(e.value)
    assert "hosts.yml:4: cluster.postgres_major: PostgreSQL 15 is not shipped by Debian 13 (debian13)" in msg
    assert "choices: 17 on debian13, or os: debian12 for 15" in msg


def test_host_override_is_resolved_and_etcd_hosts_may_differ(tmp_path):
    inv = _inv(tmp_path, "  os: debian12\n", etcd01=", os: debian13")
    assert inv.get("etcd01").os == "debian13"
    assert inv.get("etcd02").os == "debian12"
    assert inv.os_names() == ["debian13", "debian12"]


def test_mixed_postgres_hosts_refused_unless_same_major(tmp_path, monkeypatch):
    with pytest.raises(InventoryError) as e:
        _inv(tmp_path, "  os: debian12\n", node02=", os: debian13")
    assert "hosts.node02.os: debian13 ships PostgreSQL 17, not cluster.postgres_major 15" in str(e.value)
    # a site whose Debian 12 also gets 17 (an extra apt source): the same major on both -> accepted
    monkeypatch.setitem(DISTROS, "debian12", replace(DISTROS["debian12"], postgres_majors=(15, 17)))
    inv = _inv(tmp_path, "  os: debian12\n  postgres_major: 17\n", node02=", os: debian13")
    assert [h.os for h in inv.postgres] == ["debian12", "debian13"]


def test_ctx_paths_per_host(tmp_path):
    inv = _inv(tmp_path, "  os: debian12\n", etcd01=", os: debian13")
    ctx = Ctx(inventory=inv, transport=FakeTransport(), state_dir=tmp_path, bundle_dir=tmp_path)
    assert ctx.paths.os == "debian12"
    assert ctx.paths_for(inv.get("node01")) is ctx.paths
    p13 = ctx.paths_for(inv.get("etcd01"))
    assert (p13.os, p13.python_tag, p13.pg_bin_dir()) == ("debian13", "cp313", "/usr/lib/postgresql/15/bin")


def test_package_mapping_per_role():
    d12, d13 = distro("debian12"), distro("debian13")
    assert d12.packages_for(["postgres"], 15) == ["postgresql-15", "postgresql-client-15", "python3-venv",
                                                  "pgbouncer", "pgbackrest"]
    assert d12.packages_for(["backup"], 15) == ["pgbackrest"]
    assert d12.packages_for(["balancer"], 15) == d13.packages_for(["balancer"], 17) == ["haproxy", "keepalived"]
    assert d12.packages_for(["etcd"], 15) == []  # Debian 12: the etcd tarball, no packages
    assert d13.packages_for(["etcd", "postgres"], 17) == ["etcd-server", "etcd-client", "postgresql-17",
                                                         "postgresql-client-17", "python3-venv", "pgbouncer",
                                                         "pgbackrest"]
    assert (d12.suite, d13.suite, d12.etcd_source, d13.etcd_source) == ("bookworm", "trixie", "tarball", "deb")
    with pytest.raises(ValueError, match="not a supported OS; use one of debian12, debian13"):
        distros_mod.distro("debian11")


def test_lab_base_tree_per_distribution(tmp_path):
    from runbook.lab.base import RECIPE, base_tree_path, recipe

    assert recipe() == RECIPE and recipe("trixie").endswith(" trixie")
    b12, b13 = base_tree_path(tmp_path, distro("debian12").suite), base_tree_path(tmp_path, distro("debian13").suite)
    assert b12.name.startswith("base-bookworm-") and b13.name.startswith("base-trixie-") and b12 != b13
    # a tree built earlier (its .done names the recipe and a mirror) is found whatever its name
    (tmp_path / "base-trixie-old").mkdir()
    (tmp_path / "base-trixie-old.done").write_text(f"{recipe('trixie')} http://mirror.invalid/debian\n")
    assert base_tree_path(tmp_path, "trixie") == tmp_path / "base-trixie-old"
    assert base_tree_path(tmp_path, "bookworm") == b12
