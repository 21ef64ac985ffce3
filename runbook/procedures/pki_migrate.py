"""`pki.migrate`: a cluster installed with one certificate per host (state/pki/<host>.crt, no etcd auth) moved to
certificates by purpose, a peer CA and etcd RBAC without losing etcd's quorum or Patroni's leader.

Why `cluster.up` does not do it (it refuses while state/pki holds such certificates, see `refusal`): its steps
would put etcd's peer trust on the peer CA host by host, but a member restarted so trusts none of the others
(their peer certificates are of the main CA) and they do not trust it: two members restarted one after the
other leave no quorum. And `etcd.auth` runs before Patroni has credentials and its CN-less client certificate
(Patroni reads its etcd certificate only when it starts): Patroni would lose its DCS. The safe order:

1. issue        every certificate of the new model in state/pki (the step etcd.pki)
2. etcd-files   on each etcd host the new files, ``peer-trust.crt`` (main CA + peer CA) and, as etcd-peer.*,
                the host's current peer pair (the one-per-host certificate, still of the main CA)
3. etcd-trust   one etcd host at a time: the final config but with peer trust ``peer-trust.crt``, restart, every
                member healthy before the next host (peers present main-CA certificates: all trusted)
4. etcd-peer    one etcd host at a time: the real etcd-peer pair (peer CA) written; etcd reads it at the next
                handshake (no restart), proven served on 2380, every member healthy
5. etcd-config  one etcd host at a time: the final config (peer trust: the peer CA only), restart, healthy;
                then the ectl wrapper on the etcd-root certificate (the step etcd.ectl)
6. patroni-files the new files in Patroni's TLS directory (the old ones stay until the restart below)
7. pause        Patroni's maintenance mode: a Patroni stopped now leaves PostgreSQL running
8. patroni      replicas first, the leader last: the final config.yml (new certificates, the etcd user
                patroni and its password: tolerated while etcd auth is off), `systemctl restart patroni`
                (the only way Patroni takes a new etcd client certificate), the member back, the new REST and
                PostgreSQL certificates proven served
9. resume       maintenance mode off
10. auth        etcd RBAC on (the step etcd.auth): Patroni already logs in as patroni
11. legacy      the one-per-host certificates of state/pki moved to state/pki/legacy/ (cluster.up works again)

Each step is a ledger step of one operation (membership_ops): --dry, --step, --export, resumable. The install
sections' steps it reuses (etcd.pki, etcd.auth) keep their records, so that `cluster.up` afterwards finds them
done; its own steps' checks compare the files and services with the wanted state.
"""
from __future__ import annotations

from dataclasses import replace

from runbook.cluster.commands import etcdctl, member_ok, patronictl
from runbook.cluster.context import Ctx
from runbook.cluster.render import etcd_context
from runbook.core.step import Local, Put, Run, Section, Step, wait_for
from runbook.credentials.purposes import PEER_CA, for_role
from runbook.inventory import Host
from runbook.sections.frontdoor import restart_patroni_held
from runbook.sections.tls_files import SERVE_WAIT, SERVED_BY, leaf_actions, serve_new_cert

OP = "pki-migrate"
ORDER = 75
TRUST = "peer-trust.crt"  # main CA + peer CA, etcd's peer trust while the peers change certificates
HEALTH_WAIT = 90


def legacy_hosts(ctx: Ctx) -> list[str]:
    """Inventory hosts whose one-per-host certificate (state/pki/<host>.crt, before certificates by purpose) is
    still in state/pki."""
    return [h.name for h in ctx.inventory.hosts if (ctx.pki_dir / f"{h.name}.crt").is_file()]


def refusal(ctx: Ctx, command: str) -> str | None:
    """Why *command* must not run on this state/pki (None: it may); also while a CA rotation is unfinished."""
    from runbook.procedures.pki_rotate_ca import rotation_refusal

    if why := rotation_refusal(ctx, command):
        return why
    old = legacy_hosts(ctx)
    if not old:
        return None
    return (f"{command} refused: state/pki ({ctx.pki_dir}) holds one certificate per host for {', '.join(old)}: this "
            "cluster was installed before certificates by purpose, the etcd peer CA and etcd RBAC. Converging it "
            "step by step would restart etcd members that trust only the new peer CA (two of them: no quorum) and "
            "turn etcd auth on before Patroni has its credentials (the leader loses its DCS). Run `inv pki.migrate` "
            "(--dry shows its plan): it moves the cluster over in an order that keeps quorum and the leader; "
            f"then `inv {command}`.")


