"""The etcd release tarball: from a URL (+ sha256), from a file the operator has, or built from Debian.

The GitHub release site is unreachable from the build machine, so ``build_from_debian`` repacks
Debian 13 (trixie) etcd-server/etcd-client 3.5.x binaries (static Go, need only libc; run on
Debian 12) into the release layout ``etcd-vX.Y.Z-linux-amd64/{etcd,etcdctl,etcdutl,README}``.
The result is deterministic (sorted members, package mtimes, uid/gid 0, gzip mtime 0).
"""
from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from runbook.bundle.manifest import BundleError, sha256_file

TARBALL_RE = re.compile(r"^etcd-v(\d+\.\d+\.\d+)-linux-amd64\.tar\.gz$")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("etcd-server", "etcd-client")
BINARIES = ("etcd", "etcdctl", "etcdutl")


@dataclass(frozen=True)
class EtcdTarball:
    path: Path
    version: str
    sha256: str
    source: str


def tarball_name(version: str) -> str:
    return f"etcd-v{version}-linux-amd64.tar.gz"


def version_of(path: Path) -> str:
    m = TARBALL_RE.match(path.name)
    if not m:
        raise BundleError(f"{path}: not an etcd release tarball name "
                          "(expected etcd-vX.Y.Z-linux-amd64.tar.gz)")
    return m.group(1)


def check_layout(path: Path, version: str) -> None:
    """The tarball must hold etcd-vVER-linux-amd64/etcd and etcdctl (what the install step unpacks)."""
    top = f"etcd-v{version}-linux-amd64"
    try:
        with tarfile.open(path, "r:gz") as tf:
            names = set(tf.getnames())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable .tar.gz ({exc}); fetch it again") from exc
    missing = [b for b in ("etcd", "etcdctl") if f"{top}/{b}" not in names]
    if missing:
        raise BundleError(f"{path}: no {', '.join(top + '/' + b for b in missing)} inside; "
                          "not an etcd release tarball")


def from_file(path: Path, expected_sha256: str | None = None) -> EtcdTarball:
    """A tarball the operator already has; its sha256 is checked when one is configured."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BundleError(f"--etcd-tarball {path}: no such file")
    version = version_of(path)
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise BundleError(f"{path}: sha256 {digest} does not match the expected sha256 {expected_sha256} "
                          "(--etcd-sha256 / runbook.etcd_sha256); "
                          "the file is corrupt or not the release you configured")
    check_layout(path, version)
    return EtcdTarball(path=path, version=version, sha256=digest, source=f"file:{path}")


def from_url(url: str, sha256: str, cache: Path, log=print) -> EtcdTarball:
    """Download once into the cache (re-used while its sha256 matches)."""
    if not sha256:
        raise BundleError(f"runbook.etcd_url is set ({url}) but no sha256 is "
                          "(--etcd-sha256 / runbook.etcd_sha256); set it from the release's SHA256SUMS")
    name = url.rstrip("/").rsplit("/", 1)[-1]
    dest = cache / "etcd" / name
    version = version_of(dest)
    if not (dest.is_file() and sha256_file(dest) == sha256.lower()):
        dest.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {url}")
        tmp = dest.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BundleError(f"{url}: download failed ({exc}); use --etcd-tarball FILE or "
                              "`inv bundle.etcd-from-debian`") from exc
        got = sha256_file(tmp)
        if got != sha256.lower():
            tmp.unlink()
            raise BundleError(f"{url}: sha256 {got} != the expected sha256 {sha256} "
                              "(--etcd-sha256 / runbook.etcd_sha256); refusing it")
        tmp.replace(dest)
    check_layout(dest, version)
    return EtcdTarball(path=dest, version=version, sha256=sha256.lower(), source=url)


def apt_options(work: Path, mirror: str) -> list[str]:
    """apt options for a private trixie source list (on ``mirror``) that never touches the system's apt state."""
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    src = work / "sources.list"
    src.write_text(f"deb [signed-by={KEYRING}] {mirror} trixie main\n")
    return ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as exc:
        raise BundleError(f"{cmd[0]}: not installed on this build machine "
                          "(apt-get install apt dpkg)") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip()[-800:]
        raise BundleError(f"`{' '.join(cmd[:3])} ...` failed (exit {exc.returncode}): {tail}") from None


def upstream(debver: str) -> str:
    """'3.5.16-4' -> '3.5.16'; '1:3.5.16+dfsg-1' -> '3.5.16'."""
    v = debver.split(":", 1)[-1].rsplit("-", 1)[0]
    m = re.match(r"^(\d+\.\d+\.\d+)", v)
    if not m:
        raise BundleError(f"cannot read an upstream etcd version from Debian version {debver!r}")
    return m.group(1)


