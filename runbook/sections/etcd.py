"""etcd section: the walk-through's etcd part, a three-member TLS cluster."""
from __future__ import annotations

import json
import shlex
from dataclasses import replace

from runbook.cluster.commands import etcdctl
from runbook.cluster.context import Ctx
from runbook.cluster.render import etcd_context
from runbook.core.shared import shared
from runbook.core.step import Local, Put, Run, Section, wait_for
from runbook.inventory import Host
from runbook.sections.bundle_files import REMOTE_BUNDLE, manifest, remote, sums
from runbook.sections.tls_files import tls_check, tls_files
from runbook.sections.units import template, unit_actions, unit_undo

section = Section("etcd", 20, "etcd: a three-member cluster with TLS on client and peer traffic")
BEGIN, END = "# BEGIN pg-ha-runbook", "# END pg-ha-runbook"


def _ctx(ctx: Ctx, host: Host, state: str = "new") -> dict:
    return etcd_context(ctx.inventory, host, ctx.paths, initial_cluster_state=state)


# 1 -------------------------------------------------------------------------------------------
def _hosts_block(ctx: Ctx) -> str:
    lines = [BEGIN]
    for h in ctx.inventory.hosts:
        names = " ".join(dict.fromkeys([h.name] + ([h.fqdn] if h.fqdn else [])))
        lines.append(f"{h.address} {names}")
    return "\n".join(lines + [END]) + "\n"


@section.step("names", role="all")
def names(ctx: Ctx, host: Host) -> list:
    """Name resolution: /etc/hosts entries for every cluster host
    The walk-through relies on etcd01.. and node01.. resolving; a managed block is (re)written."""
    return [Run(f"sed -i '/^{BEGIN}$/,/^{END}$/d' /etc/hosts && cat >> /etc/hosts",
                stdin=_hosts_block(ctx).encode())]


@names.check
def _names_check(ctx: Ctx, host: Host) -> str:
    import hashlib

    want = hashlib.sha256(_hosts_block(ctx).encode()).hexdigest()
    return f"test \"$(sed -n '/^{BEGIN}$/,/^{END}$/p' /etc/hosts | sha256sum | cut -d' ' -f1)\" = {want}"


@names.undo
def _names_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"sed -i '/^{BEGIN}$/,/^{END}$/d' /etc/hosts")]


# 2 -------------------------------------------------------------------------------------------
def _tarball(ctx: Ctx):
    return manifest(ctx).etcd_tarball()


@section.step("binaries", role="etcd")
def binaries(ctx: Ctx, host: Host) -> list:
    """Binaries: unpack the bundled release tarball, install etcd, etcdctl (and etcdutl)
    Step 1 of the walk-through (tar -xzf; mv etcd* /usr/bin), from the bundle instead of GitHub. On a
    distribution that ships etcd 3.5 (Debian 13) its own etcd-server/etcd-client packages instead."""
    if ctx.paths_for(host).distro.etcd_source == "deb":
        return _deb_binaries(ctx, host)
    t = _tarball(ctx)
    bindir = ctx.paths.etcd_bin_dir
    d = t.path.rsplit("/", 1)[-1].removesuffix(".tar.gz")
    return [Run(f"set -e; echo '{t.sha256}  {remote(t)}' | sha256sum --quiet -c -; tmp=$(mktemp -d); "
                f"tar -xzf {remote(t)} -C $tmp; for b in etcd etcdctl etcdutl; do "
                f"if [ -f $tmp/{d}/$b ]; then install -m 0755 $tmp/{d}/$b {bindir}/$b; fi; done; rm -rf $tmp"),
            Run(f"{bindir}/etcd --version | grep -qF 'etcd Version: {_version(ctx)}'")]


POLICY_RC = "/usr/sbin/policy-rc.d"


def _deb_binaries(ctx: Ctx, host: Host) -> list:
    """dpkg -i of exactly the manifest's etcd .deb files; the package's own service is not started (its
    default single-member cluster on localhost would write a data dir): a policy-rc.d says no while dpkg
    runs. The runbook's unit (etcd.unit) replaces the package's."""
    debs = manifest(ctx).debs(host.os, "etcd")
    files = " ".join(remote(e) for e in debs)
    b = ctx.paths.etcd_bin_dir
    return [Run("sha256sum --quiet -c -", stdin=sums(debs)),
            Run(f"set -e; own=0; if [ ! -e {POLICY_RC} ]; then printf '#!/bin/sh\\nexit 101\\n' > {POLICY_RC}; "
                f"chmod 0755 {POLICY_RC}; own=1; fi; trap 'if [ $own = 1 ]; then rm -f {POLICY_RC}; fi' EXIT; "
                f"DEBIAN_FRONTEND=noninteractive dpkg -i --skip-same-version {files} >/tmp/runbook-etcd-dpkg.log 2>&1 "
                "|| { tail -20 /tmp/runbook-etcd-dpkg.log >&2; exit 1; }", timeout=900),
            Run(f"{b}/etcd --version | grep -qF 'etcd Version: {_version(ctx)}'")]


