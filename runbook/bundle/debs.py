"""The .deb closure of PostgreSQL (+ client, python3-venv) for a bare Debian 12 host.

Computed against the lab's base tree (debootstrap minbase = what a bare host has): a throwaway
overlay of it (a copy when overlayfs is unavailable) gets this machine's resolv.conf, /proc and
/dev, then ``apt-get update`` and ``apt-get install --download-only``. apt's simulation names the
exact packages; the archives directory is a persistent cache, so a rebuild downloads nothing new.
RHEL 8/9 is only rendered as an UNTESTED command list (``rhel_commands``).
"""
from __future__ import annotations

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
from runbook.bundle.sources import DebianMirrors

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


def sources_list(mirrors: DebianMirrors, suite: str = "bookworm") -> str:
    """The base tree's sources.list: the release and its updates, and the security archive when known."""
    lines = [f"deb {mirrors.main} {suite} main", f"deb {mirrors.main} {suite}-updates main"]
    if mirrors.security:
        lines.append(f"deb {mirrors.security} {suite}-security main")
    return "\n".join(lines) + "\n"


# What the hosts of each role install from the bundle ({major}: cluster.postgres_major). One closure is
# resolved per entry against a bare host; a .deb in several closures is one file with the roles of each.
# pgBackRest must be the same version on the repository and the PostgreSQL hosts: it comes from one archive.
ROLE_PACKAGES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("postgres", "restore"): ("postgresql-{major}", "postgresql-client-{major}", "python3-venv", "pgbackrest"),
    ("backup",): ("pgbackrest",),
}


def packages(major: int, roles: tuple[str, ...] = ("postgres", "restore")) -> list[str]:
    return [p.format(major=major) for p in ROLE_PACKAGES[roles]]


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


def closure(base: Path, major: int, cache: Path, mirrors: DebianMirrors, os_name: str = "debian12",
            recommends: bool = True, log=print) -> list[Deb]:
    """Download the dependency closure of PostgreSQL ``major`` for a bare ``os_name`` host."""
    return closures(base, major, cache, mirrors, os_name, recommends, log)[("postgres", "restore")]


def closures(base: Path, major: int, cache: Path, mirrors: DebianMirrors, os_name: str = "debian12",
             recommends: bool = True, log=print) -> dict[tuple[str, ...], list[Deb]]:
    """Download the dependency closure of each ROLE_PACKAGES entry for a bare ``os_name`` host.

    ``recommends`` (default, as apt does on a host) includes Recommends: the set the lab tested.
    """
    if os_name != "debian12":
        raise BundleError(f"os {os_name}: only debian12 packages can be built here; see rhel_commands()")
    if os.geteuid() != 0:
        raise BundleError("building the .deb closure needs root (mount, chroot); run it as root")
    work = cache / "bundle-debs"
    archives = work / "archives-bookworm"
    lists = work / "lists-bookworm"
    for d in (archives / "partial", lists / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    rec = [] if recommends else ["--no-install-recommends"]
    with _root_view(base, work, log) as root:
        (root / "etc/apt/sources.list").write_text(sources_list(mirrors))
        resolv = root / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        shutil.copyfile(Path("/etc/resolv.conf").resolve(), resolv)
        _bind(archives, root / "var/cache/apt/archives")
        _bind(lists, root / "var/lib/apt/lists")
        try:
            log(f"apt-get update in the base tree ({mirrors.main}"
                + (f", {mirrors.security})" if mirrors.security else "; no security archive known)"))
            r = _chroot(root, "apt-get", "-q", "update")
            if r.returncode != 0:
                raise BundleError(f"apt-get update in the base tree failed: {r.stderr.strip()[-600:]}")
            plans = {}
            for roles in ROLE_PACKAGES:
                want = packages(major, roles)
                r = _chroot(root, "apt-get", "install", "-s", "-y", *rec, *want)
                if r.returncode != 0:
                    err = (r.stderr + r.stdout).strip()
                    if f"Unable to locate package postgresql-{major}" in err or \
                            f"Package postgresql-{major} is not available" in err:
                        raise BundleError(
                            f"postgresql-{major} is not in Debian 12's own repository (it has 15); "
                            f"{major} comes from PGDG, which this build machine cannot "
                            "reach. Use --pg-major 15 (or set cluster.postgres_major: 15 in hosts.yml).")
                    raise BundleError(f"apt-get install -s {' '.join(want)} failed: {err[-800:]}")
                plan = parse_simulation(r.stdout)
                if not plan:
                    raise BundleError("apt's plan is empty: the base tree already has PostgreSQL? "
                                      "rebuild the base tree (runbook.lab.base)")
                log(f"apt-get install --download-only: {len(plan)} packages")
                r = _chroot(root, "apt-get", "install", "--download-only", "-y", "-q",
                            *rec, *want)
                if r.returncode != 0:
                    raise BundleError(f"apt-get --download-only failed: {r.stderr.strip()[-800:]}")
                plans[roles] = plan
        finally:
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                if _sh(["umount", str(root / sub)]).returncode != 0:
                    _sh(["umount", "-l", str(root / sub)])
    out: dict[tuple[str, ...], list[Deb]] = {}
    for roles, plan in plans.items():
        out[roles] = []
        for name, version, origin, arch in plan:
            p = archives / deb_filename(name, version, arch)
            if not p.is_file():
                raise BundleError(f"{p}: apt planned {name} {version} but the archive is not there")
            out[roles].append(Deb(name=name, version=version, arch=arch, origin=origin, path=p))
    return out


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