def _readme(version: str, debs: dict[str, tuple[str, str]], mirror: str) -> str:
    lines = [f"etcd v{version} linux/amd64, repacked in the upstream release layout by pg-ha-runbook.",
             "The binaries are Debian's builds (static Go; need only libc):", ""]
    for pkg, (ver, sha) in sorted(debs.items()):
        lines.append(f"  {pkg} {ver} (debian trixie main, {urlsplit(mirror).hostname or mirror}) sha256 {sha}")
    return "\n".join(lines) + "\n"


def pack(out: Path, version: str, files: dict[str, Path], readme: str) -> None:
    """Write a deterministic release-layout tar.gz: top/<name> for each file, plus README."""
    top = f"etcd-v{version}-linux-amd64"
    # a temp file of its own (not a fixed .part name): two builds sharing the cache never write one file
    fd, name = tempfile.mkstemp(prefix=out.name + ".", suffix=".part", dir=out.parent)
    tmp = Path(name)
    with os.fdopen(fd, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tf:
        newest = max(int(p.stat().st_mtime) for p in files.values())
        d = tarfile.TarInfo(top)
        d.type, d.mode, d.mtime, d.uname, d.gname = tarfile.DIRTYPE, 0o755, newest, "root", "root"
        tf.addfile(d)
        entries = {**{n: p.read_bytes() for n, p in files.items()}, "README": readme.encode()}
        for name in sorted(entries):
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size, ti.uid, ti.gid, ti.uname, ti.gname = len(entries[name]), 0, 0, "root", "root"
            ti.mode = 0o644 if name == "README" else 0o755
            ti.mtime = int(files[name].stat().st_mtime) if name in files else newest
            tf.addfile(ti, io.BytesIO(entries[name]))
    tmp.replace(out)


def _repack(out: Path, version: str, debs: dict[str, tuple[str, str]], dl: Path, work: Path,
            readme: str) -> None:
    with tempfile.TemporaryDirectory(prefix="etcd-x-", dir=work) as tmpd:
        x = Path(tmpd)
        for pkg, (ver, _) in debs.items():
            _run(["dpkg-deb", "-x", str(dl / f"{pkg}_{ver.split(':', 1)[-1]}_amd64.deb"), str(x)])
        files = {b: x / "usr/bin" / b for b in BINARIES if (x / "usr/bin" / b).is_file()}
        for need in ("etcd", "etcdctl"):
            if need not in files:
                raise BundleError(f"the trixie etcd packages hold no usr/bin/{need}; "
                                  "cannot build the tarball")
        out.parent.mkdir(parents=True, exist_ok=True)
        pack(out, version, files, readme)


def build_from_debian(cache: Path, mirror: str, log=print) -> EtcdTarball:
    """Fetch trixie's etcd-server/etcd-client from ``mirror`` with `apt-get download` and repack them (cached)."""
    work = cache / "etcd-debian"
    work.mkdir(parents=True, exist_ok=True)
    opts = apt_options(work, mirror)
    log("apt-get update (private trixie source list)")
    _run(["apt-get", *opts, "-q", "update"])
    debs: dict[str, tuple[str, str]] = {}
    dl = work / "debs"
    dl.mkdir(exist_ok=True)
    for pkg in PACKAGES:
        ver = _run(["apt-cache", *opts, "show", "--no-all-versions", pkg]).stdout
        m = re.search(r"^Version: (\S+)$", ver, re.MULTILINE)
        if not m:
            raise BundleError(f"{pkg}: not found in trixie main; cannot build the etcd tarball from Debian")
        sha = re.search(r"^SHA256: (\S+)$", ver, re.MULTILINE)
        debs[pkg] = (m.group(1), sha.group(1) if sha else "")
    versions = {upstream(v) for v, _ in debs.values()}
    if len(versions) != 1:
        raise BundleError(f"trixie's etcd-server and etcd-client differ ({debs}); try again later")
    version = versions.pop()
    if not version.startswith("3.5."):
        raise BundleError(f"trixie packages etcd {version}, not 3.5.x; use --etcd-tarball with a 3.5 release")
    out = cache / "etcd" / tarball_name(version)
    for pkg, (ver, want) in debs.items():
        deb = dl / f"{pkg}_{ver.split(':', 1)[-1]}_amd64.deb"
        if not deb.is_file() or (want and sha256_file(deb) != want):
            deb.unlink(missing_ok=True)
            log(f"apt-get download {pkg}={ver}")
            _run(["apt-get", *opts, "-q", "download", f"{pkg}={ver}"], cwd=dl)  # apt checks the hash
        debs[pkg] = (ver, sha256_file(deb))
    readme = _readme(version, debs, mirror)
    stamp = out.with_name(out.name + ".from")
    if out.is_file() and stamp.is_file() and stamp.read_text() == readme:
        log(f"{out.name}: cached (same Debian packages)")
    else:
        _repack(out, version, debs, dl, work, readme)
        stamp.write_text(readme)
    digest = sha256_file(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    source = "debian trixie: " + ", ".join(f"{p} {v}" for p, (v, _) in sorted(debs.items())) + " (repacked)"
    return EtcdTarball(path=out, version=version, sha256=digest, source=source)
