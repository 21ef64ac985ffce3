"""What a step sees: the inventory, the transports, the ledger, paths, secrets and run options."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from runbook.core.ledger import Ledger
from runbook.core.observer import Observer, SilentObserver
from runbook.core.transport import LocalTransport, Transport
from runbook.inventory import LOCAL, Host, Inventory
from runbook.inventory.settings import Settings

if TYPE_CHECKING:
    from runbook.credentials.pki import Pki

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
    ledger: Ledger = field(default=None)  # type: ignore[assignment]  # set by the session before any step
    selected: list = field(default_factory=list)  # the hosts --hosts selected (all by default)
    observer: Observer = field(default_factory=SilentObserver)
    read_only: bool = False  # export, status views: like a dry run, create no secrets, CA or certificate
    settings: Settings | None = None  # the validated `runbook` config section (None: library use)
    _secrets: dict | None = field(default=None, repr=False)

    def transport_for(self, host: Host) -> Transport:
        return self.local if host.name == LOCAL.name else self.transport

    @cached_property
    def paths(self):
        from runbook.cluster.render import Paths

        return Paths(pg_major=self.inventory.cluster.postgres_major)

    @property
    def writes_state(self) -> bool:
        """May this run create state (secrets.yml, the CA, certificates)? Not a dry run, export or a view."""
        return not (self.read_only or self.options.dry)

    @property
    def secrets(self) -> dict:
        """state/secrets.yml, generated once; thread-safe (hosts are decided in parallel). A dry run or an
        export never writes it: what is missing is generated in memory for this run only."""
        from runbook.credentials.secrets import ensure_secrets

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
        from runbook.credentials.pki import Pki

        return Pki(self.pki_dir, write=self.writes_state)

    def redact(self, text: str) -> str:
        """Mask every known secret; before the secrets exist there is nothing to mask."""
        if not text or (self._secrets is None and not (self.state_dir / "secrets.yml").exists()):
            return text
        from runbook.credentials.secrets import redact

        return redact(text, self.secrets)
