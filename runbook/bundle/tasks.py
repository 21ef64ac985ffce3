"""invoke tasks: bundle.build, bundle.verify, bundle.etcd-from-debian.

Config (all optional; the tasks work with no ``runbook`` key at all), validated by
runbook.inventory.settings: ``runbook.bundle_dir`` (default "bundle", relative to the project),
``runbook.inventory`` ("hosts.yml"), ``runbook.etcd_url`` + ``runbook.etcd_sha256``,
``runbook.wheel_python`` ("/usr/bin/python3"), ``runbook.patroni_version`` ("4.1.5"),
``runbook.pip_index`` (default: pip's own configuration),
``runbook.debian_mirror`` / ``runbook.debian_security_mirror`` (default: this machine's apt
sources), ``runbook.manifest_sha256`` (the approved manifest.json; checked by verify and
bundle.push), ``runbook.cache`` ($RUNBOOK_CACHE or /var/cache/pg-ha-runbook).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invoke import Collection, Context, Exit, task
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runbook.bundle.build import DEFAULT_CACHE, BuildOptions, Reporter, build_bundle
from runbook.bundle.etcd import build_from_debian
from runbook.bundle.manifest import BundleError, Manifest, approved, verify_bundle
from runbook.bundle.sources import PostgresApt
from runbook.inventory.distros import DISTROS
from runbook.bundle.wheels import requirements_for
from runbook.inventory.settings import Settings, SettingsError, settings_of

console = Console(highlight=False)
OPTIONAL_ROLES = ("balancer", "backup", "restore")  # carried for every distribution that runs PostgreSQL


def _settings(c: Context) -> Settings:
    try:
        return settings_of(c)
    except SettingsError as exc:
        raise Exit(f"error: {exc}", code=2) from None


def _path(given: str | None, setting: Path) -> Path:
    """A path given on the command line is the operator's (from the cwd); the setting is resolved already."""
    return Path(given).expanduser().resolve() if given else setting


def _cache(s: Settings) -> Path:
    return s.cache or DEFAULT_CACHE


class RichReporter(Reporter):
    """Each phase is a spinner line with elapsed time; log lines print above it."""

    def log(self, msg: str) -> None:
        console.print(f"   [dim]{escape(msg)}[/dim]")  # escaped: "patroni[etcd3]" is not markup

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import time

        t = time.monotonic()
        with console.status(f"[bold]{name}[/bold] ..."):
            try:
                yield
            except BaseException:
                console.print(f"[red]✗[/red] {name} ({time.monotonic() - t:.1f} s)")
                raise
        console.print(f"[green]✓[/green] {name} ({time.monotonic() - t:.1f} s)")


def _fail(exc: BundleError) -> Exit:
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    return Exit(code=1)


def summary(m: Manifest) -> Table:
    """Per-kind count and size of a bundle."""
    t = Table(title=f"bundle {m.root}")
    for col in ("kind", "files", "MB", "roles"):
        t.add_column(col, justify="right" if col in ("files", "MB") else "left")
    for kind in ("etcd", "deb", "wheel", "meta"):
        es = m.of_kind(kind)
        if es:
            roles = ",".join(sorted({r for e in es for r in e.roles}))
            t.add_row(kind, str(len(es)), f"{sum(e.size for e in es) / 1e6:.1f}", roles)
    t.add_row("total", str(len(m.files)), f"{sum(e.size for e in m.files) / 1e6:.1f}", "")
    return t