def etcd_healthy_wait(ctx: Ctx, host: Host) -> str:
    """Shell, run on an etcd host: wait (bounded, HEALTH_WAIT s) until every etcd member answers healthy."""
    endpoints = ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd)
    return wait_for(etcdctl(ctx, host, "endpoint health", endpoints), HEALTH_WAIT)


def _conf(ctx: Ctx, host: Host, trust_both: bool) -> Put:
    from runbook.sections.units import template

    c = etcd_context(ctx.inventory, host, ctx.paths, initial_cluster_state="existing")
    if trust_both:
        c["peer_trusted_ca_file"] = f"{ctx.paths.etcd_tls_dir}/{TRUST}"
    return template("etcd/etcd.conf.yml.j2", ctx.paths.etcd_conf, c, mode="0640", group="etcd")


def _restart(ctx: Ctx, host: Host, conf: Put) -> list:
    return [conf, Run("systemctl restart etcd", timeout=120),
            Run(etcd_healthy_wait(ctx, host), timeout=HEALTH_WAIT + 30)]


def _conf_check(ctx: Ctx, host: Host, conf: Put) -> str:
    return (f"test \"$(sha256sum < {ctx.paths.etcd_conf} | cut -c1-64)\" = {conf.sha256} && "
            f"systemctl is-active -q etcd && {etcdctl(ctx, host, 'endpoint health')}")


def _rolling_config(sec: Section, name: str, trust_both: bool, doc: str) -> Step:
    """A serial step: etcd's config (peer trust both CAs, or the peer CA alone) and a restart, member by member."""
    def actions(ctx: Ctx, h: Host) -> list:
        return _restart(ctx, h, _conf(ctx, h, trust_both))

    def check(ctx: Ctx, h: Host) -> str:
        return _conf_check(ctx, h, _conf(ctx, h, trust_both))

    actions.__doc__ = doc
    step = sec.step(name, role="etcd", kind="serial", host_order=_by_name)(actions)
    return replace(step, check_fn=check)


