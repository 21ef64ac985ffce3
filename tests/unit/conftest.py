from __future__ import annotations

from pathlib import Path

import pytest

from runbook.core.context import Ctx, Options
from runbook.core.ledger import Ledger
from runbook.core.testing import FakeTransport
from runbook.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inv():
    return load_inventory(ROOT / "hosts.yml")


@pytest.fixture
def ctx(inv, tmp_path):
    c = Ctx(inventory=inv, transport=FakeTransport(), state_dir=tmp_path / "state",
            bundle_dir=tmp_path / "bundle", options=Options())
    c.local = c.transport
    c.ledger = Ledger(c.state_dir / "test.db", redact=c.redact)
    c.ledger.acquire("test", [])
    yield c
    c.ledger.release("ok")
