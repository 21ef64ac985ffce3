"""Assemble the air-gapped bundle: per distribution .deb closure + wheelhouse (+ etcd tarball) + manifest.json.

Everything is staged in ``<bundle>/.staging`` (inside the bundle directory, so the same
git-ignore rule covers it) and swapped in at the end, manifest.json last: an interrupted build
never leaves a half-written bundle behind a manifest. Downloads live in the cache
(``$RUNBOOK_CACHE``, default /var/cache/pg-ha-runbook) so a rebuild is fast.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from runbook.bundle import debs as debs_mod
from runbook.bundle import etcd as etcd_mod
from runbook.bundle import sources
from runbook.bundle import wheels as wheels_mod
from runbook.bundle.manifest import (
    MANIFEST,
    BundleError,
    Entry,
    Manifest,
    load_manifest,
    make_entry,
    verify_bundle,
    write_manifest,
)

from runbook.inventory.distros import DISTROS, Distro

DEFAULT_CACHE = Path(os.environ.get("RUNBOOK_CACHE", "/var/cache/pg-ha-runbook"))


@dataclass
class BuildOptions:
    bundle_dir: Path
    pg_major: int = 15
    os_name: str = "debian12"
    etcd_version: str = "3.5.16"  # what the inventory expects; a different tarball is a warning
    etcd_url: str = ""
    etcd_sha256: str = ""
    etcd_tarball: str = ""
    cache: Path = DEFAULT_CACHE
    wheel_python: str = "/usr/bin/python3"
    requirements: tuple[str, ...] = wheels_mod.DEFAULT_REQUIREMENTS
    index_url: str = ""  # runbook.pip_index; empty: pip's configuration, else pip's own default
    debian_mirror: str = ""  # runbook.debian_mirror; empty: this machine's apt sources
    debian_security_mirror: str = ""  # runbook.debian_security_mirror; empty: this machine's apt sources
    check_wheels: bool = True
    recommends: bool = True
    # os -> roles of the inventory's hosts: what the bundle is built for (empty: every role on os_name)
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    release_only: bool = False  # packages from the release's own suite only (no -updates, no -security)
    pg_version: str = ""  # pin postgresql-N, postgresql-client-N and libpq5 to this Debian version
    postgres_apt: sources.PostgresApt | None = None  # cluster.postgres_apt: an extra PostgreSQL source


@dataclass
class BuildResult:
    manifest: Manifest
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    patroni_version: str = ""


class Reporter:
    """Progress hooks; the invoke task renders them with Rich, the default prints."""

    def log(self, msg: str) -> None:
        print(msg)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.log(f"== {name}")
        yield


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def etcd_tarball(opts: BuildOptions, log: Callable[[str], None]) -> tuple[etcd_mod.EtcdTarball, str]:
    """Pick the etcd source: --etcd-tarball (with its sha256), then runbook.etcd_url, else build it from Debian."""
    if opts.etcd_tarball:
        _require_sha256(opts)
        return etcd_mod.from_file(Path(opts.etcd_tarball), opts.etcd_sha256), "operator's file"
    if opts.etcd_url:
        return etcd_mod.from_url(opts.etcd_url, opts.etcd_sha256, opts.cache, log), "configured URL"
    log("no runbook.etcd_url / --etcd-tarball configured: building the etcd tarball from "
        "Debian trixie's etcd-server/etcd-client (inv bundle.etcd-from-debian)")
    mirror = _mirrors(opts).main
    return etcd_mod.build_from_debian(opts.cache, mirror, log), f"built from Debian trixie packages ({mirror})"


def _require_sha256(opts: BuildOptions) -> None:
    if opts.etcd_tarball and not opts.etcd_sha256:
        raise BundleError(f"--etcd-tarball {opts.etcd_tarball}: no sha256 to check it against; pass "
                          "--etcd-sha256 (from the release's SHA256SUMS) or set runbook.etcd_sha256 — a "
                          "tarball of unknown origin is not put in the bundle")


def _mirrors(opts: BuildOptions) -> sources.DebianMirrors:
    return sources.resolve_mirrors(opts.debian_mirror, opts.debian_security_mirror)


def _base_build_running(tmp: Path) -> bool:
    """Is some process (another task, the lab) building the base tree into ``tmp`` right now?"""
    needle = str(tmp).encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def base_tree(cache: Path, log: Callable[[str], None], suite: str = "bookworm", wait_s: float = 900) -> Path:
    """The lab's cached base tree of ``suite``; waits for a build already running instead of starting a second."""
    from runbook.lab.base import base_tree_path, ensure_base_tree

    root = base_tree_path(cache, suite)
    tmp = root.with_name(root.name + ".tmp")
    deadline = time.monotonic() + wait_s
    if _base_build_running(tmp):
        log(f"waiting for the base tree build already running ({tmp})")
    while _base_build_running(tmp):
        if time.monotonic() > deadline:
            raise BundleError(f"{tmp}: a base tree build has been running for over {wait_s:.0f} s; "
                              "wait for it (see /tmp/base.log) and run the bundle build again")
        time.sleep(2)
    return ensure_base_tree(cache, log=log, suite=suite)


