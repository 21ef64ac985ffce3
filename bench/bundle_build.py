"""Bundle build time, cold (empty download cache) vs warm (cached), and the bundle's size.

    sudo .venv/bin/python bench/bundle_build.py [--pg-major 15] [--no-wheel-check]

Cold uses a fresh cache directory: etcd .debs, the .deb closure, pip downloads and wheel builds
all start from nothing. The lab's Debian base tree (debootstrap, ~45 s) is linked in from the real
cache rather than rebuilt: it is the lab's, not the bundle's. Needs root and network.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.bundle.build import BuildOptions, Reporter, base_tree, build_bundle
from runbook.lab.base import CACHE, base_tree_path


class Quiet(Reporter):
    def log(self, msg: str) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-major", type=int, default=15)
    ap.add_argument("--no-wheel-check", action="store_true", help="skip the offline venv install check")
    args = ap.parse_args()
    base = base_tree(CACHE, print)  # waits for / builds the lab's base tree outside the timing
    with tempfile.TemporaryDirectory(prefix="bundle-bench-", dir="/var/tmp") as tmpd:
        tmp = Path(tmpd)
        cache = tmp / "cache"
        cache.mkdir()
        link = base_tree_path(cache)
        link.symlink_to(base)
        link.with_name(link.name + ".done").write_text("linked by bench\n")
        rows = []
        for label in ("cold", "warm"):
            opts = BuildOptions(bundle_dir=tmp / f"bundle-{label}", pg_major=args.pg_major, cache=cache,
                                check_wheels=not args.no_wheel_check)
            t = time.monotonic()
            res = build_bundle(opts, Quiet())
            rows.append((label, time.monotonic() - t, res))
        # the build's phases: the etcd release tarball, then per distribution its .deb files and wheelhouse
        names = list(rows[0][2].phases)
        print(f"{'run':5} {'total s':>8} " + " ".join(f"{n + ' s':>14}" for n in names))
        for label, secs, res in rows:
            print(f"{label:5} {secs:8.1f} " + " ".join(f"{res.phases.get(n, 0.0):14.1f}" for n in names))
        m = rows[-1][2].manifest
        for kind in ("etcd", "deb", "wheel", "meta"):
            es = m.of_kind(kind)
            print(f"{kind:6} {len(es):4d} files {sum(e.size for e in es) / 1e6:8.1f} MB")
        print(f"total  {len(m.files):4d} files {sum(e.size for e in m.files) / 1e6:8.1f} MB "
              f"(+ manifest.json {(m.root / 'manifest.json').stat().st_size / 1e3:.1f} kB)")
        print(f"download cache after the runs: {_du(cache) / 1e6:.1f} MB (base tree excluded)")
    return 0


def _du(path: Path) -> int:
    """Bytes under ``path``; os.walk does not follow the base tree's symlink."""
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(path) for n in names)


if __name__ == "__main__":
    sys.exit(main())
