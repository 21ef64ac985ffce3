"""cluster.update's plan: which hosts, in which order, what a resume skips (pure; no hosts)."""
from __future__ import annotations

import pytest

from runbook.procedures.update_plan import (
    BundleFacts,
    HostFacts,
    Plan,
    deb_compare,
    parse_dpkg,
    parse_etcd_version,
    parse_patroni_version,
    plan_update,
    release_compare,
)

NEW = BundleFacts({"postgresql-15": "15.20-0+deb12u1", "postgresql-client-15": "15.20-0+deb12u1",
                   "libpq5": "15.20-0+deb12u1", "python3-venv": "3.11.2-1+b1"}, "4.1.5", "3.5.16")
OLD_DEBS = {"postgresql-15": "15.18-0+deb12u1", "postgresql-client-15": "15.18-0+deb12u1",
            "libpq5": "15.18-0+deb12u1", "python3-venv": "3.11.2-1+b1"}
ETCD, PG = ["etcd01", "etcd02", "etcd03"], ["node01", "node02"]


def facts(debs=None, patroni="4.1.5", etcd="3.5.16") -> dict[str, HostFacts]:
    out = {h: HostFacts(debs=dict(debs or NEW.debs), patroni=patroni) for h in PG}
    out.update({h: HostFacts(etcd=etcd) for h in ETCD})
    return out


def plan(f, pg_leader="node01", etcd_leader="etcd02", **kw) -> Plan:
    return plan_update(NEW, f, etcd_hosts=ETCD, pg_hosts=PG, pg_leader=pg_leader, etcd_leader=etcd_leader,
                       major=15, **kw)


def steps(p: Plan) -> list[str]:
    return [i.step for i in p.items]


def test_nothing_differs_nothing_planned():
    p = plan(facts())
    assert p.items == () and p.problems == ()


def test_postgres_minor_replicas_first_then_switchover_then_old_leader():
    p = plan(facts(OLD_DEBS), pg_leader="node01")
    assert steps(p) == ["postgres-node02", "switchover", "postgres-node01"]
    node02 = p.items[0]
    assert node02.packages == ("libpq5", "postgresql-15", "postgresql-client-15")  # python3-venv is the same
    assert "postgresql-15 15.18-0+deb12u1 -> 15.20-0+deb12u1" in node02.what
    # the other leader: the other order
    assert steps(plan(facts(OLD_DEBS), pg_leader="node02")) == ["postgres-node01", "switchover", "postgres-node02"]


def test_only_the_replica_differs_no_switchover():
    f = facts()
    f["node02"] = HostFacts(debs=dict(OLD_DEBS), patroni="4.1.5")
    assert steps(plan(f, pg_leader="node01")) == ["postgres-node02"]


def test_same_version_reinstall_is_said_in_the_plan():
    p = plan(facts(), reinstall=True)
    assert steps(p) == ["postgres-node02", "switchover", "postgres-node01"]
    assert all(i.what.startswith("same version: reinstall") for i in p.items if i.kind == "postgres")
    assert p.items[0].packages == ("postgresql-15", "postgresql-client-15", "libpq5")


def test_patroni_under_pause_replica_first_resume_last():
    p = plan(facts(patroni="4.1.4"), pg_leader="node02")
    assert steps(p) == ["pause", "patroni-node01", "patroni-node02", "resume"]
    assert p.items[1].what == "Patroni 4.1.4 -> 4.1.5"


def test_etcd_one_at_a_time_leader_last():
    p = plan(facts(etcd="3.5.15"), etcd_leader="etcd01")
    assert steps(p) == ["etcd-etcd02", "etcd-etcd03", "etcd-etcd01"]
    assert p.items[0].what == "etcd 3.5.15 -> 3.5.16"


def test_everything_in_order_etcd_then_patroni_then_postgres():
    f = facts(OLD_DEBS, patroni="4.1.4")
    f["etcd03"] = HostFacts(etcd="3.5.15")
    assert steps(plan(f)) == ["etcd-etcd03", "pause", "patroni-node02", "patroni-node01", "resume",
                              "postgres-node02", "switchover", "postgres-node01"]


