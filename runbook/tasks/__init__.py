"""The invoke collections, composed in one place: tasks.py only imports `ns` from here."""
from invoke import Collection

from runbook.bundle import tasks as bundle_tasks
from runbook.inventory.settings import DEFAULTS
from runbook.lab import tasks as lab_tasks
from runbook.sections import section_steps
from runbook.tasks import backup, membership, pki, records, update
from runbook.tasks.procedures import audit, drill, maintain, secrets
from runbook.tasks.sections import collections
from runbook.tasks.session import check_env, section_install

check_env()  # a bad INVOKE_RUNBOOK_* is one clear error, before invoke casts or ignores it
ns = Collection()
for col in collections():
    ns.add_collection(col)
ns.add_collection(records.ns)
ns.add_collection(backup.ns)
drill.add_task(backup.drill_restore, name="restore")
ns.add_collection(pki.ns)
ns.add_collection(drill)
ns.add_collection(secrets)
ns.collections["cluster"].add_task(audit)
ns.collections["cluster"].add_task(update.update)
ns.collections["etcd"].add_task(maintain)
for t in (membership.remove, membership.reinit, membership.replace):
    ns.collections["patroni"].add_task(t)
for t, name in ((membership.etcd_add, "add"), (membership.etcd_remove, "remove"), (membership.etcd_replace, "replace")):
    ns.collections["etcd"].add_task(t, name=name)
ns.add_collection(lab_tasks.ns)
bundle = Collection("bundle")  # a copy: adding `push` must not change runbook.bundle.tasks.ns itself
for name, t in bundle_tasks.ns.tasks.items():
    bundle.add_task(t, name=name)
bundle.add_task(section_install("bundle", lambda: section_steps("bundle"),
                                "Verify the bundle and push what each host needs to /opt/runbook-bundle."),
                name="push")
ns.add_collection(bundle)
ns.configure({"runbook": dict(DEFAULTS)})
