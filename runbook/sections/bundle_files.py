"""The bundle as it lies on the hosts: where the push step puts it, and its manifest's entries there."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from runbook.cluster.context import Ctx

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
