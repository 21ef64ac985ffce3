"""The bundle's manifest.json: what every file is, its sha256, and which roles need it.

Format (``format: 1``)::

    {"format": 1, "created": "...", "target": {"os": "debian12", "postgres_major": 15, ...},
     "etcd_version": "3.5.16",
     "files": [{"path": "debs/debian12/libpq5_15.10-0+deb12u1_amd64.deb", "sha256": "...",
                "size": 123, "kind": "deb", "name": "libpq5", "version": "15.10-0+deb12u1",
                "source": "...", "roles": ["postgres"]}, ...]}

``manifest.json`` itself is not listed. Paths are POSIX, relative to the bundle directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from runbook.core.fsutil import write_atomic
from runbook.errors import RunbookError

MANIFEST = "manifest.json"
FORMAT = 1
KINDS = ("etcd", "deb", "wheel", "meta")
ROLES = ("etcd", "postgres", "balancer", "backup", "restore")
REQUIREMENTS = "wheels/requirements.txt"
RESOLVED = "wheels/resolved.txt"  # the build's lock: what pip resolved, each with its sha256 (not pushed)
REBUILD_HINT = "re-copy the bundle from the build machine, or rebuild it with `inv bundle.build`"


class BundleError(RunbookError):
    """The bundle is missing, malformed or does not match its manifest; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One file of the bundle."""

    path: str
    sha256: str
    size: int
    kind: str
    version: str
    source: str
    roles: tuple[str, ...]
    name: str = ""
    os: tuple[str, ...] = ()  # the distributions whose hosts need it (runbook.inventory.distros); () = all
    # a .deb's place in apt's install plan: dpkg -i installs in this order (a Pre-Depends must come first)
    order: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["roles"] = list(self.roles)
        d["os"] = list(self.os)
        for k in ("os", "order"):
            if not d[k]:
                del d[k]
        return d

    def for_os(self, os_name: str | None) -> bool:
        return os_name is None or not self.os or os_name in self.os


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest; ``root`` is the bundle directory it was read from."""

    root: Path
    files: tuple[Entry, ...]
    etcd_version: str = ""
    target: dict = field(default_factory=dict)
    created: str = ""

    def files_for(self, roles: set[str] | frozenset[str] | tuple[str, ...], os_name: str | None = None) -> list[Entry]:
        """Every entry needed by at least one of ``roles`` on a host of ``os_name`` (in manifest order)."""
        wanted = set(roles)
        unknown = wanted - set(ROLES)
        if unknown:
            raise BundleError(f"unknown role(s) {', '.join(sorted(unknown))}; known: {', '.join(ROLES)}")
        return [e for e in self.files if wanted & set(e.roles) and e.for_os(os_name)]

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.files if e.kind == kind]

    def etcd_tarball(self) -> Entry:
        """The etcd release tarball entry (exactly one is expected)."""
        found = self.of_kind("etcd")
        if len(found) != 1:
            raise BundleError(f"{self.root / MANIFEST}: expected exactly one etcd tarball, "
                              f"found {len(found)}; "
                              "rebuild the bundle with `inv bundle.build`")
        return found[0]

    def requirements(self, os_name: str | None = None) -> Entry:
        """wheels/<cpXY>/requirements.txt of the host's Python (pinned, with --hash for every wheel)."""
        for e in self.files:
            if e.kind == "meta" and e.path.startswith("wheels/") and e.path.endswith("/requirements.txt") \
                    and e.for_os(os_name):
                return e
        raise BundleError(f"{self.root / MANIFEST}: no wheelhouse requirements.txt"
                          + (f" for {os_name}" if os_name else "") + "; rebuild with `inv bundle.build` "
                          "(with the inventory whose hosts it is for)")

    def debs(self, os_name: str | None = None, role: str = "postgres") -> list[Entry]:
        """The .deb files a host of ``os_name`` with ``role`` installs (dpkg -i of exactly these)."""
        found = [e for e in self.of_kind("deb") if role in e.roles and e.for_os(os_name)]
        return sorted(found, key=lambda e: e.order) if any(e.order for e in found) else found

    def check_for(self, hosts) -> None:
        """Refuse a bundle that lacks what one of ``hosts`` (inventory Hosts) needs, naming host and distribution."""
        from runbook.inventory.distros import DISTROS

        missing = []
        for h in hosts:
            d = DISTROS.get(h.os)
            if d is None:
                continue
            if h.has("postgres"):
                try:
                    self.requirements(h.os)
                except BundleError:
                    missing.append(f"{h.name} ({h.os}): the wheelhouse for Python {d.python[0]}.{d.python[1]}")
                if not self.debs(h.os, "postgres"):
                    missing.append(f"{h.name} ({h.os}): the PostgreSQL .deb files")
            for role in ("balancer", "backup", "restore"):
                if h.has(role) and not self.debs(h.os, role):
                    missing.append(f"{h.name} ({h.os}): the .deb files of role {role}")
            if h.has("etcd"):
                if d.etcd_source == "deb" and not self.debs(h.os, "etcd"):
                    missing.append(f"{h.name} ({h.os}): the etcd .deb files")
                if d.etcd_source == "tarball" and not [e for e in self.of_kind("etcd") if e.for_os(h.os)]:
                    missing.append(f"{h.name} ({h.os}): the etcd release tarball")
        if missing:
            raise BundleError(f"{self.root / MANIFEST}: the bundle lacks what these hosts need: "
                              + "; ".join(dict.fromkeys(missing)) + ". Build it for this inventory: "
                              "inv bundle.build (it reads the hosts' os: and roles)")

    def wheels(self) -> list[Entry]:
        return self.of_kind("wheel")

    def path(self, entry: Entry) -> Path:
        """Absolute local path of an entry."""
        return self.root / entry.path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_entry(root: Path, rel: str, *, kind: str, version: str, source: str, roles: tuple[str, ...],
               name: str = "", os: tuple[str, ...] = (), order: int = 0) -> Entry:
    """Hash the file ``root/rel`` into an Entry."""
    p = root / rel
    return Entry(path=rel, sha256=sha256_file(p), size=p.stat().st_size, kind=kind, version=version,
                 source=source, roles=tuple(roles), name=name, os=tuple(os), order=order)


