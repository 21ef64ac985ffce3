"""The bundle as it lies on the hosts: where the push step puts it, and its manifest's entries there."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from runbook.cluster.context import Ctx
from runbook.core.step import Run

REMOTE_BUNDLE = "/opt/runbook-bundle"  # where the push step puts the bundle on every host


def manifest(ctx: Ctx):
    return _manifest(str(ctx.bundle_dir))


@lru_cache(maxsize=4)
def _manifest(bundle_dir: str):
    from runbook.bundle.manifest import load_manifest

    return load_manifest(Path(bundle_dir))


def remote(entry) -> str:
    return f"{REMOTE_BUNDLE}/{entry.path}"


def sums(entries) -> bytes:
    """sha256sum -c input for bundle entries as they lie on the host."""
    return "".join(f"{e.sha256}  {remote(e)}\n" for e in entries).encode()


# While dpkg runs, no package starts a service (policy-rc.d exits 101): pgbouncer's postinst would start it as
# postgres with Debian's default config (and postgres.home's usermod then fails); the sections start what
# they configured. An administrator's own policy-rc.d is left alone.
NO_START = ("pol=/usr/sbin/policy-rc.d; own=''; if [ ! -e $pol ]; then printf '#!/bin/sh\\nexit 101\\n' > $pol && "
            "chmod 0755 $pol && own=1; fi; trap '[ -n \"$own\" ] && rm -f $pol' EXIT; ")


# after a successful dpkg -i: configure what is only unpacked (a retried pass skipped it), else fail with the log
CONFIGURE_PENDING = ("{ DEBIAN_FRONTEND=noninteractive dpkg --configure --pending >>$log 2>&1 && exit 0; "
                     "tail -20 $log >&2; exit 1; }")


def dpkg_install(files: str) -> Run:
    """dpkg -i of exactly these bundle files (never a glob of the directory, in apt's order), offline,
    starting no service. An interrupted run's dpkg may still be running on the host (kill -9 of the runbook
    does not stop remote commands): wait for its lock (up to 5 min) instead of failing on it. A package whose
    Pre-Depends was only unpacked in the same call is installed by one more pass (at most 3); that pass skips
    what the first one unpacked (--skip-same-version), so whatever is still only unpacked is configured at the
    end (CONFIGURE_PENDING: Debian 13's closure left e2fsprogs-l10n unpacked, and cluster.update then failed)."""
    return Run(NO_START + "log=$(mktemp /tmp/runbook-dpkg.XXXXXX); pre=0; for i in $(seq 150); do "
               f"DEBIAN_FRONTEND=noninteractive dpkg -i --skip-same-version {files} "
               f">$log 2>&1 && {CONFIGURE_PENDING}; if grep -q 'pre-dependency problem' $log && [ $pre -lt 3 ]; then "
               "pre=$((pre+1)); continue; fi; grep -q 'lock was locked by another process' $log || break; "
               "sleep 2; done; tail -20 $log >&2; exit 1", timeout=1800)
