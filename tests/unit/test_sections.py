"""The real sections through the fake transport: every step renders, plans, exports; secrets stay masked."""
from __future__ import annotations

from runbook.core.engine import apply
from runbook.core.export import export_markdown
from runbook.sections import all_steps, section_steps


def test_sections_are_in_walkthrough_order():
    names = [s.name for s in all_steps()]
    assert names[:2] == ["bundle.verify", "bundle.push"]
    assert names.index("etcd.pki") < names.index("etcd.tls") < names.index("etcd.config") \
        < names.index("etcd.unit") < names.index("etcd.start") < names.index("etcd.existing")
    assert names.index("etcd.existing") < names.index("postgres.packages") < names.index("patroni.venv") \
        < names.index("patroni.validate") < names.index("patroni.bootstrap") < names.index("patroni.replicas") \
        < names.index("cluster.verify")
    assert len(set(names)) == len(names)
    for s in all_steps():
        assert s.doc.strip(), f"{s.name} has no help text"


def test_dry_plan_of_the_whole_runbook_touches_nothing(ctx, inv, bundle):
    ctx.options.dry = True
    report = apply(ctx, all_steps(), inv.hosts)
    assert ctx.transport.writes == [] and ctx.transport.calls == []
    hosts_of = {}
    for d in report.plan:
        hosts_of.setdefault(d.step.name, set()).add(d.host.name)
    assert hosts_of["etcd.start"] == {"etcd01", "etcd02", "etcd03"}
    assert hosts_of["etcd.names"] == set(inv.names())
    assert hosts_of["patroni.bootstrap"] == {"node01"} and hosts_of["patroni.replicas"] == {"node02"}
    assert hosts_of["etcd.pki"] == {"local"}


def test_section_on_selected_hosts_only(ctx, inv, bundle):
    ctx.options.dry = True
    report = apply(ctx, section_steps("etcd"), inv.select("etcd01"))
    assert {d.host.name for d in report.plan} <= {"etcd01", "local"}


def test_export_is_complete_and_masks_secrets(ctx, inv, bundle):
    text = export_markdown(ctx, all_steps())
    for s in all_steps():
        assert f"### {s.name}:" in text
    assert "#### patroni.config on node02" in text
    assert "--config-file=/etc/etcd/etcd.conf.yml" in text
    assert "pip install --quiet --no-index" in text and "--require-hashes" in text
    for entry in ctx.secrets.values():
        assert entry["password"] not in text
    assert "PRIVATE KEY" not in text  # keys are referenced by their local path, never shown
    assert "pki/etcd01/etcd-peer.key" in text and "pki/node01/etcd-client.key" in text


def test_tls_keys_are_0600_owned_by_the_service_user(ctx, inv, bundle):
    from runbook.core.step import Put

    keys = [a for s in all_steps() if s.name in ("etcd.tls", "postgres.tls")
            for h in inv.role(s.role) for a in s.actions_fn(ctx, h)
            if isinstance(a, Put) and a.path.endswith(".key")]
    assert len(keys) == 3 * 3 + 2 * 4  # etcd: peer, server, root; postgres: etcd-client, rest x2, pg-server
    assert {(k.mode, k.owner) for k in keys} == {("0600", "etcd"), ("0600", "postgres"), ("0600", "root")}
    assert {k.path.rsplit("/", 1)[1] for k in keys if k.owner == "root"} == {"etcd-root.key"}
    from runbook.sections.patroni import config

    conf = [a for h in inv.postgres for a in config.actions_fn(ctx, h)
            if isinstance(a, Put) and a.path == "/etc/patroni/config.yml"]
    assert conf and all(c.mode == "0600" and c.owner == "postgres" and c.secret for c in conf)
