"""The context the sections, procedures and tasks use: the engine's run context plus the cluster's own
material — where things live on the hosts, the generated passwords and the local PKI."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from runbook.cluster.render import Paths
from runbook.core.context import RunContext
from runbook.credentials.pki import Pki
from runbook.credentials.secrets import ensure_secrets, redact
from runbook.inventory import Host

_SECRETS_LOCK = threading.Lock()


@dataclass
class Ctx(RunContext):
    _secrets: dict | None = field(default=None, repr=False)

    @cached_property
    def paths(self) -> Paths:
        return Paths(pg_major=self.inventory.cluster.postgres_major, os=self.inventory.cluster.os)

    def paths_for(self, host: Host) -> Paths:
        """The paths of *host*: its own distribution (a host may override cluster.os), the cluster's major."""
        if host.os == self.paths.os:
            return self.paths
        return Paths.of(host, self.inventory.cluster.postgres_major)

    @property
    def secrets(self) -> dict:
        """state/secrets.yml, generated once; thread-safe (hosts are decided in parallel). A dry run or an
        export never writes it: what is missing is generated in memory for this run only."""
        with _SECRETS_LOCK:
            if self._secrets is None:
                self._secrets = ensure_secrets(self.state_dir, write=self.writes_state)
            return self._secrets

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @cached_property
    def pki(self) -> Pki:
        """The CA and host certificates of state/pki; in memory only for what a dry run or export lacks."""
        return Pki(self.pki_dir, write=self.writes_state)

    def redact(self, text: str) -> str:
        """Mask every known secret; before the secrets exist there is nothing to mask."""
        if not text or (self._secrets is None and not (self.state_dir / "secrets.yml").exists()):
            return text
        return redact(text, self.secrets)
