"""Where the bundle's packages come from: this build machine's own apt sources and pip configuration.

No registry is named in the code. The Debian mirror is the one the build machine's apt already uses
(``/etc/apt/sources.list``, ``sources.list.d/*.list`` one-line entries and ``*.sources`` deb822
entries); the Python index is the one pip is configured with (``pip config list``, which includes
``PIP_INDEX_URL``), or pip's own default when none is configured. ``runbook.debian_mirror``,
``runbook.debian_security_mirror`` and ``runbook.pip_index`` (invoke.yaml) override them: what a site
with an internal mirror sets.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runbook.bundle.manifest import BundleError

# Debian's own suites (not a third party's "nodistro" or "cloud-sdk-bookworm"): a codename or alias,
# optionally with -updates / -backports / -proposed-updates. <codename>-security is the security archive.
DEBIAN_SUITES = ("buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
                 "oldoldstable", "oldstable", "stable", "testing", "unstable")
SUITE_SUFFIXES = ("", "-updates", "-backports", "-proposed-updates")
HINT = ("set runbook.debian_mirror (and runbook.debian_security_mirror) in invoke.yaml to your Debian "
        "mirror's URL, or add it to this machine's apt sources")


@dataclass(frozen=True)
class AptSource:
    """One apt source entry (a one-line entry, or one deb822 paragraph)."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str = ""  # the file it came from


@dataclass(frozen=True)
class DebianMirrors:
    main: str
    security: str = ""  # empty: no security archive known (the closure then lacks security updates)


@dataclass(frozen=True)
class PostgresApt:
    """cluster.postgres_apt resolved: a mirror of the PostgreSQL project's apt repository and its signing key.

    ``where`` names it for messages (the inventory file and YAML path)."""

    url: str
    key: Path
    suite: str = "{codename}-pgdg"
    component: str = "main"
    where: str = "cluster.postgres_apt"

    def suite_for(self, codename: str) -> str:
        return self.suite.replace("{codename}", codename)

    def gave(self, origin: str, codename: str) -> bool:
        """Did apt take a package from this source? ``origin`` as apt's simulation prints it: Label:[Version/]Suite."""
        return re.split(r"[:/]", origin)[-1] == self.suite_for(codename)

    def local_dir(self) -> Path | None:
        """The directory of a ``file:`` URL (bound into the build's root at the same path), else None."""
        if not self.url.startswith("file:"):
            return None
        return Path("/" + self.url.removeprefix("file:").lstrip("/"))

    def key_bytes(self) -> tuple[bytes, str]:
        """The key file's content and the extension apt needs for it (.asc armored, .gpg binary)."""
        try:
            data = self.key.read_bytes()
        except OSError as exc:
            raise BundleError(f"{self.where}.key: {self.key}: {exc.strerror or exc}; name the signing key file of "
                              "the PostgreSQL apt mirror (relative to the inventory file)") from None
        if data.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
            return data, "asc"
        if data[:1] and data[0] & 0x80 and ((data[0] & 0x40 and data[0] & 0x3F == 6) or (data[0] >> 2) & 0xF == 6):
            return data, "gpg"  # an OpenPGP public-key packet (new or old packet format)
        raise BundleError(f"{self.where}.key: {self.key} is not an OpenPGP public key (armored or binary); export "
                          "the mirror's signing key with gpg --export [--armor]")

    def line(self, codename: str, keyring: str) -> str:
        # a file: mirror is read through apt's copy: method: apt uses file: packages in place, while the
        # closure is collected from the archives directory (copy: puts them there like a download)
        url = "copy:" + self.url.removeprefix("file:") if self.url.startswith("file:") else self.url
        return f"deb [signed-by={keyring}] {url} {self.suite_for(codename)} {self.component}\n"


