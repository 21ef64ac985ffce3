"""Where the bundle's packages come from: the build machine's apt sources (one-line and deb822) and pip's
configuration, table-driven; and the lab's base tree key, which must not depend on the mirror."""
from __future__ import annotations

import pytest

from runbook.bundle.manifest import BundleError
from runbook.bundle.sources import (
    AptSource,
    debian_mirrors,
    parse_deb822,
    parse_one_line,
    parse_pip_config,
    system_sources,
)

# Mirror names below are made up (example.net / .internal): no registry host name in the repository.
ONE_LINE = [
    ("plain", "deb http://mirror.example.net/debian bookworm main\n",
     [AptSource(("deb",), ("http://mirror.example.net/debian",), ("bookworm",), ("main",))]),
    ("options, components, trailing comment",
     "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://m.internal/debian bookworm main contrib # x\n",
     [AptSource(("deb",), ("http://m.internal/debian",), ("bookworm",), ("main", "contrib"))]),
    ("comments, blank lines, deb-src and garbage",
     "# deb http://old.example.net/debian buster main\n\ndeb-src http://m.internal/debian bookworm main\n"
     "not a source line\ndeb http://short\n",
     [AptSource(("deb-src",), ("http://m.internal/debian",), ("bookworm",), ("main",))]),
    ("options with spaces inside the brackets", "deb [ trusted=yes ] file:/srv/repo ./\n",
     [AptSource(("deb",), ("file:/srv/repo",), ("./",), ())]),
]

DEB822 = [
    ("two paragraphs, comment lines (Debian 12's own debian.sources)",
     "Types: deb\n# http://snapshot.example.net/archive/debian/20250520T000000Z\nURIs: http://m.internal/debian\n"
     "Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
     "\nTypes: deb\nURIs: http://m.internal/debian-security\nSuites: bookworm-security\nComponents: main\n",
     [AptSource(("deb",), ("http://m.internal/debian",), ("bookworm", "bookworm-updates"), ("main",)),
      AptSource(("deb",), ("http://m.internal/debian-security",), ("bookworm-security",), ("main",))]),
    ("several types and URIs, continuation lines, case-insensitive keys",
     "types: deb deb-src\nURIs: http://a.internal/debian\n http://b.internal/debian\nSuites: trixie\n"
     "Components: main\n  non-free-firmware\n",
     [AptSource(("deb", "deb-src"), ("http://a.internal/debian", "http://b.internal/debian"), ("trixie",),
                ("main", "non-free-firmware"))]),
    ("Enabled: no is skipped; a paragraph without URIs is ignored",
     "Types: deb\nURIs: http://off.internal/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
     "Types: deb\nSuites: bookworm\n",
     []),
]


@pytest.mark.parametrize("text, want", [c[1:] for c in ONE_LINE], ids=[c[0] for c in ONE_LINE])
def test_one_line_format(text, want):
    assert parse_one_line(text) == want


@pytest.mark.parametrize("text, want", [c[1:] for c in DEB822], ids=[c[0] for c in DEB822])
def test_deb822_format(text, want):
    assert parse_deb822(text) == want


THIRD_PARTY = [AptSource(("deb",), ("https://vendor.example.net/apt",), ("cloud-sdk-bookworm",), ("main",)),
               AptSource(("deb",), ("https://node.example.net/node_20.x",), ("nodistro",), ("main",))]
DEBIAN = parse_deb822(DEB822[0][1])

MIRRORS = [
    ("third-party sources first are not taken for Debian", THIRD_PARTY + DEBIAN, "", "",
     ("http://m.internal/debian", "http://m.internal/debian-security")),
    ("runbook.debian_mirror overrides the main archive only", DEBIAN, "http://local.internal/debian/", "",
     ("http://local.internal/debian", "http://m.internal/debian-security")),
    ("both overridden", [], "http://a.internal/d", "http://a.internal/s", ("http://a.internal/d", "http://a.internal/s")),
    ("no security archive known", parse_one_line("deb http://m.internal/debian bookworm main\n"), "", "",
     ("http://m.internal/debian", "")),
    ("deb-src only and other components do not count",
     parse_one_line("deb-src http://src.internal/debian bookworm main\ndeb http://c.internal/debian bookworm contrib\n"
                    "deb http://m.internal/debian stable main\n"), "", "", ("http://m.internal/debian", "")),
]


@pytest.mark.parametrize("sources, main, security, want", [c[1:] for c in MIRRORS], ids=[c[0] for c in MIRRORS])
def test_debian_mirrors(sources, main, security, want):
    got = debian_mirrors(sources, main, security)
    assert (got.main, got.security) == want


def test_no_debian_archive_is_a_clear_error():
    with pytest.raises(BundleError, match=r"no Debian archive found .*set runbook.debian_mirror"):
        debian_mirrors(THIRD_PARTY)


def test_system_sources_reads_list_and_sources_files_only(tmp_path):
    d = tmp_path / "etc/apt/sources.list.d"
    d.mkdir(parents=True)
    (tmp_path / "etc/apt/sources.list").write_text("deb http://one.internal/debian bookworm main\n")
    (d / "extra.list").write_text("deb http://two.internal/debian bookworm-updates main\n")
    (d / "debian.sources").write_text(DEB822[0][1])
    (d / "vendor.list.disabled").write_text("deb http://off.internal/debian bookworm main\n")
    uris = [s.uris[0] for s in system_sources(tmp_path)]
    assert uris == ["http://one.internal/debian", "http://two.internal/debian", "http://m.internal/debian",
                    "http://m.internal/debian-security"]


PIP = [
    ("nothing configured: pip's own default (no --index-url)",
     ":env:.disable-pip-version-check='1'\nglobal.find-links='/opt/wheels'\n", ""),
    ("global only", "global.index-url='http://pi.internal/simple'\nglobal.timeout='60'\n", "http://pi.internal/simple"),
    ("wheel section beats global", "global.index-url='http://g.internal/simple'\nwheel.index-url='http://w.internal/s'\n",
     "http://w.internal/s"),
    ("PIP_INDEX_URL (:env:) beats every file",
     "global.index-url='http://g.internal/simple'\n:env:.index-url='http://e.internal/simple'\n",
     "http://e.internal/simple"),
    ("extra-index-url alone is not an index", "global.extra-index-url='file:///opt/pypi/simple'\n", ""),
    ("the file read last wins", "global.index-url='http://first.internal/s'\nglobal.index-url='http://last.internal/s'\n",
     "http://last.internal/s"),
]


@pytest.mark.parametrize("text, want", [c[1:] for c in PIP], ids=[c[0] for c in PIP])
def test_pip_config(text, want):
    assert parse_pip_config(text) == want


def test_base_tree_key_ignores_the_mirror_and_finds_an_older_tree(tmp_path, monkeypatch):
    from runbook.lab import base

    assert "http" not in base.RECIPE and base.recipe_hash() == base.recipe_hash()
    # nothing cached: the mirror-free hashed name
    assert base.base_tree_path(tmp_path) == tmp_path / f"base-{base.SUITE}-{base.recipe_hash()}"
    # a tree built earlier (its key then included the mirror) is reused, whatever mirror it came from
    old = tmp_path / f"base-{base.SUITE}-0123456789ab"
    old.mkdir()
    (tmp_path / f"{old.name}.done").write_text(f"{base.RECIPE} http://any.internal/debian\n")
    assert base.base_tree_path(tmp_path) == old
    # a different recipe's tree is not
    (tmp_path / f"{old.name}.done").write_text(f"{base.RECIPE},vim http://any.internal/debian\n")
    assert base.base_tree_path(tmp_path) != old
