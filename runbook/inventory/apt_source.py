"""cluster.postgres_apt: an extra apt source for PostgreSQL packages (a mirror of the PostgreSQL project's own
apt repository), validated with the inventory; bundle.build is its only reader."""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator

APT_URL = re.compile(r"^(https?://[^\s/]+|file:/)[^\s]*$")
APT_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._{}-]*$")


class PostgresAptSpec(BaseModel):
    """An extra apt source for PostgreSQL packages: a mirror of the PostgreSQL project's own apt repository.

    Only bundle.build reads it (the hosts install from the bundle): its packages join the .deb closure, so a
    major that a distribution does not ship (PostgreSQL 16 on Debian 12) resolves from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str            # the mirror's base URL (http(s):// or file:/ for a copy on this machine)
    key: str            # its signing key (armored .asc or binary .gpg), relative to the inventory file
    suite: str = "{codename}-pgdg"  # the repository's layout: one suite per distribution codename
    component: str = "main"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not APT_URL.match(v.strip()):
            raise ValueError(f"{v!r} is not an apt repository URL; write the mirror's base URL: "
                             "https://{host}/{path}, or file:/srv/mirror/postgresql for a copy on the build machine")
        return v.strip().rstrip("/")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name the mirror's signing key file (.asc or .gpg), relative to this file")
        return v.strip()

    @field_validator("suite", "component")
    @classmethod
    def _word(cls, v: str) -> str:
        if not APT_WORD.match(v.strip()):
            raise ValueError(f"{v!r} is not an apt suite/component name; e.g. suite: '{{codename}}-pgdg' "
                             "(bookworm-pgdg, trixie-pgdg), component: main")
        return v.strip()