def write_manifest(root: Path, entries: list[Entry], *, etcd_version: str, target: dict,
                   created: str) -> Path:
    """Write manifest.json atomically (temp file + fsync + rename)."""
    doc = {"format": FORMAT, "created": created, "target": target, "etcd_version": etcd_version,
           "files": [e.to_json() for e in sorted(entries, key=lambda e: e.path)]}
    dest = root / MANIFEST
    write_atomic(dest, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode(), 0o644)
    return dest


def _entry(mpath: Path, i: int, raw: object) -> Entry:
    where = f"{mpath}: files[{i}]"
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: expected an object, got {type(raw).__name__}; "
                          "rebuild with `inv bundle.build`")
    missing = [k for k in ("path", "sha256", "size", "kind") if k not in raw]
    if missing:
        raise BundleError(f"{where}: missing key(s) {', '.join(missing)}; rebuild with `inv bundle.build`")
    rel = raw["path"]
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where}: path must be a non-empty string")
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or "\\" in rel or rel == MANIFEST:
        raise BundleError(f"{where}: unsafe path {rel!r} (must be relative, inside the bundle)")
    sha, size, kind = raw["sha256"], raw["size"], raw["kind"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise BundleError(f"{where} ({rel}): sha256 is not 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleError(f"{where} ({rel}): size must be a non-negative integer")
    if kind not in KINDS:
        raise BundleError(f"{where} ({rel}): kind {kind!r} is not one of {', '.join(KINDS)}")
    roles = raw.get("roles", [])
    if not isinstance(roles, list) or any(r not in ROLES for r in roles):
        raise BundleError(f"{where} ({rel}): roles must be a list drawn from {', '.join(ROLES)}")
    order = raw.get("order", 0)
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise BundleError(f"{where} ({rel}): order must be a non-negative integer (apt's install order)")
    oses = raw.get("os", [])
    if not isinstance(oses, list) or any(not isinstance(o, str) for o in oses):
        raise BundleError(f"{where} ({rel}): os must be a list of distribution names, e.g. [debian13]")
    return Entry(path=rel, sha256=sha, size=size, kind=kind, version=str(raw.get("version", "")),
                 source=str(raw.get("source", "")), roles=tuple(roles), name=str(raw.get("name", "")),
                 os=tuple(oses), order=order)


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json`` (does not hash the files; see verify_bundle)."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no bundle directory; build one with `inv bundle.build` "
                          "(or copy it here from the build machine)")
    try:
        text = mpath.read_text()
    except FileNotFoundError:
        raise BundleError(f"{mpath}: missing; {REBUILD_HINT}") from None
    except OSError as exc:
        raise BundleError(f"{mpath}: cannot read ({exc.strerror})") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                          f"{REBUILD_HINT}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise BundleError(f"{mpath}: expected an object with a 'files' list; {REBUILD_HINT}")
    if doc.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {doc.get('format')!r} is not supported (expected {FORMAT}); "
                          "rebuild the bundle with this version of the runbook")
    entries = [_entry(mpath, i, raw) for i, raw in enumerate(doc["files"])]
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise BundleError(f"{mpath}: {e.path} is listed twice; {REBUILD_HINT}")
        seen.add(e.path)
    raw_target = doc.get("target")
    target: dict = raw_target if isinstance(raw_target, dict) else {}
    return Manifest(root=root, files=tuple(entries), etcd_version=str(doc.get("etcd_version", "")),
                    target=target, created=str(doc.get("created", "")))


