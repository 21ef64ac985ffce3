"""The distributions the runbook automates, and everything that differs between them: ONE table.

A `Distro` says what a bare host of that release has and gets: its Python, the PostgreSQL majors its own
archive ships (and the default), where etcd comes from, and the packages each role needs. Paths on the
hosts that depend on the major or the distribution are derived from it in runbook.cluster.render.Paths;
the lab (base tree suite) and the bundle (.deb closure, wheelhouse Python, etcd) read the same entry.

Adding a package for a role (pgbackrest, haproxy, ...): add it to `packages` of each distribution that
ships it; ``{major}`` in a name is the cluster's PostgreSQL major.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True)
class Distro:
    name: str                       # the inventory's os: value
    title: str                      # "Debian 12"
    suite: str                      # debootstrap / apt suite (codename)
    python: tuple[int, int]         # the release's python3: the wheelhouse is built for it
    glibc: tuple[int, int]          # newest manylinux_X_Y a wheel may require
    postgres_majors: tuple[int, ...]  # majors the release's own archive ships; the first is the default
    # etcd: "tarball" = the release-layout tarball (repacked where GitHub is unreachable), installed into
    # /usr/bin by the etcd section; "deb" = the release's own etcd-server/etcd-client packages
    etcd_source: str
    # role -> packages of the .deb closure ({major} = PostgreSQL major); one mapping, easy to extend
    packages: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def default_major(self) -> int:
        return self.postgres_majors[0]

    @property
    def cpython(self) -> str:
        """The wheel tag of its Python: cp311."""
        return f"cp{self.python[0]}{self.python[1]}"

    def packages_for(self, roles: tuple[str, ...] | list[str] | set[str], major: int) -> list[str]:
        """The packages a host with ``roles`` needs, in a stable order, without repeats."""
        out: list[str] = []
        for role in sorted(roles):
            for p in self.packages.get(role, ()):
                name = p.format(major=major)
                if name not in out:
                    out.append(name)
        return out


# PgBouncer (the front door's pooler) runs on every PostgreSQL host; HAProxy and keepalived on the balancer
# hosts (the PostgreSQL hosts themselves when the inventory names none: they then install both closures)
_POSTGRES = ("postgresql-{major}", "postgresql-client-{major}", "python3-venv", "pgbouncer", "pgbackrest")
_BALANCER = ("haproxy", "keepalived")
# pgBackRest must be the same version on the repository host and the PostgreSQL hosts: one archive gives it
_BACKUP = {"backup": ("pgbackrest",),
           "restore": ("postgresql-{major}", "postgresql-client-{major}", "python3-venv", "pgbackrest")}

DISTROS: dict[str, Distro] = {
    "debian12": Distro(name="debian12", title="Debian 12", suite="bookworm", python=(3, 11), glibc=(2, 36),
                       postgres_majors=(15,), etcd_source="tarball",
                       packages={"postgres": _POSTGRES, "balancer": _BALANCER, **_BACKUP}),
    "debian13": Distro(name="debian13", title="Debian 13", suite="trixie", python=(3, 13), glibc=(2, 41),
                       postgres_majors=(17,), etcd_source="deb",
                       packages={"postgres": _POSTGRES, "balancer": _BALANCER, **_BACKUP,
                                 "etcd": ("etcd-server", "etcd-client")}),
}
DEFAULT_OS: Final = "debian12"
# Accepted by the schema so that the message can say "not supported yet" instead of "unknown"
UNSUPPORTED = ("rhel8", "rhel9")


def distro(name: str) -> Distro:
    try:
        return DISTROS[name]
    except KeyError:
        raise ValueError(f"{name!r}: not a supported OS; use one of {', '.join(DISTROS)}") from None


def major_choices() -> str:
    """'debian12: 15; debian13: 17' (for messages)."""
    return "; ".join(f"{d.name} ships {', '.join(map(str, d.postgres_majors))}" for d in DISTROS.values())
