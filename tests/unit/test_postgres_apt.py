"""cluster.postgres_apt: an extra apt source for PostgreSQL (a mirror of the PostgreSQL project's apt repository).

What is REAL here: the inventory validation; apt itself, in a throwaway overlay of the cached Debian 12 base
tree (as bundle.build runs it), updating from a `file:` repository that this test builds and signs with a key
made by gpg in a temporary directory, verifying that signature, and resolving `postgresql-16` from it next to
Debian's own archive (this machine's Debian mirror, as every bundle build uses): the closure mixes both.
What is FAKE: the package contents. postgresql-16 and postgresql-client-16 here are two tiny packages made
with dpkg-deb (a shell script for a binary), versioned 16.99-1.fake; postgresql-16 depends on Debian's real
`ssl-cert`, which only the Debian mirror has. A second key that did not sign the repository is refused.

Needs root (mount, chroot) and the cached base tree, like bundle.build; about 10-20 s.
"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest

from runbook.bundle import debs
from runbook.bundle.build import DEFAULT_CACHE, BuildOptions, _origin_url, _role_debs, base_tree
from runbook.bundle.manifest import BundleError
from runbook.bundle.sources import PostgresApt, resolve_mirrors
from runbook.errors import InventoryError
from runbook.inventory import load_inventory
from runbook.inventory.distros import DISTROS

D12 = """\
cluster: {{name: t, os: debian12, postgres_major: 16{extra}}}
hosts:
  etcd01: {{address: 192.0.2.11, roles: [etcd]}}
  etcd02: {{address: 192.0.2.12, roles: [etcd]}}
  etcd03: {{address: 192.0.2.13, roles: [etcd]}}
  node01: {{address: 192.0.2.21, roles: [postgres]}}
  node02: {{address: 192.0.2.22, roles: [postgres], os: {node02_os}}}
