"""PostgreSQL section: packages from the bundle, no distribution cluster, PGDATA and TLS files."""
from __future__ import annotations

import shlex

from runbook.cluster.context import Ctx
from runbook.core.step import Put, Run, Section
from runbook.inventory import Host
from runbook.sections.bundle_files import dpkg_install, manifest, remote, sums
from runbook.sections.tls_files import tls_check, tls_files

section = Section("postgres", 30, "PostgreSQL: packages, directories and certificates for Patroni")
CREATECLUSTER = "/etc/postgresql-common/createcluster.conf"
CREATECLUSTER_CONTENT = b"# pg-ha-runbook: Patroni owns the clusters\ncreate_main_cluster = false\n"


def major(ctx: Ctx) -> int:
    return ctx.inventory.cluster.postgres_major


# needs only the bundle on its hosts: dpkg runs while the etcd section does (runbook.core.schedule)
@section.step("packages", role="postgres", needs=("bundle.push",))
def packages(ctx: Ctx, host: Host) -> list:
    """Packages: PostgreSQL and python3-venv from the bundle's .deb files, offline
    Every file is checked first (a missing one fails before anything is installed); no
    default cluster is created (createcluster.conf), the rest of the walk-through's step 1."""
    debs = manifest(ctx).debs(host.os, "postgres")
    files = " ".join(remote(e) for e in debs)  # exactly the manifest's list: never a glob of the directory
    guard = [] if allow_downgrade(ctx) else [Run(
        # name and bundled version on stdin; an installed package newer than the bundle's stops the step
        "bad=''; while read -r name ver; do "
        "st=$(dpkg-query -W -f='${db:Status-Abbrev}|${Version}' \"$name\" 2>/dev/null) || continue; "
        "case \"$st\" in ii*) iv=${st#*|}; if dpkg --compare-versions \"$iv\" gt \"$ver\"; then "
        "bad=\"$bad$name: installed $iv, bundled $ver\\n\"; fi;; esac; done; "
        "[ -z \"$bad\" ] && exit 0; "
        # the sentence comes last: a failed step shows the end of stderr
        f"printf '%b{host.name}: refusing to downgrade the installed package(s) above to the bundle'\"'\"'s "
        "older versions. Build the bundle again from an up-to-date mirror (inv bundle.build), or set "
        "runbook.allow_downgrade: true (INVOKE_RUNBOOK_ALLOW_DOWNGRADE=1) to install the bundled ones\\n' "
        "\"$bad\" >&2; "
        "exit 1", stdin="".join(f"{e.name} {e.version}\n" for e in debs).encode())]
    return [Run("sha256sum --quiet -c -", stdin=sums(debs)),
            Put(CREATECLUSTER, CREATECLUSTER_CONTENT),
            *guard,
            # An interrupted run's dpkg may still be running on the host (kill -9 of the runbook does not
            # stop remote commands): dpkg_install waits for its lock; a package whose Pre-Depends was only
            # unpacked in the same dpkg call is installed by the next pass (at most 3); no service starts.
            dpkg_install(files)]


def allow_downgrade(ctx: Ctx) -> bool:
    """runbook.allow_downgrade: install the bundle's versions even where the host has newer ones."""
    return ctx.settings is not None and ctx.settings.allow_downgrade


@packages.check
def _packages_check(ctx: Ctx, host: Host) -> str:
    """PostgreSQL's package and python3-venv are installed (dpkg's status file, read once by awk: no dpkg-query,
    no interpreter), and ensurepip, which python3-venv brings and `python3 -m venv` needs, is in place."""
    p = ctx.paths_for(host)
    return (f"{installed([p.pg_package(), p.venv_package])} && "
            "ls /usr/lib/python3*/ensurepip/__init__.py >/dev/null 2>&1")


DPKG_STATUS = "/var/lib/dpkg/status"


def installed(packages: list[str], status: str = DPKG_STATUS) -> str:
    """A command: exit 0 when every package is "install ok installed" in dpkg's status file (a stanza's
    Package: line comes first; a removed package keeps its stanza with another Status)."""
    want = " ".join(packages)
    return (f"awk -v want={shlex.quote(want)} "
            "'BEGIN { n = split(want, w, \" \"); for (i = 1; i <= n; i++) need[w[i]] = 1 } "
            "/^Package: / { p = $2 } /^Status: install ok installed$/ && (p in need) { ok[p] = 1 } "
            f"END {{ for (k in need) if (!(k in ok)) exit 1 }}' {status}")


