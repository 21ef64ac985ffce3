"""The lab's base trees, one per distribution (Debian 12 bookworm, Debian 13 trixie): a bare server
(debootstrap minbase + systemd, sshd, sudo, python3). Each host gets the tree its inventory os: names.

Built once into a cache directory keyed by the recipe's hash and reused; a change of the recipe
builds a new tree. The mirror is not part of the key (the same packages from another mirror are the
same tree): it is this machine's own Debian mirror (runbook.bundle.sources), recorded in the
``.done`` file. A tree built when the key still included the mirror is found by that record.
python3-venv, postgresql and etcd are deliberately absent: the runbook brings them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("RUNBOOK_CACHE", "/var/cache/pg-ha-runbook"))
SUITE = "bookworm"  # the default distribution's (debian12); distros.Distro.suite names the others
INCLUDE = ("systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "python3", "iproute2",
           "procps", "ca-certificates")


def recipe(suite: str = SUITE) -> str:
    return f"debootstrap --variant=minbase --include={','.join(INCLUDE)} {suite}"  # + the mirror


RECIPE = recipe()


def recipe_hash(suite: str = SUITE) -> str:
    return hashlib.sha256(recipe(suite).encode()).hexdigest()[:12]


def base_tree_path(cache: Path = CACHE, suite: str = SUITE) -> Path:
    """The tree for the suite's recipe: one whose .done record is it + a mirror, else the (new) hashed name."""
    want = recipe(suite).split()
    for done in sorted(cache.glob(f"base-{suite}-*.done")):
        try:
            recorded = done.read_text().split()
        except OSError:
            continue
        if recorded[:-1] == want and done.with_suffix("").is_dir():
            return done.with_suffix("")
    return cache / f"base-{suite}-{recipe_hash(suite)}"


def ensure_base_tree(cache: Path = CACHE, log=print, mirror: str = "", suite: str = SUITE) -> Path:
    """Return the cached base tree of ``suite``, building it (about 45 s) when missing or half-built.

    mirror: the Debian mirror to build from (default: this machine's apt sources)."""
    from runbook.bundle.sources import resolve_mirrors

    root = base_tree_path(cache, suite)
    done = root.with_name(root.name + ".done")
    if done.exists() and (root / "usr/lib/systemd/systemd").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = mirror or resolve_mirrors().main
    log(f"building the base tree {root} ({recipe(suite)} {mirror})")
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", suite, str(tmp),
                    mirror], check=True, stdout=subprocess.DEVNULL)
    # A bare server's resolver is unreachable from the lab; hosts get an empty resolv.conf.
    (tmp / "etc/resolv.conf").unlink(missing_ok=True)
    (tmp / "etc/resolv.conf").write_text("")
    subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=False)
    tmp.rename(root)
    done.write_text(f"{recipe(suite)} {mirror}\n")
    return root
