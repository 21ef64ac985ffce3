"""What the engine sees of a run: the inventory, the transports, the ledger, the observer and run options.

Nothing here knows etcd or Patroni: the cluster's own material (paths on the hosts, passwords, the PKI)
is added by runbook.cluster.context.Ctx, the context the sections, procedures and tasks use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runbook.core.ledger import Ledger
from runbook.core.observer import Observer, SilentObserver
from runbook.core.transport import LocalTransport, Transport
from runbook.inventory import LOCAL, Host, Inventory
from runbook.inventory.settings import Settings


@dataclass
class Options:
    dry: bool = False
    step: bool = False  # ask before every step
    verify: bool = False  # re-check done steps against reality
    destroy_data: bool = False  # rollback may delete a non-empty data directory
    parallel: int = 16
    answer: Callable[[str], str] | None = None  # --step prompt; injectable for tests


@dataclass
class RunContext:
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

    def transport_for(self, host: Host) -> Transport:
        return self.local if host.name == LOCAL.name else self.transport

    @property
    def writes_state(self) -> bool:
        """May this run create state (secrets.yml, the CA, certificates)? Not a dry run, export or a view."""
        return not (self.read_only or self.options.dry)

    def redact(self, text: str) -> str:
        """Mask every secret the run knows before text is shown or stored (here: none)."""
        return text
