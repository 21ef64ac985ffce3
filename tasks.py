"""pg-ha-runbook tasks: `inv --list` shows them all; `inv --help TASK` explains one."""
import atexit
import gc

# The inv process is short-lived and its start-up allocates ~600 modules' objects, none of them garbage: the
# cyclic collector would walk them again and again (~25 ms of a `--verify`), and once more at exit (~50 ms
# before the process ends). So: no collection while the tasks load, what they loaded moved out of the
# collector's sight (gc.freeze), and the same at exit, before the interpreter tears down (whatever still
# holds an object then is freed by reference counting as before; nothing is skipped but the walk).
gc.disable()
try:
    from runbook.tasks import ns
finally:
    gc.freeze()
    gc.enable()
atexit.register(gc.freeze)

__all__ = ["ns"]
