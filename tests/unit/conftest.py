from __future__ import annotations

from pathlib import Path

import pytest

from runbook.bundle.manifest import make_entry, write_manifest
from runbook.cluster.context import Ctx
from runbook.core.context import Options
from runbook.core.ledger import Ledger
from runbook.core.testing import FakeTransport
from runbook.inventory import load_inventory
from runbook.sections.bundle_files import _manifest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inv():
    return load_inventory(ROOT / "hosts.yml")


def reference_on(os_name: str, tmp_path: Path):
    """The reference topology with every host on *os_name* (a test whose fake bundle is for one release)."""
    text = (ROOT / "hosts.yml").read_text()
    for other in ("debian12", "debian13"):
        text = text.replace(f"os: {other}", f"os: {os_name}")
    (tmp_path / "hosts.yml").write_text(text)
    return load_inventory(tmp_path / "hosts.yml")


@pytest.fixture
def ctx(inv, tmp_path):
    c = Ctx(inventory=inv, transport=FakeTransport(), state_dir=tmp_path / "state",
            bundle_dir=tmp_path / "bundle", options=Options())
    c.local = c.transport
    c.ledger = Ledger(c.state_dir / "test.db", redact=c.redact)
    c.ledger.acquire("test", [])
    yield c
    c.ledger.release("ok")


@pytest.fixture
def bundle(ctx):
    root = ctx.bundle_dir
    files = {"etcd/etcd-v3.5.16-linux-amd64.tar.gz": ("etcd", ("etcd",)),
             "debs/debian12/postgresql-15_15.20_amd64.deb": ("deb", ("postgres",)),
             "wheels/patroni-4.1.5-py3-none-any.whl": ("wheel", ("postgres",)),
             "wheels/requirements.txt": ("meta", ("postgres",))}
    entries = []
    for rel, (kind, roles) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        entries.append(make_entry(root, rel, kind=kind, version="1", source="test", roles=roles))
    write_manifest(root, entries, etcd_version="3.5.16", target={"os": "debian12"}, created="now")
    _manifest.cache_clear()
    yield root
    _manifest.cache_clear()