@task(help={
    "pg_major": "PostgreSQL major version (default: cluster.postgres_major of the inventory, else 15)",
    "etcd_tarball": "an etcd-vX.Y.Z-linux-amd64.tar.gz you already have; needs its sha256 "
                    "(--etcd-sha256 or runbook.etcd_sha256)",
    "etcd_url": "download the etcd tarball from this URL (default runbook.etcd_url; "
                "needs runbook.etcd_sha256)",
    "etcd_sha256": "expected sha256 of the etcd tarball (default runbook.etcd_sha256)",
    "bundle_dir": "output directory (default runbook.bundle_dir, else 'bundle' in the project)",
    "inventory": "hosts.yml to read postgres_major/etcd_version/os from (default runbook.inventory)",
    "os": "build for every role on this OS only: debian12, debian13, rhel8/rhel9 (an untested command list "
          "only); default: the distributions and roles of the inventory's hosts",
    "wheel_check": "install the wheelhouse offline into a fresh venv and run patroni --version "
                   "(default on; --no-wheel-check skips it)",
    "release_only": "packages from the Debian release's own suite only, without -updates and -security "
                    "(an older bundle, e.g. to drill inv cluster.update); default off",
    "pg_version": "pin PostgreSQL's packages (postgresql-N, postgresql-client-N, libpq5) to this Debian version, "
                  "e.g. 15.18-0+deb12u1: an older point release with everything else current",
    "recommends": "include apt Recommends in the .deb closure, as apt does on a host (default on; "
                  "--no-recommends leaves them out)",
})
def build(c: Context, pg_major: int | None = None, etcd_tarball: str | None = None,
          etcd_url: str | None = None,
          etcd_sha256: str | None = None, bundle_dir: str | None = None, inventory: str | None = None,
          os: str | None = None, wheel_check: bool = True, recommends: bool = True,
          release_only: bool = False, pg_version: str | None = None) -> None:
    """Build the air-gapped bundle: etcd tarball, .deb closure, wheelhouse and manifest.json.

    Run it on a machine that reaches a Debian mirror and a Python index (its own apt sources and pip
    configuration, or runbook.debian_mirror / runbook.pip_index); copy the directory to the hosts'
    side as a whole and check it there with `inv bundle.verify`. The sha256 of manifest.json is
    printed: pin it as runbook.manifest_sha256 to approve exactly this bundle.
    """
    import time

    s = _settings(c)
    cluster = _inventory_cluster(s, inventory)
    opts = BuildOptions(
        bundle_dir=_path(bundle_dir, s.bundle_dir),
        pg_major=int(pg_major or (cluster.get("postgres_major") if not os or os == cluster.get("os") else None)
                     or (DISTROS[os].default_major if os in DISTROS else 15)),
        os_name=os or cluster.get("os", "debian12"),
        etcd_version=cluster.get("etcd_version", ""),
        etcd_url=etcd_url or s.etcd_url or "",
        etcd_sha256=etcd_sha256 or s.etcd_sha256 or "",
        etcd_tarball=etcd_tarball or "",
        cache=_cache(s),
        wheel_python=s.wheel_python,
        requirements=requirements_for(s.patroni_version),
        index_url=s.pip_index or "",
        debian_mirror=s.debian_mirror or "",
        debian_security_mirror=s.debian_security_mirror or "",
        check_wheels=wheel_check,
        recommends=recommends,
        targets={} if os else cluster.get("targets", {}),
        release_only=release_only,
        pg_version=pg_version or "",
        postgres_apt=cluster.get("postgres_apt"),
    )
    what = ", ".join(f"{o}: {'+'.join(r)}" for o, r in opts.targets.items()) or opts.os_name
    console.print(f"[bold]bundle.build[/bold] → {opts.bundle_dir}  ({what}, PostgreSQL "
                  f"{opts.pg_major}, cache {opts.cache})")
    t = time.monotonic()
    try:
        result = build_bundle(opts, RichReporter())
    except BundleError as exc:
        raise _fail(exc) from None
    for note in result.notes:
        console.print(("[yellow]" if note.startswith("WARNING") else "") + note, soft_wrap=True)
    console.print(summary(result.manifest))
    console.print(f"[green]built and verified[/green] {len(result.manifest.files)} files in "
                  f"{time.monotonic() - t:.1f} s")
    _print_manifest_sha(c, result.manifest)


def _print_manifest_sha(c: Context, m: Manifest) -> None:
    from runbook.bundle.manifest import manifest_sha256

    digest = manifest_sha256(m.root)
    console.print(f"manifest.json sha256 [bold]{digest}[/bold]")
    pinned = (_settings(c).manifest_sha256 or "")
    if not pinned:
        console.print(f"approve this bundle: set runbook.manifest_sha256: {digest} in invoke.yaml "
                      "(bundle.push then refuses any other)", soft_wrap=True)
    elif pinned.lower() != digest:
        console.print(f"[yellow]runbook.manifest_sha256 pins {pinned}: this bundle is not the approved one; "
                      "bundle.push refuses it until the pin is updated[/yellow]", soft_wrap=True)


