"""The .deb closure of each role's packages (runbook.inventory.distros) for a bare Debian 12 / 13 host.

Computed against the lab's base tree (debootstrap minbase = what a bare host has): a throwaway
overlay of it (a copy when overlayfs is unavailable) gets this machine's resolv.conf, /proc and
/dev, then ``apt-get update`` and ``apt-get install --download-only``. apt's simulation names the
exact packages; the archives directory is a persistent cache, so a rebuild downloads nothing new.
RHEL 8/9 is only rendered as an UNTESTED command list (``rhel_commands``).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from runbook.bundle.manifest import BundleError
from runbook.bundle.sources import DebianMirrors, PostgresApt
from runbook.inventory.distros import DISTROS

INST_RE = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) (.+?) \[(\S+)\]\)", re.MULTILINE)


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str
    origin: str
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name


def sources_list(mirrors: DebianMirrors, suite: str = "bookworm", release_only: bool = False) -> str:
    """The base tree's sources.list: the release and its updates, and the security archive when known.
    ``release_only``: the release's own suite alone (its last point release, without -updates and
    -security), e.g. for an older bundle to drill `inv cluster.update` from one PostgreSQL minor to the next."""
    lines = [f"deb {mirrors.main} {suite} main"]
    if release_only:
        return lines[0] + "\n"
    lines.append(f"deb {mirrors.main} {suite}-updates main")
    if mirrors.security:
        lines.append(f"deb {mirrors.security} {suite}-security main")
    return "\n".join(lines) + "\n"


def packages(major: int, role: str = "postgres", os_name: str = "debian12") -> list[str]:
    """What a host of ``role`` on ``os_name`` installs from the bundle (runbook.inventory.distros)."""
    return DISTROS[os_name].packages_for([role], major)


def pin_postgres(want: list[str], major: int, pg_version: str) -> list[str]:
    """``pg_version`` pins PostgreSQL's own packages (and libpq5) to one point release, e.g. an older one
    still in the release suite, while everything else comes as usual (to drill `inv cluster.update`)."""
    if not pg_version:
        return want
    pinned = {f"postgresql-{major}", f"postgresql-client-{major}", "libpq5"}
    return [f"{p}={pg_version}" if p in pinned else p for p in want] + \
        [f"{p}={pg_version}" for p in sorted(pinned - set(want))]


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


@contextmanager
def _root_view(base: Path, work: Path, log=print):
    """A writable throwaway view of ``base``: overlayfs, or a copy when overlay mounts fail."""
    tmp = Path(tempfile.mkdtemp(prefix="debs-", dir=work))
    upper, wdir, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, wdir, merged):
        d.mkdir()
    r = _sh(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={base},upperdir={upper},workdir={wdir}", str(merged)])
    overlay = r.returncode == 0
    if not overlay:
        log(f"overlay mount failed ({r.stderr.strip()}); copying the base tree instead")
        merged.rmdir()
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(merged)], check=True)
    mounts: list[Path] = []
    try:
        for src, dst, opts in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"])):
            target = merged / dst
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", *opts, src, str(target)], check=True, capture_output=True)
            mounts.append(target)
        yield merged
    finally:
        for m in [*reversed(mounts), *([merged] if overlay else [])]:
            if _sh(["umount", str(m)]).returncode != 0:
                _sh(["umount", "-l", str(m)])
        shutil.rmtree(tmp, ignore_errors=True)


def _bind(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, capture_output=True)


def _chroot(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    return _sh(["chroot", str(root), *args], env=env)


def parse_simulation(out: str) -> list[tuple[str, str, str, str]]:
    """`apt-get install -s` output -> [(name, version, origin, arch)]."""
    return [(m.group(1), m.group(2), m.group(3), m.group(4)) for m in INST_RE.finditer(out)]


def deb_filename(name: str, version: str, arch: str) -> str:
    """The archive file name apt gives a package (epoch ':' is escaped as %3a)."""
    return f"{name}_{quote(version, safe='+~.-').replace('%3A', '%3a')}_{arch}.deb"


PG_KEYRING = "/etc/apt/keyrings/pg-ha-runbook-postgresql"  # + .asc / .gpg: the extra source's signing key
PG_LIST = "etc/apt/sources.list.d/pg-ha-runbook-postgresql.list"


def _postgres_source(root: Path, pg: PostgresApt, suite: str) -> str:
    """Write the extra PostgreSQL source (its key, its list) into the root; return its sources line."""
    data, ext = pg.key_bytes()
    keyring = root / f"{PG_KEYRING.lstrip('/')}.{ext}"
    keyring.parent.mkdir(parents=True, exist_ok=True)
    keyring.write_bytes(data)
    keyring.chmod(0o644)
    line = pg.line(suite, f"{PG_KEYRING}.{ext}")
    (root / PG_LIST).write_text(line)
    return line


def lists_dir(cache: Path, suite: str, release_only: bool = False, postgres_apt: PostgresApt | None = None) -> Path:
    """apt's lists of one sources list, kept in the cache (apt drops lists its sources no longer name: so one
    directory per sources list, the extra PostgreSQL source's ones apart)."""
    lists = cache / "bundle-debs" / (f"lists-{suite}-release" if release_only else f"lists-{suite}")
    if postgres_apt:
        lists = lists.with_name(lists.name + "-pg-" + hashlib.sha256(postgres_apt.line(suite, "").encode())
                                .hexdigest()[:10])
    return lists