def _version(ctx: Ctx) -> str:
    return manifest(ctx).etcd_version or ctx.inventory.cluster.etcd_version


@binaries.check
def _binaries_check(ctx: Ctx, host: Host) -> str:
    b = ctx.paths.etcd_bin_dir
    return f"{b}/etcd --version | grep -qF 'etcd Version: {_version(ctx)}' && test -x {b}/etcdctl"


@binaries.undo
def _binaries_undo(ctx: Ctx, host: Host) -> list:
    b = ctx.paths.etcd_bin_dir
    if ctx.paths_for(host).distro.etcd_source == "deb":
        return [Run("DEBIAN_FRONTEND=noninteractive dpkg -r etcd-server etcd-client >/dev/null 2>&1 || true")]
    return [Run(f"rm -f {b}/etcd {b}/etcdctl {b}/etcdutl")]


# 3 -------------------------------------------------------------------------------------------
def _data_root(ctx: Ctx) -> str:
    return ctx.paths.etcd_data_dir.rsplit("/", 1)[0]  # /var/lib/etcd


@section.step("user", role="etcd", guards_data=lambda ctx, h: _data_root(ctx))
def user(ctx: Ctx, host: Host) -> list:
    """User and directories: system group and user etcd (nologin), data dir 0700, config dir
    Step 2 of the walk-through, with the TLS dir moved out of /etc/default (a file on Debian)."""
    conf_dir = ctx.paths.etcd_conf.rsplit("/", 1)[0]
    return [Run("getent group etcd >/dev/null || groupadd --system etcd"),
            Run(f"id -u etcd >/dev/null 2>&1 || useradd -s /usr/sbin/nologin --system -g etcd -d {_data_root(ctx)} "
                "-M etcd"),
            Run(f"install -d -m 0700 -o etcd -g etcd {_data_root(ctx)}"),
            Run(f"install -d -m 0755 -o root -g root {conf_dir}")]


@user.check
def _user_check(ctx: Ctx, host: Host) -> str:
    return (f"id -u etcd >/dev/null && test \"$(stat -c '%a %U' {_data_root(ctx)})\" = '700 etcd' && "
            "getent passwd etcd | grep -q nologin")


@user.undo
def _user_undo(ctx: Ctx, host: Host) -> list:
    # With --destroy-data on a member that has joined the cluster, the member's data is gone for good:
    # etcd refuses it back under the same member ID; it must be removed and re-added (etcdctl member).
    return [Run(f"rm -rf {_data_root(ctx)}"), Run("id -u etcd >/dev/null 2>&1 && userdel etcd || true"),
            Run("getent group etcd >/dev/null && groupdel etcd || true")]


# 4 -------------------------------------------------------------------------------------------
@section.step("pki", role="local")
def pki(ctx: Ctx, host: Host) -> list:
    """PKI: the CAs under state/pki (made once) and one certificate per host and purpose
    etcd hosts: etcd-peer (peer CA), etcd-server, etcd-root; PostgreSQL hosts: etcd-client, rest-server,
    rest-client, pg-server (runbook/credentials/purposes.py). Server certificates carry the host name, FQDN
    and address as SANs. Reused while valid, re-issued otherwise; made on the control machine."""
    from runbook.sections.tls_files import host_purposes, leaf

    def run() -> str:
        n = 0
        for h in ctx.inventory.hosts:
            for p in host_purposes(h, ctx.inventory):
                leaf(ctx, h, p)
                n += 1
        return f"CAs and {n} certificates ({len(ctx.inventory.hosts)} hosts) in {ctx.pki_dir}"

    key = ";".join(f"{h.name}={h.address},{h.fqdn},{'+'.join(h.roles)}" for h in ctx.inventory.hosts)
    return [Local("CAs and per-host, per-purpose certificates in state/pki", run, key=key)]


@pki.check
def _pki_check(ctx: Ctx, host: Host) -> bool:
    from runbook.sections.tls_files import host_purposes, sans

    for h in ctx.inventory.hosts:
        dns, ips = sans(ctx, h)
        if any(ctx.pki.problems(h.name, p, dns, ips) for p in host_purposes(h, ctx.inventory)):
            return False
    return True


@pki.undo
def _pki_undo(ctx: Ctx, host: Host) -> list:
    # Not reversible: deleting the CA would orphan every certificate on the hosts, and a new CA would
    # break a running cluster. The CA and certificates stay; re-applying reuses them.
    return []


