"""pg-ha-runbook tasks: `inv --list` shows them all; `inv --help TASK` explains one."""
from invoke import Collection

from runbook import admin, audit, commands, drill
from runbook.bundle import tasks as bundle_tasks
from runbook.cli import DEFAULTS, check_env, section_install
from runbook.lab import tasks as lab_tasks
from runbook.sections import section_steps

check_env()  # a bad INVOKE_RUNBOOK_* is one clear error, before invoke casts or ignores it
ns = Collection()
for col in commands.collections():
    ns.add_collection(col)
ns.add_collection(admin.ns)
ns.add_collection(drill.ns)
ns.collections["cluster"].add_task(audit.audit)
ns.add_collection(lab_tasks.ns)
bundle = bundle_tasks.ns
bundle.add_task(section_install("bundle", lambda: section_steps("bundle"),
                                "Verify the bundle and push what each host needs to /opt/runbook-bundle."),
                name="push")
ns.add_collection(bundle)
ns.configure({"runbook": dict(DEFAULTS)})