def test_a_downgrade_is_refused_unless_allowed():
    newer = {k: v.replace("15.20", "15.21") for k, v in NEW.debs.items()}
    p = plan(facts(newer, patroni="4.1.6"))
    assert any("node01: installed packages are newer" in x for x in p.problems)
    assert any("Patroni 4.1.6 is newer than the bundle's 4.1.5" in x for x in p.problems)
    assert plan(facts(newer, patroni="4.1.6"), allow_downgrade=True).problems == ()


def test_no_leader_and_a_lone_member_are_refused():
    assert "no running leader" in " ".join(plan(facts(OLD_DEBS), pg_leader=None).problems)
    lone = plan_update(NEW, {"node01": HostFacts(debs=OLD_DEBS)}, etcd_hosts=[], pg_hosts=["node01"],
                       pg_leader="node01", etcd_leader=None, major=15)
    assert "only PostgreSQL member" in " ".join(lone.problems)


def test_a_half_installed_package_counts_as_missing():
    text = ("postgresql-15 15.20-0+deb12u1 iF \nlibpq5 15.20-0+deb12u1 ii \n"
            "postgresql-client-15 15.20-0+deb12u1 ii \n")
    f = facts()
    f["node02"] = HostFacts(debs=parse_dpkg(text), patroni="4.1.5")
    p = plan(f)
    assert steps(p) == ["postgres-node02"] and p.items[0].packages == ("postgresql-15", "python3-venv")


def test_the_plan_survives_the_ledger_unchanged():
    p = plan(facts(OLD_DEBS, patroni="4.1.4"))
    assert Plan.from_json(p.to_json()) == p


@pytest.mark.parametrize(("a", "b", "want"), [
    ("15.18-0+deb12u1", "15.20-0+deb12u1", -1), ("15.20-0+deb12u1", "15.20-0+deb12u1", 0),
    ("1:1.0-1", "2.0-1", 1), ("1.0~rc1-1", "1.0-1", -1), ("2.9.13", "2.9.9", 1), ("1.0-1+b1", "1.0-1", 1),
])
def test_debian_version_order(a, b, want):
    assert deb_compare(a, b) == want


def test_parsers():
    assert parse_patroni_version("patroni 4.1.4\n") == "4.1.4" and parse_patroni_version("") == ""
    assert parse_etcd_version("etcd Version: 3.5.16\nGit SHA: x\n") == "3.5.16"
    assert release_compare("4.1.10", "4.1.9") == 1 and release_compare("3.5.16", "3.5.16") == 0


def test_bundles_for_an_update_drill_older_patroni_older_postgresql():
    from runbook.bundle.debs import packages, pin_postgres, sources_list
    from runbook.bundle.sources import DebianMirrors
    from runbook.bundle.wheels import DEFAULT_REQUIREMENTS, requirements_for
    from runbook.inventory.settings import DEFAULTS

    assert DEFAULTS["patroni_version"] == "4.1.5" and requirements_for() == DEFAULT_REQUIREMENTS
    assert requirements_for("4.1.4")[0] == "patroni[etcd3]==4.1.4"
    v = "15.18-0+deb12u1"
    assert pin_postgres(packages(15), 15, v) == [f"postgresql-15={v}", f"postgresql-client-15={v}", "python3-venv",
                                                 "pgbouncer", "pgbackrest", f"libpq5={v}"]
    assert pin_postgres(packages(15), 15, "") == packages(15)
    m = DebianMirrors("http://mirror.invalid/debian", "http://mirror.invalid/debian-security")
    assert sources_list(m, release_only=True) == "deb http://mirror.invalid/debian bookworm main\n"
    assert "bookworm-security" in sources_list(m)


def test_patroni_version_setting_is_checked():
    from runbook.inventory.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="runbook.patroni_version = 'latest': must be a Patroni release"):
        load_settings({"patroni_version": "latest"}, files=[], environ={})
    assert load_settings({"patroni_version": "4.1.4"}, files=[], environ={}).patroni_version == "4.1.4"