"""
SOURCE = ", postgres_apt: {url: 'file:/srv/pgdg', key: keys/pgdg.asc}"
FAKE_VERSION = "16.99-1.fake"


def _inventory(tmp_path: Path, extra: str = "", node02_os: str = "debian12"):
    (tmp_path / "hosts.yml").write_text(D12.format(extra=extra, node02_os=node02_os))
    return load_inventory(tmp_path / "hosts.yml")


# -- the inventory: a major the distribution does not ship -------------------------------------------------

def test_a_major_debian_does_not_ship_without_a_source_names_the_choices_and_the_source(tmp_path):
    with pytest.raises(InventoryError) as e:
        _inventory(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'hosts.yml'}:1: cluster.postgres_major" in msg
    assert "PostgreSQL 16 is not shipped by Debian 12" in msg and "choices: 15 on debian12" in msg
    assert "cluster.postgres_apt: {url: URL, key: KEYFILE}" in msg


def test_with_a_postgres_source_major_16_is_accepted_and_mixed_distributions_are_left_to_the_source(tmp_path):
    inv = _inventory(tmp_path, SOURCE, node02_os="debian13")
    assert inv.cluster.postgres_major == 16
    assert inv.cluster.postgres_apt.url == "file:/srv/pgdg"
    assert inv.cluster.postgres_apt.suite == "{codename}-pgdg" and inv.cluster.postgres_apt.component == "main"


@pytest.mark.parametrize("extra, where, words", [
    (", postgres_apt: {url: 'ftp://x/y', key: k.asc}", "cluster.postgres_apt.url", "not an apt repository URL"),
    (", postgres_apt: {url: 'file:/srv/pgdg', key: ''}", "cluster.postgres_apt.key", "signing key file"),
    (", postgres_apt: {url: 'file:/srv/pgdg'}", "cluster.postgres_apt.key", ""),
    (", postgres_apt: {url: 'file:/srv/pgdg', key: k.asc, suite: 'a b'}", "cluster.postgres_apt.suite",
     "not an apt suite/component name"),
    (", postgres_apt: {url: 'file:/srv/pgdg', key: k.asc, mirror: x}", "cluster.postgres_apt.mirror", ""),
], ids=["url scheme", "empty key", "no key", "suite", "unknown key"])
def test_a_bad_postgres_source_is_one_error_naming_its_yaml_path(tmp_path, extra, where, words):
    with pytest.raises(InventoryError) as e:
        _inventory(tmp_path, extra)
    assert f"hosts.yml:1: {where}" in str(e.value) and words in str(e.value)


def test_bundle_build_resolves_the_key_against_the_inventory_file(tmp_path):
    from runbook.bundle.tasks import _inventory_cluster
    from runbook.inventory.settings import DEFAULTS, load_settings

    _inventory(tmp_path, SOURCE)
    s = load_settings({**DEFAULTS, "inventory": str(tmp_path / "hosts.yml")}, root=tmp_path, files=[], environ={})
    pg = _inventory_cluster(s, None)["postgres_apt"]
    assert pg.key == tmp_path / "keys/pgdg.asc" and pg.url == "file:/srv/pgdg"
    assert pg.where == f"{tmp_path / 'hosts.yml'}: cluster.postgres_apt"
    # apt's copy: method for a file: mirror (the .debs land in the archives, like downloaded ones)
    assert pg.line("bookworm", "/k.asc") == "deb [signed-by=/k.asc] copy:/srv/pgdg bookworm-pgdg main\n"
    with pytest.raises(BundleError, match=r"cluster.postgres_apt.key: .*keys/pgdg.asc: No such file"):
        pg.key_bytes()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/pgdg.asc").write_text("not a key\n")
    with pytest.raises(BundleError, match="is not an OpenPGP public key"):
        pg.key_bytes()


# -- apt, for real, against a signed local repository -------------------------------------------------------

def _fake_deb(out: Path, name: str, depends: str) -> None:
    """A tiny package: the contents are fake (a shell script where postgres would be)."""
    root = out / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    binary = root / "usr/lib/postgresql/16/bin" / ("postgres" if name == "postgresql-16" else "psql")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'fake PostgreSQL 16 (pg-ha-runbook test package)'\n")
    binary.chmod(0o755)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {FAKE_VERSION}\nArchitecture: amd64\nMaintainer: test <t@example.invalid>\n"
        f"Depends: {depends}\nDescription: fake {name} for pg-ha-runbook's tests\n")
    pool = out / "pool/main"
    pool.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root),
                    str(pool / f"{name}_{FAKE_VERSION}_amd64.deb")], check=True, capture_output=True)
    shutil.rmtree(root)


def _gpg(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], check=True, capture_output=True, **kw)


def _key(home: Path, uid: str) -> bytes:
    home.mkdir(mode=0o700)
    _gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
    return _gpg(home, "--armor", "--export", uid).stdout


def _signed_repo(repo: Path, home: Path, suite: str = "bookworm-pgdg") -> bytes:
    """A real apt repository layout (pool/, dists/<suite>/InRelease) signed with a new key; returns that key."""
    _fake_deb(repo, "postgresql-client-16", "libc6")
    _fake_deb(repo, "postgresql-16", f"postgresql-client-16 (= {FAKE_VERSION}), ssl-cert")
    binary = repo / f"dists/{suite}/main/binary-amd64"
    binary.mkdir(parents=True)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=repo, check=True,
                              capture_output=True).stdout
    (binary / "Packages").write_bytes(packages)
    (binary / "Packages.gz").write_bytes(gzip.compress(packages))
    sums = "".join(f" {hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_size} "
                   f"{p.relative_to(repo / 'dists' / suite)}\n" for p in sorted(binary.iterdir()))
    (repo / f"dists/{suite}/Release").write_text(
        f"Origin: pg-ha-runbook test\nLabel: fake PostgreSQL\nSuite: {suite}\nCodename: {suite}\n"
        f"Date: {format_datetime(datetime.now(UTC), usegmt=True)}\nArchitectures: amd64\nComponents: main\n"
        f"SHA256:\n{sums}")
    key = _key(home, "pg-ha-runbook test repository <repo@example.invalid>")
    _gpg(home, "--clearsign", "-o", str(repo / f"dists/{suite}/InRelease"), str(repo / f"dists/{suite}/Release"))
    return key


@pytest.fixture(scope="module")
def signed_repo():
    """(repo dir, its key file, a key that did not sign it). gpg's homes are short paths (agent sockets)."""
    tmp = Path(tempfile.mkdtemp(prefix="pgapt-", dir="/tmp"))
    tmp.chmod(0o755)  # apt reads file: sources as its _apt user
    try:
        (tmp / "repo").mkdir()
        (tmp / "key.asc").write_bytes(_signed_repo(tmp / "repo", tmp / "g1"))
        (tmp / "other.asc").write_bytes(_key(tmp / "g2", "someone else <else@example.invalid>"))
        yield tmp / "repo", tmp / "key.asc", tmp / "other.asc"
    finally:
        for home in ("g1", "g2"):
            subprocess.run(["gpgconf", "--homedir", str(tmp / home), "--kill", "gpg-agent"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def build_env(tmp_path_factory):
    """(bookworm base tree, a cache of this test's own, this machine's Debian mirrors); the machine's cached
    bookworm lists are copied in so that apt-get update only revalidates them."""
    cache = tmp_path_factory.mktemp("cache")
    base = base_tree(DEFAULT_CACHE, print, "bookworm")
    return base, cache, resolve_mirrors()


def _seed_lists(cache: Path, pg: PostgresApt | None) -> None:
    src = debs.lists_dir(DEFAULT_CACHE, "bookworm")
    dst = debs.lists_dir(cache, "bookworm", postgres_apt=pg)
    if src.is_dir() and not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "partial"))


