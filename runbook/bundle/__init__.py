"""The air-gapped bundle: build it where the internet is, verify it where it is not.

Layout of a bundle directory (default ``bundle/``)::

    manifest.json                                   every other file: path, sha256, size, kind, ...
    etcd/etcd-vX.Y.Z-linux-amd64.tar.gz             kind etcd,  roles [etcd]
    debs/debian12/*.deb                             kind deb,   roles [postgres]  (dpkg -i of exactly these)
    wheels/*.whl                                    kind wheel, roles [postgres]
    wheels/requirements.txt                         kind meta,  roles [postgres]  (--require-hashes)
    wheels/resolved.txt                             kind meta,  roles []  (what pip resolved, with hashes)

Provenance: the sha256 of manifest.json is printed by bundle.build; ``runbook.manifest_sha256``
pins it and bundle.verify / bundle.push refuse any other (``approved(m, pin)``). Where packages
come from: runbook.bundle.sources (this machine's apt sources and pip configuration).

API for the push/install steps (all raise ``BundleError`` with a message naming the file and
what to do)::

    from runbook.bundle import BundleError, Entry, Manifest, load_manifest, verify_bundle

    m = load_manifest("bundle")          # parse + validate manifest.json (no hashing)
    m = verify_bundle("bundle")          # + re-hash every file; missing/extra/truncated/altered
    m.files_for({"etcd"})                # -> list[Entry] a host with these roles needs
    m.etcd_tarball()                     # -> Entry (path "etcd/etcd-v3.5.16-linux-amd64.tar.gz")
    m.etcd_version                       # -> "3.5.16" (the version actually packaged)
    m.requirements()                     # -> Entry for wheels/requirements.txt
    m.debs(), m.wheels()                 # -> list[Entry]
    m.path(entry)                        # -> absolute local Path of an entry
    Entry: .path (relative POSIX str), .sha256, .size, .kind, .version, .name, .source, .roles

Hosts install the wheels with
``pip install --no-index --find-links DIR --require-hashes -r DIR/requirements.txt``.
Building: ``runbook.bundle.build.build_bundle(BuildOptions(...))`` or ``inv bundle.build``.
"""
from runbook.bundle.manifest import BundleError, Entry, Manifest, load_manifest, verify_bundle

__all__ = ["BundleError", "Entry", "Manifest", "load_manifest", "verify_bundle"]