def _walk(root: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            rel = Path(dirpath, n).relative_to(root).as_posix()
            if rel != MANIFEST:
                found.add(rel)
    return found


def problems(manifest: Manifest, known: dict | None = None, seen: dict | None = None) -> list[str]:
    """Every mismatch between the bundle directory and its manifest, one message per file. `known`: each file's
    stat key when it last hashed right (verify_bundle's record): a file whose key is unchanged is not read
    again. `seen` receives every file's key, taken before it was hashed."""
    root = manifest.root
    out: list[str] = []
    for e in manifest.files:
        p = root / e.path
        if p.is_symlink() or (p.exists() and not p.is_file()):
            out.append(f"{p}: not a regular file; {REBUILD_HINT}")
            continue
        if not p.exists():
            out.append(f"{p}: missing (manifest lists {e.size} bytes, {e.kind}); {REBUILD_HINT}")
            continue
        st = p.stat()
        size = st.st_size
        if size != e.size:
            what = "truncated" if size < e.size else "larger than built"
            out.append(f"{p}: {what}: {size} bytes, manifest says {e.size}; {REBUILD_HINT}")
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, e.sha256]
        if seen is not None:
            seen[e.path] = key
        if known is not None and known.get(e.path) == key:
            continue  # unchanged since it hashed right: any write would have moved its ctime
        if sha256_file(p) != e.sha256:
            out.append(f"{p}: sha256 mismatch (altered or corrupt): manifest says {e.sha256[:16]}...; "
                       f"{REBUILD_HINT}")
    listed = {e.path for e in manifest.files}
    for rel in sorted(_walk(root) - listed):
        out.append(f"{root / rel}: extra file, not in the manifest; remove it, or rebuild with "
                   "`inv bundle.build` (a bundle is copied as a whole)")
    return out


def manifest_sha256(bundle_dir: str | Path) -> str:
    """sha256 of manifest.json as it lies on disk (what runbook.manifest_sha256 pins)."""
    return sha256_file(Path(bundle_dir) / MANIFEST)


def approved(manifest: Manifest, pinned: str) -> str:
    """Refuse a manifest other than the pinned one (no pin: any verified bundle); return its sha256."""
    digest = manifest_sha256(manifest.root)
    if pinned and pinned.strip().lower() != digest:
        raise BundleError(f"{manifest.root / MANIFEST}: sha256 {digest} is not the approved bundle "
                          f"(runbook.manifest_sha256 pins {pinned.strip()}); this is a different or altered "
                          "bundle: copy the approved one here, or, when this new bundle is approved, set "
                          f"runbook.manifest_sha256: {digest} in invoke.yaml")
    return digest


def verify_bundle(bundle_dir: str | Path, record: Path | None = None, keep: bool = True) -> Manifest:
    """Load the manifest and re-hash every file; raise BundleError listing every problem.

    `record` (a file in the runbook's private state dir): each file's size, mtime, ctime, inode and device
    when it last hashed right, with its sha256. A file whose stat and manifest sha256 are the recorded ones is
    not read again; any other file is. Any write, chmod, rename or `touch` sets a file's ctime to now, and no
    program can set it back (only a change of the clock): a file changed since it was hashed is always read
    again. Written (unless not `keep`: a dry run writes nothing) only when the whole bundle verified, from
    stats taken before the hashing."""
    manifest = load_manifest(bundle_dir)
    known = _read_record(record, manifest.root) if record else None
    seen: dict = {}
    found = problems(manifest, known, seen)
    if found:
        head = f"bundle {manifest.root} does not match its manifest ({len(found)} problem(s)):"
        raise BundleError("\n".join([head, *("  " + p for p in found)]))
    if record and keep and seen != known:
        _write_record(record, manifest.root, seen)
    return manifest


def _read_record(record: Path, root: Path) -> dict | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: every file is hashed
    return data.get("files") if isinstance(data, dict) and data.get("root") == str(root.resolve()) else None


def _write_record(record: Path, root: Path, files: dict) -> None:
    """Atomically, 0600; a record that cannot be written only costs the next run a full re-hash."""
    tmp = record.with_name(record.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"root": str(root.resolve()), "files": files}, f)
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)
