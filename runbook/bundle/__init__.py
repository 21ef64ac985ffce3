"""The air-gapped bundle: build it where the internet is, verify it where it is not.

Layout of a bundle directory (default ``bundle/``), built for the distributions and roles of the
inventory's hosts (runbook.inventory.distros: one mapping role -> packages per distribution)::

    manifest.json                                   every other file: path, sha256, size, kind, roles, os
    etcd/etcd-vX.Y.Z-linux-amd64.tar.gz             kind etcd,  roles [etcd], os [debian12]  (repacked)
    debs/<os>/*.deb                                 kind deb,   roles [postgres] and/or [etcd] (debian13:
                                                    etcd-server, etcd-client), os [<os>]  (dpkg -i of exactly these)
    wheels/<cpXY>/*.whl                             kind wheel, roles [postgres], os: the distributions of
                                                    that Python (cp311: debian12, cp313: debian13)
    wheels/<cpXY>/requirements.txt                  kind meta,  roles [postgres]  (--require-hashes)
    wheels/<cpXY>/resolved.txt                      kind meta,  roles []  (what pip resolved, with hashes)

Provenance: the sha256 of manifest.json is printed by bundle.build; ``runbook.manifest_sha256``
pins it and bundle.verify / bundle.push refuse any other (``approved(m, pin)``). Where packages
come from: runbook.bundle.sources (this machine's apt sources and pip configuration).

API for the push/install steps (all raise ``BundleError`` with a message naming the file and
what to do)::

    from runbook.bundle import BundleError, Entry, Manifest, load_manifest, verify_bundle

    m = load_manifest("bundle")          # parse + validate manifest.json (no hashing)
    m = verify_bundle("bundle")          # + re-hash every file; missing/extra/truncated/altered
    m.files_for({"etcd"}, "debian13")    # -> list[Entry] a host with these roles (and os) needs
    m.check_for(inventory.hosts)         # every host's needs are in the bundle, else BundleError naming it
    m.etcd_tarball()                     # -> Entry (path "etcd/etcd-v3.5.16-linux-amd64.tar.gz")
    m.etcd_version                       # -> "3.5.16" (the version actually packaged)
    m.requirements("debian13")           # -> Entry for wheels/cp313/requirements.txt
    m.debs("debian13", "etcd"), m.wheels()  # -> list[Entry]
    m.path(entry)                        # -> absolute local Path of an entry
    Entry: .path (relative POSIX str), .sha256, .size, .kind, .version, .name, .source, .roles, .os

Hosts install the wheels with
``pip install --no-index --find-links DIR --require-hashes -r DIR/requirements.txt``.
Building: ``runbook.bundle.build.build_bundle(BuildOptions(...))`` or ``inv bundle.build``.
"""
from runbook.bundle.manifest import BundleError, Entry, Manifest, load_manifest, verify_bundle

__all__ = ["BundleError", "Entry", "Manifest", "load_manifest", "verify_bundle"]
