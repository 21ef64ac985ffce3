"""e2e fixtures: the lab (real air-gapped systemd hosts on this machine) for every e2e test.

`lab` brings up the repo's hosts.yml (or $RUNBOOK_E2E_INVENTORY) once per session and yields the
Inventory; it tears the lab down at the end unless RUNBOOK_KEEP_LAB=1. lab.up is idempotent and
takes well under a second when the lab is already up, so keeping it between runs is cheap.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from runbook.inventory import Inventory, load_inventory

REPO = Path(__file__).resolve().parents[2]


def lab_prerequisites() -> str | None:
    """Why the lab cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [t for t in ("systemd-nspawn", "debootstrap", "ip", "ssh", "ssh-keygen") if not shutil.which(t)]
    if missing:
        return f"the lab needs {', '.join(missing)} (apt install systemd-container debootstrap iproute2 openssh-client)"
    return None


def e2e_inventory_path() -> Path:
    return Path(os.environ.get("RUNBOOK_E2E_INVENTORY") or REPO / "hosts.yml")


@pytest.fixture(scope="session")
def lab_prerequisites_met() -> None:
    """Fail (never skip) when this machine cannot run the lab: e2e tests prove the runbook on real hosts."""
    why = lab_prerequisites()
    if why:
        pytest.fail(f"{why}; run `make deps` as root (CI does)", pytrace=False)


@pytest.fixture(scope="session")
def lab(lab_prerequisites_met) -> Inventory:
    """The e2e inventory's hosts, up and answering SSH (created on first use)."""
    from runbook.lab import lab as labmod

    inv = load_inventory(e2e_inventory_path())
    labmod.up(inv)
    yield inv
    if os.environ.get("RUNBOOK_KEEP_LAB") != "1":
        labmod.down(inv)


@pytest.fixture(scope="session")
def lab_transport(lab):
    """A runbook SshTransport to the lab's hosts (closed at the end of the session)."""
    from runbook.core.transport import SshTransport

    t = SshTransport()
    yield t
    t.close()


@pytest.fixture(scope="session")
def cluster(lab, tmp_path_factory):
    """(inventory, state dir): the lab's hosts made bare again, the bundle built, an empty runbook state.

    One per session: test_cluster installs on it from bare hosts; later modules use `converged`."""
    from helpers import inv

    from runbook.lab import lab as labmod

    labmod.down(lab)
    labmod.up(lab)
    state = tmp_path_factory.mktemp("runbook") / "state"
    inv(state, "bundle.build", timeout=1200)
    return lab, state


@pytest.fixture(scope="module")
def converged(cluster):
    """The session's cluster, converged and verified against reality (repairs what an earlier drill left)."""
    from helpers import inv

    inventory, state = cluster
    inv(state, "cluster.up", "--verify", timeout=1500)
    return inventory, state


# test_cluster.py installs the session's cluster from bare hosts (kill -9 in the middle, resume): it runs
# before every other module that shares that cluster (the `converged` fixture converges it). test_soak.py
# re-creates the lab hosts and installs its own cluster with its own PKI on them: it runs last, so that no
# module after it finds hosts running a cluster of another CA (etcd reads its trusted CA only at start).
# test_audit_findings.py plants bad states, restores them and vacuums a node's journal: after the modules
# that share the cluster, so that it audits what they left (the audit must be clean once it restored).
# test_pki_migrate.py (make soak only) re-creates the lab hosts too, for a cluster of the old runbook.
MODULE_ORDER = {"test_cluster.py": 0, "test_audit_findings.py": 1.5, "test_pki_migrate.py": 1.9, "test_soak.py": 2}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: MODULE_ORDER.get(item.path.name, 1))  # stable: the order within kept