@section.step("tls", role="etcd")
def tls(ctx: Ctx, host: Host) -> list:
    """TLS files: the CAs and the etcd-peer, etcd-server (owner etcd) and etcd-root (owner root) pairs
    Dir 0750, keys 0600. The walk-through's chmod -R 744 made the one shared key world-readable; fixed."""
    return tls_files(ctx, host, ctx.paths.etcd_tls_dir, "etcd")


@tls.check
def _tls_check(ctx: Ctx, host: Host) -> str:
    return tls_check(ctx.paths.etcd_tls_dir, host, "etcd")


@tls.undo
def _tls_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"rm -rf {ctx.paths.etcd_tls_dir}")]


# 5 -------------------------------------------------------------------------------------------
def config_put(ctx: Ctx, host: Host, state: str = "new", members: bool = True) -> Put:
    """The rendered config with this initial-cluster-state; members=False leaves initial-cluster out."""
    c = _ctx(ctx, host, state)
    if not members:
        c["initial_cluster"] = ""
    return template("etcd/etcd.conf.yml.j2", ctx.paths.etcd_conf, c, mode="0640", group="etcd")


def _config(ctx: Ctx, host: Host) -> Put:
    """The config as rendered for a new cluster; once the member has bootstrapped, the file says
    `initial-cluster-state: existing` (the config and existing steps edit it, a member that joined a running
    cluster was written so, by etcd.add): both count as in place."""
    return replace(config_put(ctx, host), accept=(config_put(ctx, host, "existing").sha256,))


@section.step("config", role="etcd")
def config(ctx: Ctx, host: Host) -> list:
    """Config: /etc/etcd/etcd.conf.yml with every parameter of the walk-through (step 4)
    Rendered with initial-cluster-state: new; a member already bootstrapped keeps `existing`."""
    conf = ctx.paths.etcd_conf
    return [_config(ctx, host),
            Run(f"if [ -d {ctx.paths.etcd_data_dir}/member ]; then sed -i "
                f"'s/^initial-cluster-state: new$/initial-cluster-state: existing/' {conf}; fi")]


# 6 -------------------------------------------------------------------------------------------
@section.step("unit", role="etcd")
def unit(ctx: Ctx, host: Host) -> list:
    """Unit: /etc/systemd/system/etcd.service (User=etcd, Type=notify), daemon-reload, enable
    Steps 5 and 6 of the walk-through."""
    return unit_actions("etcd", template("systemd/etcd.service.j2", ctx.paths.etcd_unit, _ctx(ctx, host)))


@unit.check
def _unit_check(ctx: Ctx, host: Host) -> str:
    return "systemctl is-enabled -q etcd"


@unit.undo
def _unit_undo(ctx: Ctx, host: Host) -> list:
    return unit_undo("etcd")


# 7 -------------------------------------------------------------------------------------------
def _all_endpoints(ctx: Ctx) -> str:
    return ",".join(f"https://{h.name}:2379" for h in ctx.inventory.etcd)


def _health(ctx: Ctx, host: Host) -> str:
    """The member's own `endpoint health`, as the checks ask it: once per --verify batch of the host
    (runbook.core.shared), for etcd.start and etcd.existing alike."""
    return shared(etcdctl(ctx, host, "endpoint health"))


@section.step("start", role="etcd", kind="barrier")
def start(ctx: Ctx, host: Host) -> list:
    """Start: every etcd member at once, then a bounded wait until every member is healthy
    The walk-through starts them one by one within 30 seconds; a barrier step removes that race."""
    return [Run("systemctl start etcd", timeout=120),
            Run(wait_for(etcdctl(ctx, host, "endpoint health", _all_endpoints(ctx)), 90), timeout=120)]


@start.check
def _start_check(ctx: Ctx, host: Host) -> str:
    return f"systemctl is-active -q etcd && {_health(ctx, host)}"


@start.undo
def _start_undo(ctx: Ctx, host: Host) -> list:
    return [Run("systemctl stop etcd")]


# 7b ------------------------------------------------------------------------------------------
def _prefix(ctx: Ctx) -> str:
    return ctx.inventory.cluster.namespace.rstrip("/") + "/"


def _auth_script(ctx: Ctx, host: Host) -> str:
    """Users and roles, then auth on; every command idempotent. The patroni password arrives on stdin."""
    e = lambda args: etcdctl(ctx, host, args)  # noqa: E731  (etcdctl as root: the etcd-root certificate)
    prefix = shlex.quote(_prefix(ctx))
    return "; ".join([  # one line: the engine may feed stdin to the whole command
        "set -e", "read -r pw",
        f"{e('role get root')} >/dev/null 2>&1 || {e('role add root')}",
        f"{e('user get root')} >/dev/null 2>&1 || {e('user add root --no-password')}",
        f"{e('user grant-role root root')} >/dev/null",
        f"{e('role get patroni')} >/dev/null 2>&1 || {e('role add patroni')}",
        f"{e(f'role grant-permission patroni --prefix=true readwrite {prefix}')} >/dev/null",
        f"if {e('user get patroni')} >/dev/null 2>&1; then printf '%s\\n' \"$pw\" | "
        f"{e('user passwd patroni --interactive=false')} >/dev/null; "
        f"else printf '%s\\n' \"$pw\" | {e('user add patroni --interactive=false')} >/dev/null; fi",
        f"{e('user grant-role patroni patroni')} >/dev/null",
        f"{e('auth status')} | grep -q 'Authentication Status: true' || {e('auth enable')}",
    ])


