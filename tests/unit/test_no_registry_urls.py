"""No URL in the code points outside the lab: mirrors and indexes come from the build machine's own
configuration (runbook.bundle.sources), never from a host name written in the repository."""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from runbook.inventory import load_inventory

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("runbook", "bench")
URL = re.compile(r"https?://([^\s'\"/:{}\[\]<>()\\]*)")


def lab_names() -> set[str]:
    """Host names the repo's own lab inventory defines (a URL to one of them stays in the lab)."""
    return {"localhost", *load_inventory(REPO / "hosts.yml").names()}


def outside(host: str, names: set[str]) -> bool:
    """Does a URL with this literal host leave the lab? Empty = a template ({host.name}): the inventory's."""
    if not host or host in names:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # any other host name
    return not (ip.is_loopback or ip.is_unspecified or ip in ipaddress.ip_network("192.168.0.0/16"))


def offending(text: str, names: set[str]) -> list[str]:
    return [m.group(0) for m in URL.finditer(text) if outside(m.group(1), names)]


@pytest.mark.parametrize("text, bad", [
    ('x = "http://deb.example.net/debian"', ["http://deb.example.net"]),
    ("f'https://{h.name}:2379'", []),
    ('"https://0.0.0.0:2380", "http://127.0.0.1:8008", "https://[::1]:1"', []),
    ('"https://192.168.60.131:8008/patroni"', []),
    ('"https://10.1.2.3/x", "https://8.8.8.8"', ["https://10.1.2.3", "https://8.8.8.8"]),
    ('"https://etcd01:2379"', []),
], ids=["registry-like name", "template", "loopback/unspecified", "lab address", "outside addresses", "lab host"])
def test_the_scanner_tells_lab_from_outside(text, bad):
    assert offending(text, lab_names()) == bad


def test_no_url_outside_the_lab_in_the_code():
    names = lab_names()
    found = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(REPO)}:{n}: {url}" for url in offending(line, names)]
    assert not found, ("URLs outside the lab in the code; take them from configuration "
                       "(runbook.bundle.sources, invoke.yaml):\n" + "\n".join(found))