@packages.undo
def _packages_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"DEBIAN_FRONTEND=noninteractive dpkg -r {ctx.paths_for(host).pg_package()} postgresql "
                ">/dev/null 2>&1 || true")]


@section.step("default-off", role="postgres")
def default_off(ctx: Ctx, host: Host) -> list:
    """Distribution service off: stop, disable and drop the default cluster and service
    The walk-through's `systemctl --now disable postgresql-16`: only Patroni runs PostgreSQL."""
    p = ctx.paths_for(host)
    return [Run(f"if pg_lsclusters -h 2>/dev/null | grep -q '^{p.default_cluster()} '; then "
                f"pg_dropcluster --stop {p.default_cluster()}; fi"),
            Run(f"systemctl disable --now postgresql {p.default_service()} 2>/dev/null || true")]


@default_off.check
def _default_off_check(ctx: Ctx, host: Host) -> str:
    # pg_lsclusters (perl, ~50 ms) lists a cluster by its config directory: /etc/postgresql/<major>/main with
    # its postgresql.conf (a file or even a dead link), which pg_dropcluster removes
    conf = "/etc/postgresql/{}/{}/postgresql.conf".format(*ctx.paths_for(host).default_cluster().split())
    return f"test ! -e {conf} && test ! -L {conf} && ! systemctl is-enabled -q postgresql 2>/dev/null"


@default_off.undo
def _default_off_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl enable postgresql 2>/dev/null || true")]


@section.step("home", role="postgres")
def home(ctx: Ctx, host: Host) -> list:
    """postgres home: /home/postgres (0700) as the user's home, for .pgpass_patroni"""
    return [Run("install -d -m 0700 -o postgres -g postgres /home/postgres"),
            Run("[ \"$(getent passwd postgres | cut -d: -f6)\" = /home/postgres ] || "
                "usermod --home /home/postgres postgres")]


@home.check
def _home_check(ctx: Ctx, host: Host) -> str:
    return "[ \"$(getent passwd postgres | cut -d: -f6)\" = /home/postgres ] && test -d /home/postgres"


@home.undo
def _home_undo(ctx: Ctx, host: Host) -> list:
    return [Run("usermod --home /var/lib/postgresql postgres")]


@section.step("dirs", role="postgres", guards_data=lambda ctx, h: ctx.paths.pgdata(major(ctx)))
def dirs(ctx: Ctx, host: Host) -> list:
    """PGDATA and logs: /data/<major> (0700), /data/log, /var/run/postgresql, all owned by postgres
    Step 2 of the walk-through; the socket dir is recreated at boot by the Patroni unit's
    RuntimeDirectory (the walk-through's Astra Linux note)."""
    p = ctx.paths
    base = p.pgdata(major(ctx)).rsplit("/", 1)[0]
    return [Run(f"install -d -m 0700 -o postgres -g postgres {base} {p.pgdata(major(ctx))} {p.log_dir}"),
            Run(f"install -d -m 2775 -o postgres -g postgres {p.socket_dir}")]


@dirs.check
def _dirs_check(ctx: Ctx, host: Host) -> str:
    d = ctx.paths.pgdata(major(ctx))
    return f"test \"$(stat -c '%a %U' {d})\" = '700 postgres' && test -d {ctx.paths.log_dir}"


@dirs.undo
def _dirs_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rm -rf {ctx.paths.pgdata(major(ctx))}")]


@section.step("tls", role="postgres", needs=("postgres.dirs", "etcd.pki"))  # the CA and certificates
def tls(ctx: Ctx, host: Host) -> list:
    """TLS files: /opt/patroni/.tls with the CA, the host certificate and key (0600, postgres)
    Used by PostgreSQL (ssl), Patroni's REST API, patronictl and the etcd3 client."""
    return [Run("install -d -m 0755 /opt/patroni")] + tls_files(ctx, host, ctx.paths.patroni_tls_dir, "postgres")


@tls.check
def _tls_check(ctx: Ctx, host: Host) -> str:
    return tls_check(ctx.paths.patroni_tls_dir, host, "postgres")


@tls.undo
def _tls_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rm -rf {ctx.paths.patroni_tls_dir}")]


__all__ = ["section", "remote"]
