"""One exception hierarchy: everything the runbook raises on purpose is a RunbookError.

Its message says what happened, where (file and YAML path, host, step) and what to do next; the invoke
layer (runbook.tasks.session) turns it into one line on stderr and an exit code, never a traceback.
"""


class RunbookError(Exception):
    """A failure the runbook reports on purpose; `exit_code` is what the command exits with."""

    exit_code = 2


class InventoryError(RunbookError):
    """hosts.yml (or --hosts, or a setting) is wrong; the message says where and what to do."""


class ProcedureFailed(RunbookError):
    """A day-2 procedure (switchover, audit, drill, ...) stopped: a pre-check refused, or a post-check failed."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code
