"""Bundle section: check the offline bundle on the control machine, then push what each host needs."""
from __future__ import annotations

from pathlib import Path

from runbook.cluster.context import Ctx
from runbook.core.files import stat_commit, stat_record
from runbook.core.step import Local, Put, Run, Section, Upload
from runbook.inventory import Host
from runbook.sections.bundle_files import REMOTE_BUNDLE, manifest, remote, sums

SUMS = f"{REMOTE_BUNDLE}/SHA256SUMS"  # what this host should hold (checked with --verify)
SIZES = f"{REMOTE_BUNDLE}/SIZES"  # the cheap check of every run
# each file's stat when it last hashed right on the host (--verify re-hashes only what changed since); root-only
STAT_MARK = "/var/lib/pg-ha-runbook/bundle.stat"
section = Section("bundle", 10, "Push the offline bundle to the hosts")


@section.step("verify", role="local", always_check=True)
def verify(ctx: Ctx, host: Host) -> list:
    """Verify the bundle against its manifest on the control machine
    A missing, extra or altered file stops the run before any host is touched. Every file is re-hashed, except
    one whose size, mtime, ctime, inode and device are those recorded when it last hashed right (state dir,
    bundle.stat.json): any write, chmod, rename or touch sets a file's ctime to now, which no program can set
    back, so a file changed since is always read again."""
    from runbook.bundle.manifest import approved, verify_bundle

    m = manifest(ctx)
    pinned = (ctx.settings.manifest_sha256 if ctx.settings else None) or ""

    def run() -> str:
        verified = verify_bundle(ctx.bundle_dir, record=bundle_record(ctx), keep=not ctx.options.dry)
        verified.check_for(ctx.inventory.hosts)  # complete: what later steps need on every host
        digest = approved(verified, pinned)  # runbook.manifest_sha256: only the approved bundle goes out
        return f"{len(m.files)} files verified" + (f", manifest {digest[:16]}... approved" if pinned else "")

    what = f"verify {ctx.bundle_dir} against manifest.json" + (f" (pinned sha256 {pinned})" if pinned else "")
    return [Local(what, run, key=_key(m) + f";pin={pinned}")]


@verify.check
def _verify_check(ctx: Ctx, host: Host) -> bool:
    from runbook.bundle.manifest import BundleError, verify_bundle

    try:
        verified = verify_bundle(ctx.bundle_dir, record=bundle_record(ctx), keep=not ctx.options.dry)
        verified.check_for(ctx.inventory.hosts)
        return True
    except BundleError:
        return False


@verify.undo
def _verify_undo(ctx: Ctx, host: Host) -> list:
    return []  # a probe of the control machine's bundle: nothing to revert


def bundle_record(ctx: Ctx) -> Path:
    """The local bundle's stat record, in the runbook's private state dir (runbook.bundle.manifest.verify_bundle)."""
    return Path(ctx.state_dir) / "bundle.stat.json"


def _key(m) -> str:
    return ",".join(f"{e.path}:{e.sha256}" for e in m.files)


@section.step("push", role="all", always_check=True)
def push(ctx: Ctx, host: Host) -> list:
    """Copy the bundle files this host's roles need to /opt/runbook-bundle
    Files already there with the right sha256 are skipped, a damaged one is sent again, and everything is
    verified on the host with sha256sum. Later runs check sizes (a half-copied file). When the files hashed
    right, each file's size, mtime, ctime and inode are recorded (root-only, /var/lib/pg-ha-runbook/bundle.stat);
    --verify re-hashes every file whose stat differs from that record (a missing record: all of them). Any
    write, chmod, chown, rename or `touch` sets a file's ctime to now, and no program can set it back (only a
    change of the host's clock, by root): a file changed since it was hashed is always read again."""
    entries = manifest(ctx).files_for(set(host.roles), host.os)
    sizes = "".join(f"{e.size} {remote(e)}\n" for e in entries).encode()
    # Only what the manifest lists for this host stays: an older bundle's files (a stale .deb that a
    # glob would install) are removed. SUMS lines are "<64 hex>  <path>": the path starts at column 67.
    prune = (f"find {REMOTE_BUNDLE} -type f ! -path {SUMS} ! -path {SIZES} | "
             f"awk 'NR==FNR {{keep[substr($0, 67)] = 1; next}} !($0 in keep)' {SUMS} - | "
             "while IFS= read -r f; do rm -f -- \"$f\" && echo \"removed $f (not in the manifest)\"; done; "
             f"find {REMOTE_BUNDLE} -mindepth 1 -type d -empty -delete")
    # the stat record is taken before the files are hashed and kept only when they hashed right (stat_record)
    return ([Run(f"install -d -m 0755 {REMOTE_BUNDLE}")]
            + [Upload(manifest(ctx).path(e), remote(e), e.sha256, e.size, stat_mark=STAT_MARK) for e in entries]
            + [Put(SUMS, sums(entries)), Put(SIZES, sizes), Run(prune),
               Run(f"{stat_record([remote(e) for e in entries], STAT_MARK)} && sha256sum --quiet -c {SUMS} && "
                   f"{stat_commit(STAT_MARK)}")])


@push.check
def _push_check(ctx: Ctx, host: Host) -> str:
    """Adds to the checks derived from the Uploads (mode, owner and size of every file on every run, the
    sha256 with --verify): no file besides the listed ones, SUMS and SIZES (a stale file left by an older
    bundle makes the push run again, which removes it)."""
    return (f"[ \"$(find {REMOTE_BUNDLE} -type f | wc -l)\" = "
            f"{len(manifest(ctx).files_for(set(host.roles), host.os)) + 2} ]")


# The undo removes the files (derived from the Uploads), and this:
@push.undo
def _push_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rm -rf {REMOTE_BUNDLE} {STAT_MARK} {STAT_MARK}.pending")]  # the directory and the stat record too