@contextmanager
def distro_root(base: Path, cache: Path, mirrors: DebianMirrors, suite: str, log=print,
                release_only: bool = False, postgres_apt: PostgresApt | None = None):
    """A throwaway overlay of a distribution's bare base tree with apt pointed at ``mirrors`` (updated),
    its archives and lists kept in the cache, this machine's resolver, and the cache bound at the same path
    (so a Python inside it can read and write the wheelhouse). ``postgres_apt``: the extra PostgreSQL source
    (cluster.postgres_apt) too, signed-by its own key only; a ``file:`` one is bound read-only at its path.
    Yields the root; undone on exit."""
    if os.geteuid() != 0:
        raise BundleError("building the .deb closure needs root (mount, chroot); run it as root")
    work = cache / "bundle-debs"
    archives = work / f"archives-{suite}"
    lists = lists_dir(cache, suite, release_only, postgres_apt)
    for d in (archives / "partial", lists / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    with _root_view(base, work, log) as root:
        (root / "etc/apt/sources.list").write_text(sources_list(mirrors, suite, release_only))
        extra = _postgres_source(root, postgres_apt, suite) if postgres_apt else ""
        resolv = root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        shutil.copyfile(Path("/etc/resolv.conf").resolve(), resolv)
        # this machine's TLS trust too (a site's proxy CA): pip inside the root reaches what pip here does
        for ca in {Path(p) for p in (os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"),
                                     "/etc/ssl/certs/ca-certificates.crt") if p and Path(p).is_file()}:
            (root / str(ca).lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / str(ca).lstrip("/")).unlink(missing_ok=True)
            shutil.copyfile(ca.resolve(), root / str(ca).lstrip("/"))
        binds = [(archives, root / "var/cache/apt/archives"), (lists, root / "var/lib/apt/lists"),
                 (cache, root / str(cache).lstrip("/"))]
        local = postgres_apt.local_dir() if postgres_apt else None
        if postgres_apt and local is not None:
            if not local.is_dir():
                raise BundleError(f"{postgres_apt.where}.url: {postgres_apt.url}: {local} is not a directory on "
                                  "this machine; name the mirror's copy (file:/path) or its http(s) URL")
            binds.append((local, root / str(local).lstrip("/")))
        done: list[Path] = []
        try:
            for src, dst in binds:
                _bind(src, dst)
                done.append(dst)
                if src == local:  # the build never writes into the operator's mirror
                    subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True, capture_output=True)
            log(f"apt-get update in the {suite} base tree ({mirrors.main}"
                + ("; release only: no -updates, no -security" if release_only else
                   f", {mirrors.security}" if mirrors.security else "; no security archive known")
                + (f"; PostgreSQL: {extra.split('] ', 1)[1].strip()}" if extra else "") + ")")
            r = _chroot(root, "apt-get", "-q", "update")
            if r.returncode != 0 or (extra and re.search(r"^(W|E): .*(GPG|signature|not signed)", r.stderr, re.M)):
                named = postgres_apt is not None and postgres_apt.url.split(":", 1)[1] in r.stderr
                hint = (f"; is {postgres_apt.where}.key ({postgres_apt.key}) the signing key of "
                        f"{postgres_apt.url}?" if postgres_apt and named else "")
                raise BundleError(f"apt-get update in the {suite} base tree failed: {r.stderr.strip()[-600:]}{hint}")
            yield root
        finally:
            for dst in reversed(done):
                if _sh(["umount", str(dst)]).returncode != 0:
                    _sh(["umount", "-l", str(dst)])


