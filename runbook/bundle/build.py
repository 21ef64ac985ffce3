"""Assemble the air-gapped bundle: etcd tarball + .deb closure + wheelhouse + manifest.json.

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
    REQUIREMENTS,
    RESOLVED,
    BundleError,
    Entry,
    Manifest,
    load_manifest,
    make_entry,
    verify_bundle,
    write_manifest,
)

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


def base_tree(cache: Path, log: Callable[[str], None], wait_s: float = 900) -> Path:
    """The lab's cached base tree; waits for a build already running instead of starting a second."""
    from runbook.lab.base import base_tree_path, ensure_base_tree

    root = base_tree_path(cache)
    tmp = root.with_name(root.name + ".tmp")
    deadline = time.monotonic() + wait_s
    if _base_build_running(tmp):
        log(f"waiting for the base tree build already running ({tmp})")
    while _base_build_running(tmp):
        if time.monotonic() > deadline:
            raise BundleError(f"{tmp}: a base tree build has been running for over {wait_s:.0f} s; "
                              "wait for it (see /tmp/base.log) and run the bundle build again")
        time.sleep(2)
    return ensure_base_tree(cache, log=log)


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


def build_bundle(opts: BuildOptions, rep: Reporter | None = None) -> BuildResult:
    """Build the whole bundle into opts.bundle_dir; return its verified manifest and timings."""
    rep = rep or Reporter()
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    notes: list[str] = []
    dest = Path(opts.bundle_dir).resolve()
    _require_sha256(opts)  # before anything is written
    opts.cache.mkdir(parents=True, exist_ok=True)
    stage = _prepare(dest)
    entries: list[Entry] = []
    patroni = ""
    try:
        t = time.monotonic()
        with rep.phase("etcd release tarball"):
            tb, how = etcd_tarball(opts, rep.log)
            rel = f"etcd/{tb.path.name}"
            _copy(tb.path, stage / rel)
            entries.append(make_entry(stage, rel, kind="etcd", version=tb.version, source=tb.source,
                                      roles=("etcd",), name="etcd"))
            notes.append(f"etcd {tb.version}: {how}; sha256 {tb.sha256}")
            if opts.etcd_version and tb.version != opts.etcd_version:
                notes.append(f"WARNING: the inventory says etcd_version {opts.etcd_version} but the tarball "
                             f"is {tb.version}; set cluster.etcd_version: {tb.version} in hosts.yml")
        phases["etcd"] = time.monotonic() - t

        t = time.monotonic()
        with rep.phase(f"OS packages ({opts.os_name}, PostgreSQL {opts.pg_major})"):
            if opts.os_name == "debian12":
                base = base_tree(opts.cache, rep.log)
                mirrors = _mirrors(opts)
                roles_of: dict[str, tuple[str, ...]] = {}  # one file per .deb, with the roles of every closure
                found: dict[str, debs_mod.Deb] = {}
                for roles, debs in debs_mod.closures(base, opts.pg_major, opts.cache, mirrors, opts.os_name,
                                                     opts.recommends, rep.log).items():
                    for d in debs:
                        found[d.filename] = d
                        roles_of[d.filename] = tuple(dict.fromkeys(roles_of.get(d.filename, ()) + roles))
                for d in found.values():
                    rel = f"debs/{opts.os_name}/{d.filename}"
                    _copy(d.path, stage / rel)
                    entries.append(make_entry(stage, rel, kind="deb", version=d.version, name=d.name,
                                              source=f"{mirrors.main} {d.origin}: {d.name}={d.version}",
                                              roles=roles_of[d.filename]))
                notes.append(f"Debian mirror {mirrors.main}, security {mirrors.security or '(none known)'}")
            else:
                rel = f"rpms/{opts.os_name}/COMMANDS-UNTESTED.sh"
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                (stage / rel).write_text(debs_mod.rhel_commands(opts.pg_major, opts.os_name))
                entries.append(make_entry(stage, rel, kind="meta", version="", source="rendered (untested)",
                                          roles=("postgres",)))
                notes.append(f"WARNING: {opts.os_name}: no packages collected; {rel} is an UNTESTED recipe; "
                             "the wheels target CPython 3.11 (Debian 12), not RHEL's python3")
        phases["packages"] = time.monotonic() - t

        t = time.monotonic()
        with rep.phase("Python wheelhouse (Patroni + psycopg2-binary)"):
            index = sources.pip_index(opts.wheel_python, opts.index_url)
            notes.append(f"Python index: {index or 'pip default (none configured)'}")
            wl = wheels_mod.build(opts.cache, opts.requirements, opts.wheel_python, index, rep.log)
            for w in wl:
                rel = f"wheels/{w.path.name}"
                _copy(w.path, stage / rel)
                how = "built from its sdist" if w.built_from_sdist else "wheel"
                entries.append(make_entry(stage, rel, kind="wheel", version=w.version, name=w.name,
                                          source=f"{index or 'pip default index'}: {w.name}=={w.version} ({how})",
                                          roles=("postgres",)))
            (stage / REQUIREMENTS).write_text(wheels_mod.requirements_txt(wl, opts.requirements))
            entries.append(make_entry(stage, REQUIREMENTS, kind="meta", version="", roles=("postgres",),
                                      source="generated: every wheel pinned with --hash"))
            if wl:  # what pip resolved, with the hash of each downloaded file: the wheels were built from it
                _copy(wl[0].path.parent / wheels_mod.RESOLVED, stage / RESOLVED)
                entries.append(make_entry(stage, RESOLVED, kind="meta", version="", roles=(),
                                          source="generated: every dependency pip resolved, with its sha256"))
            if opts.check_wheels:
                stamp = wl[0].path.parent / "offline-check.ok" if wl else None
                patroni = wheels_mod.check_offline(stage / "wheels", stage / REQUIREMENTS, opts.wheel_python,
                                                   rep.log, stamp)
                notes.append(f"offline install check passed: {patroni}")
        phases["wheels"] = time.monotonic() - t

        with rep.phase("manifest + verify"):
            target = {"os": opts.os_name, "arch": "amd64", "postgres_major": opts.pg_major,
                      "python": "cp311", "requirements": list(opts.requirements)}
            created = datetime.now(UTC).isoformat(timespec="seconds")
            write_manifest(stage, entries, etcd_version=tb.version, target=target, created=created)
            verify_bundle(stage)
            _swap_in(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = load_manifest(dest)
    return BuildResult(manifest=manifest, seconds=time.monotonic() - t0, phases=phases, notes=notes,
                       patroni_version=patroni)
