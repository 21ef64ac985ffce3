"""What a step sees: the inventory, the transports, the ledger, paths, secrets and run options."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from runbook.core.observer import Observer, SilentObserver
from runbook.core.transport import LocalTransport, Transport
from runbook.inventory import LOCAL, Host, Inventory

_SECRETS_LOCK = threading.Lock()


@dataclass
class Options:
    dry: bool = False
    step: bool = False  # ask before every step
    verify: bool = False  # re-check done steps against reality
    destroy_data: bool = False  # rollback may delete a non-empty data directory
    parallel: int = 16
    answer: Callable[[str], str] | None = None  # --step prompt; injectable for tests


@dataclass
class Ctx:
    inventory: Inventory
    transport: Transport
    state_dir: Path
    bundle_dir: Path
    options: Options = field(default_factory=Options)
    local: Transport = field(default_factory=LocalTransport)
    ledger: object = None  # runbook.ledger.Ledger, set by the engine
    selected: list = field(default_factory=list)
    observer: Observer = field(default_factory=SilentObserver)
    settings: dict = field(default_factory=dict)  # the `runbook` config section (until the settings model)
    _secrets: dict | None = field(default=None, repr=False)  # the hosts --hosts selected (all by default)

    def transport_for(self, host: Host) -> Transport:
        return self.local if host.name == LOCAL.name else self.transport

    @cached_property
    def paths(self):
        from runbook.cluster.render import Paths

        return Paths(pg_major=self.inventory.cluster.postgres_major)

    @property
    def secrets(self) -> dict:
        """state/secrets.yml, generated once; thread-safe (hosts are decided in parallel)."""
        from runbook.credentials.secrets import ensure_secrets

        with _SECRETS_LOCK:
            if self._secrets is None:
                self._secrets = ensure_secrets(self.state_dir)
            return self._secrets

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    def redact(self, text: str) -> str:
        """Mask every known secret; before the secrets exist there is nothing to mask."""
        if not text or not (self.state_dir / "secrets.yml").exists():
            return text
        from runbook.credentials.secrets import redact

        return redact(text, self.secrets)