def download(root: Path, want: list[str], suite: str, recommends: bool = True, log=print,
             what: str = "", where: str = "") -> list[Deb]:
    """The closure of ``want`` for a bare host of the root's distribution, downloaded into the cache."""
    rec = [] if recommends else ["--no-install-recommends"]
    r = _chroot(root, "apt-get", "install", "-s", "-y", *rec, *want)
    if r.returncode != 0:
        err = (r.stderr + r.stdout).strip()
        missing = [p for p in want if f"Unable to locate package {p}" in err or f"Package {p} is not available" in err]
        if missing:
            raise BundleError(f"{', '.join(missing)}: not in {where or suite + chr(39) + 's own repository'}; "
                              f"{what or 'choose a package the distribution ships (runbook.inventory.distros)'}")
        raise BundleError(f"apt-get install -s {' '.join(want)} failed: {err[-800:]}")
    plan = parse_simulation(r.stdout)
    if not plan:
        raise BundleError(f"apt's plan for {' '.join(want)} is empty: the {suite} base tree already has them? "
                          "rebuild the base tree (runbook.lab.base)")
    log(f"apt-get install --download-only ({suite}): {len(plan)} packages for {' '.join(want)}")
    r = _chroot(root, "apt-get", "install", "--download-only", "-y", "-q", *rec, *want)
    if r.returncode != 0:
        raise BundleError(f"apt-get --download-only failed: {r.stderr.strip()[-800:]}")
    archives = root / "var/cache/apt/archives"
    debs = []
    for name, version, origin, arch in plan:
        p = archives / deb_filename(name, version, arch)
        if not p.is_file():
            raise BundleError(f"{p}: apt planned {name} {version} but the archive is not there")
        debs.append(Deb(name=name, version=version, arch=arch, origin=origin, path=p))
    return debs


def install_from_cache(root: Path, want: list[str]) -> None:
    """Install ``want`` into the throwaway root from the downloaded archives (python3-venv for the wheels)."""
    r = _chroot(root, "apt-get", "install", "-y", "-q", "--no-download", *want)
    if r.returncode != 0:
        raise BundleError(f"apt-get install {' '.join(want)} in the base tree failed: "
                          f"{(r.stderr or r.stdout).strip()[-600:]}")


def closure(base: Path, major: int, cache: Path, mirrors: DebianMirrors, os_name: str = "debian12",
            recommends: bool = True, log=print) -> list[Deb]:
    """Download the dependency closure of PostgreSQL ``major`` (the postgres role) for a bare ``os_name`` host.

    ``recommends`` (default, as apt does on a host) includes Recommends: the set the lab tested.
    """
    if os_name not in DISTROS:
        raise BundleError(f"os {os_name}: no .deb packages can be built for it; see rhel_commands()")
    d = DISTROS[os_name]
    with distro_root(base, cache, mirrors, d.suite, log) as root:
        return download(root, d.packages_for(["postgres"], major), d.suite, recommends, log,
                        what=major_advice(d.title))


def major_hint(os_name: str = "") -> str:
    return ", ".join(f"{d.name}: {'/'.join(map(str, d.postgres_majors))}" for d in DISTROS.values())


def major_advice(title: str, postgres_apt: PostgresApt | None = None) -> str:
    """What to do when a PostgreSQL package is in none of the build's sources."""
    if postgres_apt:
        return (f"check that {postgres_apt.where} ({postgres_apt.url}, suite "
                f"{postgres_apt.suite}) mirrors this major, or use a major {title} ships ({major_hint()})")
    return (f"use a PostgreSQL major {title} ships ({major_hint()}), or name a mirror of the PostgreSQL "
            "project's apt repository as cluster.postgres_apt: {url: URL, key: KEYFILE} in the inventory")


def rhel_commands(major: int, os_name: str) -> str:
    """UNTESTED: the commands a RHEL 8/9 build machine would run to collect the RPMs (PGDG)."""
    rel = {"rhel8": "8", "rhel9": "9"}.get(os_name)
    if rel is None:
        raise BundleError(f"os {os_name}: no RHEL recipe (rhel8, rhel9)")
    return f"""\
# UNTESTED — rendered by pg-ha-runbook for {os_name}; never run by its CI. Review before use.
# On a RHEL {rel} machine with the same minor release as the hosts and access to PGDG:
# PGDG_REPO_RPM: the pgdg-redhat-repo-latest.noarch.rpm of EL-{rel}-x86_64, from your PGDG mirror
dnf install -y "${{PGDG_REPO_RPM:?set PGDG_REPO_RPM to the PGDG repo rpm URL or file}}"
dnf -qy module disable postgresql
mkdir -p rpms/{os_name}
dnf download --resolve --alldeps --destdir rpms/{os_name} postgresql{major}-server postgresql{major} python3
# Hosts then: dnf install -y --disablerepo='*' rpms/{os_name}/*.rpm
"""