def parse_one_line(text: str, origin: str = "") -> list[AptSource]:
    """``deb [opt=val ...] URI SUITE [COMPONENT ...]`` lines (sources.list, *.list)."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "[" in line:  # options: "deb [arch=amd64 signed-by=/x.gpg] URI ..." -> drop them
            head, _, rest = line.partition("[")
            line = head + rest.partition("]")[2]
        words = line.split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        out.append(AptSource((words[0],), (words[1],), (words[2],), tuple(words[3:]), origin))
    return out


def parse_deb822(text: str, origin: str = "") -> list[AptSource]:
    """deb822 paragraphs (*.sources): Types, URIs, Suites, Components; ``Enabled: no`` is skipped."""
    out = []
    for para in _paragraphs(text):
        if para.get("enabled", "yes").strip().lower() == "no":
            continue
        types, uris = tuple(para.get("types", "").split()), tuple(para.get("uris", "").split())
        if types and uris:
            out.append(AptSource(types, uris, tuple(para.get("suites", "").split()),
                                 tuple(para.get("components", "").split()), origin))
    return out


def _paragraphs(text: str) -> list[dict[str, str]]:
    paras: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                paras.append(cur)
            cur, key = {}, ""
        elif raw[0] in " \t" and key:  # continuation of the previous field
            cur[key] += " " + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    return paras


def system_sources(root: Path = Path("/")) -> list[AptSource]:
    """Every apt source this machine's apt reads (other file names in sources.list.d are ignored, as apt does)."""
    etc = root / "etc/apt"
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list"))
    out = [s for f in files if f.is_file() for s in parse_one_line(f.read_text(errors="replace"), str(f))]
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        out += parse_deb822(f.read_text(errors="replace"), str(f))
    return out


def _debian(suite: str) -> bool:
    return any(suite == c + s for c in DEBIAN_SUITES for s in SUITE_SUFFIXES)


def debian_mirrors(sources: list[AptSource], main: str = "", security: str = "") -> DebianMirrors:
    """The Debian archive and security archive of ``sources``; ``main``/``security`` override them."""
    found_main = found_sec = ""
    for s in sources:
        if "deb" not in s.types or (s.components and "main" not in s.components):
            continue
        if not found_main and any(_debian(x) for x in s.suites):
            found_main = s.uris[0]
        if not found_sec and any(x.endswith("-security") and _debian(x[:-len("-security")]) for x in s.suites):
            found_sec = s.uris[0]
    main = (main or found_main).rstrip("/")
    if not main:
        where = sorted({s.origin for s in sources}) or ["/etc/apt/sources.list(.d)"]
        raise BundleError(f"no Debian archive found in this machine's apt sources ({', '.join(where)}); {HINT}")
    return DebianMirrors(main=main, security=(security or found_sec).rstrip("/"))


def resolve_mirrors(main: str = "", security: str = "", root: Path = Path("/")) -> DebianMirrors:
    """debian_mirrors() of this machine's apt sources (read only when an override is missing)."""
    if main and security:
        return DebianMirrors(main.rstrip("/"), security.rstrip("/"))
    return debian_mirrors(system_sources(root), main, security)


def parse_pip_config(text: str) -> str:
    """`pip config list` output -> the index-url pip would use ("" when none is configured).

    Precedence as pip applies it: the environment (``:env:``, i.e. PIP_INDEX_URL), then the ``wheel``
    command's section, then ``global``; for the same key, the file read last wins."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key.endswith(".index-url"):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        found[key.rsplit(".", 1)[0]] = words[0] if words else ""
    for section in (":env:", "wheel", "global"):
        if found.get(section):
            return found[section]
    return ""


def pip_index(python: str, override: str = "") -> str:
    """The index URL to pass to ``pip wheel`` ("" = pass none: pip's own default applies)."""
    if override:
        return override
    try:
        r = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BundleError(f"{python} -m pip config list: {exc}; set runbook.pip_index in invoke.yaml") from exc
    if r.returncode != 0:
        raise BundleError(f"{python} -m pip config list failed: {r.stderr.strip()[-300:]}; "
                          "set runbook.pip_index in invoke.yaml")
    return parse_pip_config(r.stdout)