STAGE, OLD = ".staging", ".old"  # inside the bundle dir, so whatever ignores the bundle ignores them


def _prepare(dest: Path) -> Path:
    """Check ``dest`` is a bundle (or absent/empty), clear leftovers, return a fresh staging dir in it."""
    if dest.exists():
        if not dest.is_dir():
            raise BundleError(f"{dest}: exists and is not a directory; move it away or choose another "
                              "runbook.bundle_dir")
        mine = {STAGE, OLD, MANIFEST}
        if any(p.name not in mine for p in dest.iterdir()) and not (dest / MANIFEST).exists():
            raise BundleError(f"{dest}: exists and is not a bundle (no {MANIFEST}); refusing to replace it "
                              "— move it away or choose another runbook.bundle_dir")
    for leftover in (STAGE, OLD):
        shutil.rmtree(dest / leftover, ignore_errors=True)
    stage = dest / STAGE
    stage.mkdir(parents=True)
    return stage


def _swap_in(stage: Path, dest: Path) -> None:
    """Replace dest's content with stage's: old manifest out first, new manifest in last.

    A crash in between leaves a directory without manifest.json, which verify reports as such.
    """
    old = dest / OLD
    old.mkdir()
    if (dest / MANIFEST).exists():
        (dest / MANIFEST).rename(old / MANIFEST)
    for p in dest.iterdir():
        if p.name not in (STAGE, OLD):
            p.rename(old / p.name)
    for p in stage.iterdir():
        if p.name != MANIFEST:
            p.rename(dest / p.name)
    (stage / MANIFEST).rename(dest / MANIFEST)
    shutil.rmtree(old, ignore_errors=True)
    stage.rmdir()


def targets_of(opts: BuildOptions) -> dict[str, tuple[str, ...]]:
    """os -> roles the bundle is for: the inventory's hosts (opts.targets), else every role on opts.os_name."""
    return dict(opts.targets) if opts.targets else {opts.os_name: ("etcd", "postgres")}


