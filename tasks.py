"""pg-ha-runbook tasks: `inv --list` shows them all; `inv --help TASK` explains one."""
from runbook.tasks import ns

__all__ = ["ns"]