@section.step("auth", role="etcd", kind="serial", host_order=lambda ctx, hosts: sorted(hosts, key=lambda h: h.name))
def auth(ctx: Ctx, host: Host) -> list:
    """Auth: etcd RBAC on: user root (by certificate CN, runbook only), user patroni read-write on the namespace
    Not in the walk-through, which gives every client certificate full access. The patroni user may read and
    write only the keys under the Patroni namespace prefix; root is held by the etcd-root certificate on
    the etcd hosts (CN=root, owner root). Patroni logs in by password over the JSON gateway."""
    return [Run(_auth_script(ctx, host), stdin=(ctx.secrets["etcd"]["password"] + "\n").encode(), timeout=120)]


@auth.check
def _auth_check(ctx: Ctx, host: Host) -> str:
    # auth on; user patroni holds exactly one role, patroni, which may read and write the prefix: `user get
    # --detail` prints `Role patroni` then its permissions, `[/patroni/, /patroni0) (prefix /patroni/)` under
    # KV Read and again under KV Write (two etcdctl starts, not three)
    prefix = json.dumps(f"(prefix {_prefix(ctx)})")
    verdict = ('/^Role / { n++; if ($0 != "Role patroni") bad = 1 } '
               f'index($0, {prefix}) {{ p++ }} END {{ exit !(n == 1 && !bad && p == 2) }}')
    return (f"{etcdctl(ctx, host, 'auth status')} | grep -q 'Authentication Status: true' && "
            f"{etcdctl(ctx, host, 'user get patroni --detail')} | awk {shlex.quote(verdict)}")


@auth.undo
def _auth_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"{etcdctl(ctx, host, 'auth disable')} >/dev/null")]


# 8 -------------------------------------------------------------------------------------------
@section.step("ectl", role="etcd")
def ectl(ctx: Ctx, host: Host) -> list:
    """ectl: the walk-through's etcdctl alias as /usr/local/bin/ectl (root only: it reads the host key)
    Usage on an etcd host: sudo ectl endpoint status -w table"""
    return [template("etcd/ectl.sh.j2", ctx.paths.ectl, _ctx(ctx, host), mode="0750")]


@ectl.check
def _ectl_check(ctx: Ctx, host: Host) -> str:
    # The file is in place (derived: content, mode, owner) and what it runs with works: the member answers
    # the etcd-root certificate, key and CA the script names (the etcdctl of etcd.start's probe, shared in a
    # --verify batch: no etcdctl start of its own).
    return f"{_health(ctx, host)} >/dev/null"


# 9 -------------------------------------------------------------------------------------------
def _etcd_order(ctx: Ctx, hosts: list[Host]) -> list[Host]:
    return sorted(hosts, key=lambda h: h.name)


# A new config: restart again. Not for a change of initial-cluster alone (a member added or removed): a
# bootstrapped member ignores it, and a membership change must not restart every member.
@section.step("existing", role="etcd", kind="serial", host_order=_etcd_order,
              depends_on=lambda ctx, host: [config_put(ctx, host, members=False)])
def existing(ctx: Ctx, host: Host) -> list:
    """Existing: initial-cluster-state: existing in the YAML file, members restarted one at a time
    The walk-through edits /etc/default/etcd, which etcd ignores with --config-file. Each member is
    restarted only after the previous one is healthy again, so the cluster keeps quorum."""
    conf = shlex.quote(ctx.paths.etcd_conf)
    # --cluster: every current member (from the member list), whatever the inventory lists today
    return [Run(f"sed -i 's/^initial-cluster-state: new$/initial-cluster-state: existing/' {conf}"),
            Run("systemctl restart etcd", timeout=120),
            Run(wait_for(etcdctl(ctx, host, "endpoint health --cluster"), 90), timeout=120)]


@existing.check
def _existing_check(ctx: Ctx, host: Host) -> str:
    return f"grep -q '^initial-cluster-state: existing$' {ctx.paths.etcd_conf} && {_health(ctx, host)}"


@existing.undo
def _existing_undo(ctx: Ctx, host: Host) -> list:
    return [Run(f"sed -i 's/^initial-cluster-state: existing$/initial-cluster-state: new/' {ctx.paths.etcd_conf}")]


__all__ = ["section", "etcdctl", "REMOTE_BUNDLE"]