def build_bundle(opts: BuildOptions, rep: Reporter | None = None) -> BuildResult:
    """Build the whole bundle into opts.bundle_dir; return its verified manifest and timings.

    Per distribution the inventory's hosts run: the .deb closure of each role's packages against that
    distribution's bare base tree, and (PostgreSQL hosts) a wheelhouse for its Python; the etcd release
    tarball only when a distribution whose etcd comes as a tarball (Debian 12) has etcd hosts."""
    rep = rep or Reporter()
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    notes: list[str] = []
    dest = Path(opts.bundle_dir).resolve()
    _require_sha256(opts)  # before anything is written
    targets = targets_of(opts)
    unknown = [o for o in targets if o not in DISTROS]
    if unknown and (len(targets) > 1 or unknown != [opts.os_name] or opts.os_name not in ("rhel8", "rhel9")):
        raise BundleError(f"os {', '.join(unknown)}: no packages can be built for it; use "
                          f"{' or '.join(DISTROS)}")
    opts.cache.mkdir(parents=True, exist_ok=True)
    stage = _prepare(dest)
    entries: list[Entry] = []
    patroni = ""
    etcd_version = ""
    try:
        tar_os = tuple(o for o, roles in targets.items()
                       if "etcd" in roles and (o not in DISTROS or DISTROS[o].etcd_source == "tarball"))
        if tar_os:
            t = time.monotonic()
            with rep.phase("etcd release tarball"):
                tb, how = etcd_tarball(opts, rep.log)
                etcd_version = tb.version
                rel = f"etcd/{tb.path.name}"
                _copy(tb.path, stage / rel)
                entries.append(make_entry(stage, rel, kind="etcd", version=tb.version, source=tb.source,
                                          roles=("etcd",), name="etcd", os=tar_os))
                notes.append(f"etcd {tb.version} ({', '.join(tar_os)}): {how}; sha256 {tb.sha256}")
                _etcd_version_note(opts, tb.version, notes)
            phases["etcd"] = time.monotonic() - t

        if opts.os_name in ("rhel8", "rhel9") and opts.os_name in targets:
            entries.append(_rhel(opts, stage, notes))
        tags: dict[str, tuple[str, ...]] = {}  # wheel tag -> the distributions sharing that wheelhouse
        for o, roles in targets.items():
            if o in DISTROS and "postgres" in roles:
                tags[DISTROS[o].cpython] = (*tags.get(DISTROS[o].cpython, ()), o)
        done_tags: set[str] = set()
        for o, roles in targets.items():
            if o not in DISTROS:
                continue
            d = DISTROS[o]
            t = time.monotonic()
            with rep.phase(f"{d.title}: packages for {', '.join(roles)} (PostgreSQL {opts.pg_major})"
                           + (f" + wheelhouse for Python {d.python[0]}.{d.python[1]}"
                              if d.cpython in tags and d.cpython not in done_tags else "")):
                base = base_tree(opts.cache, rep.log, d.suite)
                mirrors = _mirrors(opts)
                with debs_mod.distro_root(base, opts.cache, mirrors, d.suite, rep.log,
                                          opts.release_only, opts.postgres_apt) as root:
                    debs = _role_debs(root, d, roles, opts, rep.log)
                    for order, (rel_name, (deb, droles)) in enumerate(debs.items(), 1):
                        rel = f"debs/{o}/{rel_name}"
                        _copy(deb.path, stage / rel)
                        entries.append(make_entry(stage, rel, kind="deb", version=deb.version, name=deb.name,
                                                  source=f"{_origin_url(deb, d, mirrors, opts)} {deb.origin}: "
                                                         f"{deb.name}={deb.version}",
                                                  roles=droles, os=(o,), order=order))
                        if deb.name == "etcd-server":
                            etcd_version = etcd_version or etcd_mod.upstream(deb.version)
                            _etcd_version_note(opts, etcd_mod.upstream(deb.version), notes)
                    notes.append(f"{o}: {len(debs)} .deb from {mirrors.main} ({d.suite}), " + (
                        "release suite only (--release-only)" if opts.release_only else
                        f"security {mirrors.security or '(none known)'}"))
                    if d.cpython in tags and d.cpython not in done_tags:
                        done_tags.add(d.cpython)
                        wl_entries, patroni = _wheelhouse(opts, d, root, stage, tags[d.cpython], rep.log, notes)
                        entries += wl_entries
            phases[o] = time.monotonic() - t

        with rep.phase("manifest + verify"):
            target = {"os": opts.os_name if len(targets) == 1 else "+".join(targets), "arch": "amd64",
                      "postgres_major": opts.pg_major, "targets": {o: list(r) for o, r in targets.items()},
                      "python": sorted(tags), "requirements": list(opts.requirements)}
            created = datetime.now(UTC).isoformat(timespec="seconds")
            write_manifest(stage, entries, etcd_version=etcd_version, target=target, created=created)
            verify_bundle(stage)
            _swap_in(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = load_manifest(dest)
    return BuildResult(manifest=manifest, seconds=time.monotonic() - t0, phases=phases, notes=notes,
                       patroni_version=patroni)


def _etcd_version_note(opts: BuildOptions, version: str, notes: list[str]) -> None:
    if opts.etcd_version and version != opts.etcd_version:
        notes.append(f"WARNING: the inventory says etcd_version {opts.etcd_version} but the bundle's etcd "
                     f"is {version}; set cluster.etcd_version: {version} in hosts.yml")


def _role_debs(root: Path, d: Distro, roles: tuple[str, ...], opts: BuildOptions,
               log: Callable[[str], None]) -> dict[str, tuple[debs_mod.Deb, tuple[str, ...]]]:
    """file name -> (the .deb, the roles whose closure holds it): one closure per role, merged, in apt's
    install order (a package's Pre-Depends before it: dpkg -i installs in the order it is given)."""
    out: dict[str, tuple[debs_mod.Deb, tuple[str, ...]]] = {}
    for role in sorted(roles):
        want = debs_mod.pin_postgres(d.packages_for([role], opts.pg_major), opts.pg_major, opts.pg_version) \
            if role == "postgres" else d.packages_for([role], opts.pg_major)
        if not want:
            continue
        what = debs_mod.major_advice(d.title, opts.postgres_apt)
        pg = opts.postgres_apt
        where = (f"{d.suite}'s own repository nor in {pg.where} ({pg.url} {pg.suite_for(d.suite)})" if pg else "")
        for deb in debs_mod.download(root, want, d.suite, opts.recommends, log, what=what, where=where):
            prev = out.get(deb.filename)
            out[deb.filename] = (deb, tuple(sorted({*(prev[1] if prev else ()), role})))
    return out


def _origin_url(deb: debs_mod.Deb, d: Distro, mirrors: sources.DebianMirrors, opts: BuildOptions) -> str:
    """The URL a .deb came from: the extra PostgreSQL source when apt names its suite, else the Debian mirror."""
    pg = opts.postgres_apt
    if pg and pg.gave(deb.origin, d.suite):
        return pg.url
    return mirrors.main


def _wheelhouse(opts: BuildOptions, d: Distro, root: Path, stage: Path, oses: tuple[str, ...],
                log: Callable[[str], None], notes: list[str]) -> tuple[list[Entry], str]:
    """The wheelhouse for the distribution's Python: built with runbook.wheel_python when that is the same
    minor version, else with the distribution's own python3 inside its base tree (with python3-venv from
    the closure just downloaded); checked by an offline install into a venv of that Python."""
    tag = d.cpython
    python: wheels_mod.Python = opts.wheel_python
    local = _same_python(opts.wheel_python, d.python)
    if not local:
        debs_mod.install_from_cache(root, ["python3-venv"])
        venv = opts.cache / f"pyenv-{d.suite}"
        if not (venv / "bin/python").exists():
            r = debs_mod._chroot(root, "python3", "-m", "venv", str(venv))
            if r.returncode != 0:
                raise BundleError(f"python3 -m venv in the {d.suite} base tree failed: {r.stderr.strip()[-400:]}")
        python = ["chroot", str(root), str(venv / "bin/python")]
        log(f"wheels for {tag}: {d.title}'s own python3 in its base tree ({venv})")
    index = sources.pip_index(opts.wheel_python, opts.index_url)
    notes.append(f"Python index: {index or 'pip default (none configured)'}")
    wl = wheels_mod.build(opts.cache, opts.requirements, python, index, log, target=d.python, glibc=d.glibc)
    entries = []
    for w in wl:
        rel = f"wheels/{tag}/{w.path.name}"
        _copy(w.path, stage / rel)
        how = "built from its sdist" if w.built_from_sdist else "wheel"
        entries.append(make_entry(stage, rel, kind="wheel", version=w.version, name=w.name, os=oses,
                                  source=f"{index or 'pip default index'}: {w.name}=={w.version} ({how})",
                                  roles=("postgres",)))
    req = f"wheels/{tag}/requirements.txt"
    (stage / req).write_text(wheels_mod.requirements_txt(wl, opts.requirements))
    entries.append(make_entry(stage, req, kind="meta", version="", roles=("postgres",), os=oses,
                              source="generated: every wheel pinned with --hash"))
    if wl:  # what pip resolved, with the hash of each downloaded file: the wheels were built from it
        res = f"wheels/{tag}/{wheels_mod.RESOLVED}"
        _copy(wl[0].path.parent / wheels_mod.RESOLVED, stage / res)
        entries.append(make_entry(stage, res, kind="meta", version="", roles=(), os=oses,
                                  source="generated: every dependency pip resolved, with its sha256"))
    patroni = ""
    if opts.check_wheels and wl:
        stamp = wl[0].path.parent / "offline-check.ok"
        # checked in the cache's wheelhouse (the same files, hashed in requirements.txt): a chrooted Python
        # sees the cache at the same path, not the staging directory
        house = wl[0].path.parent
        (house / "requirements.txt").write_text((stage / req).read_text())
        patroni = wheels_mod.check_offline(house, house / "requirements.txt", python, log, stamp,
                                           tmp_dir=None if local else opts.cache)  # the venv: in the cache
        notes.append(f"offline install check ({tag}) passed: {patroni}")
    return entries, patroni


def _same_python(python: str, want: tuple[int, int]) -> bool:
    import subprocess

    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return (int(out[0]), int(out[1])) == want


def _rhel(opts: BuildOptions, stage: Path, notes: list[str]) -> Entry:
    rel = f"rpms/{opts.os_name}/COMMANDS-UNTESTED.sh"
    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
    (stage / rel).write_text(debs_mod.rhel_commands(opts.pg_major, opts.os_name))
    notes.append(f"WARNING: {opts.os_name}: no packages collected; {rel} is an UNTESTED recipe; "
                 "no wheels are built for RHEL's python3")
    return make_entry(stage, rel, kind="meta", version="", source="rendered (untested)", roles=("postgres",))