def _inventory_cluster(s: Settings, inventory: str | None) -> dict:
    from runbook.inventory import InventoryError, load_inventory

    path = _path(inventory, s.inventory)
    if not path.exists():
        if inventory:
            raise _fail(BundleError(f"--inventory {path}: no such file"))
        console.print(f"[dim]no inventory at {path}: using defaults "
                      "(PostgreSQL 15, etcd 3.5.16, debian12)[/dim]")
        return {}
    try:
        inv = load_inventory(path)
    except InventoryError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise Exit(code=1) from None
    cl = inv.cluster
    targets: dict[str, tuple[str, ...]] = {}
    for h in inv.hosts:  # only what the inventory's hosts need: their distributions and roles
        # the optional roles of a distribution that runs PostgreSQL travel with it: a PostgreSQL host becomes a
        # balancer as soon as cluster.vip is set, and a backup or restore host may be added later; their
        # closures (HAProxy + keepalived, pgBackRest, PostgreSQL + pgBackRest) are small or already there, so
        # turning the front door or backups on needs no other bundle
        roles = {*h.roles, *OPTIONAL_ROLES} if h.has("postgres") else set(h.roles)
        targets[h.os] = tuple(sorted({*targets.get(h.os, ()), *roles}))
    pg = cl.postgres_apt
    return {"postgres_major": cl.postgres_major, "etcd_version": cl.etcd_version, "os": cl.os,
            "targets": targets,
            "postgres_apt": PostgresApt(url=pg.url, key=inv.path.parent / Path(pg.key).expanduser(), suite=pg.suite,
                                        component=pg.component, where=f"{inv.path}: cluster.postgres_apt")
            if pg else None}


@task(help={"bundle_dir": "bundle directory to check (default runbook.bundle_dir, else 'bundle')"})
def verify(c: Context, bundle_dir: str | None = None) -> None:
    """Re-hash every file of the bundle against manifest.json; any missing, extra, truncated or
    altered file is an error naming it (exit 1), and so is a manifest other than the one pinned
    by runbook.manifest_sha256."""
    root = _path(bundle_dir, _settings(c).bundle_dir)
    with console.status(f"hashing {root} ..."):
        try:
            m = verify_bundle(root)
        except BundleError as exc:
            raise _fail(exc) from None
    try:
        approved(m, (_settings(c).manifest_sha256 or ""))
    except BundleError as exc:
        raise _fail(exc) from None
    console.print(summary(m))
    console.print(f"[green]OK[/green]: {len(m.files)} files match {root / 'manifest.json'} "
                  f"(etcd {m.etcd_version}, built {m.created})")
    _print_manifest_sha(c, m)


@task(name="etcd-from-debian", help={
    "out": "also copy the tarball to this directory (default: only the cache)",
})
def etcd_from_debian(c: Context, out: str | None = None) -> None:
    """Build etcd-vX.Y.Z-linux-amd64.tar.gz (release layout) from Debian trixie's etcd 3.5 packages
    (from this machine's Debian mirror, or runbook.debian_mirror).

    The GitHub release site is unreachable here; the tarball name carries the version trixie
    packages, and its sha256 is printed so it can be recorded as runbook.etcd_sha256.
    """
    rep = RichReporter()
    try:
        with rep.phase("etcd tarball from Debian trixie"):
            from runbook.bundle.sources import resolve_mirrors

            s = _settings(c)
            mirror = resolve_mirrors(s.debian_mirror or "", s.debian_security_mirror or "")
            tb = build_from_debian(_cache(s), mirror.main, rep.log)
    except BundleError as exc:
        raise _fail(exc) from None
    path = tb.path
    if out:
        import shutil

        dest = Path(out).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copyfile(tb.path, dest / tb.path.name))
    console.print(f"etcd {tb.version}: {path}\n  sha256 {tb.sha256}\n  source {tb.source}")
    console.print(f"use it: inv bundle.build --etcd-tarball {path} --etcd-sha256 {tb.sha256}  (or just "
                  "inv bundle.build: it falls back to this)")


ns = Collection("bundle", build, verify, etcd_from_debian)