def test_apt_resolves_postgresql_16_from_the_signed_local_source_next_to_debian(signed_repo, build_env):
    repo, key, _ = signed_repo
    base, cache, mirrors = build_env
    pg = PostgresApt(url=f"file:{repo}", key=key, where="hosts.yml: cluster.postgres_apt")
    _seed_lists(cache, pg)
    opts = BuildOptions(bundle_dir=cache / "bundle", pg_major=16, os_name="debian12", cache=cache,
                        postgres_apt=pg)
    with debs.distro_root(base, cache, mirrors, "bookworm", postgres_apt=pg) as root:
        got = _role_debs(root, DISTROS["debian12"], ("postgres",), opts, print)
        by_name = {deb.name: deb for deb, _ in got.values()}
        assert all(deb.path.is_file() for deb in by_name.values())  # in the archives, for the bundle to take
    for name in ("postgresql-16", "postgresql-client-16"):  # from the signed local repository
        assert by_name[name].version == FAKE_VERSION and pg.gave(by_name[name].origin, "bookworm"), by_name[name]
        assert _origin_url(by_name[name], DISTROS["debian12"], mirrors, opts) == f"file:{repo}"
    for name in ("ssl-cert", "pgbouncer", "pgbackrest", "python3-venv"):  # from Debian's own archive
        assert name in by_name and not pg.gave(by_name[name].origin, "bookworm"), by_name[name]
        assert _origin_url(by_name[name], DISTROS["debian12"], mirrors, opts) == mirrors.main
    assert "postgresql-15" not in by_name
    assert not (repo / "dists/bookworm-pgdg/main/binary-amd64/Packages.tmp").exists()  # mirror left as it was


def test_a_key_that_did_not_sign_the_source_is_refused_by_apt(signed_repo, build_env):
    repo, _, other = signed_repo
    base, cache, mirrors = build_env
    pg = PostgresApt(url=f"file:{repo}", key=other, where="hosts.yml: cluster.postgres_apt")
    _seed_lists(cache, pg)
    with pytest.raises(BundleError) as e:
        with debs.distro_root(base, cache, mirrors, "bookworm", postgres_apt=pg):
            pass
    assert "apt-get update in the bookworm base tree failed" in str(e.value)
    assert f"is hosts.yml: cluster.postgres_apt.key ({other}) the signing key of file:{repo}?" in str(e.value)


def test_without_the_source_postgresql_16_is_a_clear_error_naming_choices_and_the_source(build_env):
    base, cache, mirrors = build_env
    _seed_lists(cache, None)
    opts = BuildOptions(bundle_dir=cache / "bundle", pg_major=16, os_name="debian12", cache=cache)
    with debs.distro_root(base, cache, mirrors, "bookworm") as root:
        with pytest.raises(BundleError) as e:
            _role_debs(root, DISTROS["debian12"], ("postgres",), opts, print)
    msg = str(e.value)
    assert "postgresql-16" in msg and "not in bookworm's own repository" in msg
    assert "debian12: 15, debian13: 17" in msg and "cluster.postgres_apt: {url: URL, key: KEYFILE}" in msg