def _by_name(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    return sorted(hosts, key=lambda h: h.name)


def migrate_steps(ctx: Ctx) -> list[Step]:
    from runbook.sections import section_steps
    from runbook.sections.patroni import _config as patroni_conf

    own = {s.name: s for s in section_steps("etcd")}
    sec = Section("pki.migrate", ORDER, "move a one-certificate-per-host cluster to certificates by purpose")
    tls = ctx.paths.etcd_tls_dir

    @sec.step("etcd-files", role="etcd")
    def etcd_files(ctx: Ctx, h: Host) -> list:
        """The new model's files beside the old ones; etcd-peer.* still hold the host's current (main CA) pair
        and peer-trust.crt trusts both CAs: nothing changes for etcd until it restarts."""
        old_crt, old_key = ctx.pki_dir / f"{h.name}.crt", ctx.pki_dir / f"{h.name}.key"
        acts: list = [Run(f"install -d -m 0750 -o etcd -g etcd {tls}"),
                      Put(f"{tls}/ca.crt", ctx.pki.ca_pem(), mode="0644", owner="etcd"),
                      Put(f"{tls}/peer-ca.crt", ctx.pki.ca_pem(PEER_CA), mode="0644", owner="etcd"),
                      Put(f"{tls}/{TRUST}", ctx.pki.ca_pem() + ctx.pki.ca_pem(PEER_CA), mode="0644", owner="etcd")]
        for p in for_role("etcd", ctx.inventory):
            if p.ca == PEER_CA:  # the current pair under the new name, until etcd-peer
                if old_crt.exists():
                    acts += [Put(f"{tls}/{p.name}.crt", old_crt.read_bytes(), mode="0644", owner=p.owner),
                             Put(f"{tls}/{p.name}.key", old_key.read_bytes(), mode="0600", owner=p.owner,
                                 secret=True, local_copy=str(old_key))]
            else:
                acts += leaf_actions(ctx, h, tls, p, prove=False)
        return acts

    etcd_trust = _rolling_config(sec, "etcd-trust", True, "One member at a time: the final config but peer "
                                 "trust = both CAs; restart; every member healthy")

    @sec.step("etcd-peer", role="etcd", kind="serial", host_order=_by_name)
    def etcd_peer(ctx: Ctx, h: Host) -> list:
        """One member at a time: the real etcd-peer pair (peer CA), read at the next handshake; proven served
        on 2380, every member healthy"""
        peer = next(p for p in for_role("etcd") if p.ca == PEER_CA)
        return [*leaf_actions(ctx, h, tls, peer, prove=False),
                Run(serve_new_cert(h, f"{tls}/{peer.name}.crt", *SERVED_BY[peer.name]), timeout=SERVE_WAIT + 60),
                Run(etcd_healthy_wait(ctx, h), timeout=HEALTH_WAIT + 30)]

    etcd_config = _rolling_config(sec, "etcd-config", False, "One member at a time: the final config (peer "
                                  "trust: the peer CA only); restart; every member healthy")

    @sec.step("patroni-files", role="postgres")
    def patroni_files(ctx: Ctx, h: Host) -> list:
        """The new model's files in Patroni's TLS directory, beside the old ones (Patroni still reads those)"""
        d = ctx.paths.patroni_tls_dir
        acts: list = [Put(f"{d}/ca.crt", ctx.pki.ca_pem(), mode="0644", owner="postgres")]
        for p in for_role("postgres", ctx.inventory):
            if p.tls_dir is None:
                acts += leaf_actions(ctx, h, d, p, prove=False)
        return acts

    first = lambda ctx, hosts: hosts[:1]  # noqa: E731

    @sec.step("pause", role="postgres", only=first)
    def pause(ctx: Ctx, h: Host) -> list:
        """Patroni's maintenance mode: a Patroni restarted now leaves PostgreSQL running"""
        return [Run(f"{patronictl(ctx, 'pause --wait')} || {patronictl(ctx, 'list')} | grep -q 'Maintenance mode: on'",
                    timeout=120)]

    @sec.step("patroni", role="postgres", kind="serial", host_order=_leader_last)
    def patroni(ctx: Ctx, h: Host) -> list:
        """Replicas first, the leader last: the final config.yml, Patroni restarted (PostgreSQL stays up: paused),
        the member back, the new REST API and PostgreSQL certificates proven served"""
        d = ctx.paths.patroni_tls_dir
        back = Run(wait_for(member_ok(ctx, h), HEALTH_WAIT), timeout=HEALTH_WAIT + 30)
        return [patroni_conf(ctx, h), *restart_patroni_held(ctx, h, back),
                *[Run(serve_new_cert(h, f"{d}/{n}.crt", *SERVED_BY[n]), timeout=SERVE_WAIT + 60)
                  for n in ("rest-server", "pg-server")]]

    @patroni.check
    def _patroni_check(ctx: Ctx, h: Host) -> str:
        conf = patroni_conf(ctx, h)
        return (f"test \"$(sha256sum < {ctx.paths.patroni_conf} | cut -c1-64)\" = {conf.sha256} && "
                f"systemctl is-active -q patroni && {member_ok(ctx, h)} && "
                # started after the config was written: it reads the etcd client certificate only at start
                f"test \"$(stat -c %Y {ctx.paths.patroni_conf})\" -le "
                "\"$(date -d \"$(systemctl show -p ActiveEnterTimestamp --value patroni)\" +%s)\"")

    @sec.step("resume", role="postgres", only=first)
    def resume(ctx: Ctx, h: Host) -> list:
        """Maintenance mode off"""
        return [Run(f"{patronictl(ctx, 'resume --wait')} || ! {patronictl(ctx, 'list')} | grep -q 'Maintenance "
                    "mode: on'", timeout=120)]

    @sec.step("legacy", role="local")
    def legacy(ctx: Ctx, h: Host) -> list:
        """The one-per-host certificates of state/pki moved to state/pki/legacy/ (cluster.up works again)"""
        def run() -> str:
            dest = ctx.pki_dir / "legacy"
            dest.mkdir(mode=0o700, exist_ok=True)
            moved = [f for n in legacy_hosts(ctx) for f in (ctx.pki_dir / f"{n}.crt", ctx.pki_dir / f"{n}.key")
                     if f.exists()]
            for f in moved:
                f.replace(dest / f.name)
            return f"{len(moved)} file(s) moved to {dest}"
        return [Local("move the one-per-host certificates to state/pki/legacy/", run)]

    @legacy.check
    def _legacy_check(ctx: Ctx, h: Host) -> bool:
        return not legacy_hosts(ctx)

    return [own["etcd.pki"], etcd_files, etcd_trust, etcd_peer, etcd_config, own["etcd.ectl"], patroni_files, pause,
            patroni, resume, own["etcd.auth"], legacy]


def _leader_last(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    from runbook.procedures.pki_rotate import leader_last

    return leader_last(ctx, hosts)
