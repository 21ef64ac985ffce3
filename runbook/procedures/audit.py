"""`inv cluster.audit`: read-only security checks over SSH; a Rich findings table, non-zero exit on findings.
The capacity checks (WAL held by slots, etcd alarms and quota) live in audit_health, the reading of the live
pg_hba rules in audit_hba, the probes of a login without TLS and the sudo journal scan in audit_probes.

The check functions are pure: they take command outputs (or local facts) and return the problems
they find (an empty list is a pass), so they are unit-tested on captured and constructed outputs.
Nothing here changes a host; the one POST (an unauthenticated /switchover with no target) is refused
before Patroni looks at it, and would be rejected as incomplete even if it were not.
"""
from __future__ import annotations

import fnmatch
import shlex
import sqlite3
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runbook.cluster.context import Ctx
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.audit_hba import HBA_SQL, check_pg_hba

STAT_FMT = "%n|%a|%U"


@dataclass(frozen=True)
class Rule:
    pattern: str  # a path or a glob (/etc/etcd/tls/*.key)
    mode: str  # "0600"
    owner: str


@dataclass
class Check:
    host: str
    name: str
    problems: list[str]
    warnings: list[str] = field(default_factory=list)  # shown, never a finding (e.g. no backups configured)


# -- pure checks ---------------------------------------------------------------------------------
def parse_stat(out: str) -> dict[str, tuple[str, str]]:
    """`stat -c '%n|%a|%U' ...` lines -> {path: (mode '0600', owner)}; error lines are ignored."""
    got = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[1].isdigit():
            got[parts[0]] = (parts[1].zfill(4), parts[2])
    return got


def check_modes(out: str, rules: list[Rule]) -> list[str]:
    """Every rule matches at least one path, and every matching path has the rule's mode and owner."""
    got, problems = parse_stat(out), []
    for r in rules:
        paths = sorted(p for p in got if fnmatch.fnmatchcase(p, r.pattern))
        if not paths:
            problems.append(f"{r.pattern}: missing")
        for p in paths:
            mode, owner = got[p]
            if (mode, owner) != (r.mode, r.owner):
                problems.append(f"{p} is {mode} {owner}, want {r.mode} {r.owner}")
    return problems


def check_local_mode(path: Path, mode: int | None) -> list[str]:
    """A local secret file: 0600 (None: it does not exist)."""
    if mode is None:
        return [f"{path}: missing"]
    m = stat.S_IMODE(mode)
    return [] if m == 0o600 else [f"{path} is {m:04o}, want 0600"]


def check_etcd_tls(with_cert_rc: int, plain_rc: int, no_cert_rc: int) -> list[str]:
    """A read with the host's client certificate works; plain http and TLS without a client cert fail."""
    if with_cert_rc != 0:
        return ["etcd did not answer a read with a client certificate: the refusal probes prove nothing"]
    problems = []
    if plain_rc == 0:
        problems.append("plain http on the client port was accepted")
    if no_cert_rc == 0:
        problems.append("a TLS client without a certificate was accepted (client-cert-auth off)")
    return problems


def parse_refusals(out: str) -> tuple[int, int] | None:
    """`plain=<rc> nocert=<rc>` (audit_etcd's side-by-side refusal probes) -> (plain rc, no-cert rc); None when
    the line is not there (the probe itself failed: that proves nothing either way)."""
    for line in out.splitlines():
        got = dict(part.partition("=")[::2] for part in line.split())
        if set(got) == {"plain", "nocert"} and all(v.isdigit() for v in got.values()):
            return int(got["plain"]), int(got["nocert"])
    return None


def check_etcd_config(grep_out: str) -> list[str]:
    """`grep -c '^ *client-cert-auth: true'` on the etcd YAML: both client and peer transport sections."""
    n = int(grep_out.strip() or 0) if grep_out.strip().isdigit() else 0
    return [] if n >= 2 else [f"client-cert-auth: true on {n} of 2 transports (client, peer)"]


def check_verify_client(grep_out: str) -> list[str]:
    """The `verify_client:` line(s) of the Patroni config: exactly `required`."""
    values = [ln.split(":", 1)[1].strip().strip("'\"") for ln in grep_out.splitlines() if ":" in ln]
    if values == ["required"]:
        return []
    return [f"restapi verify_client is {', '.join(values) or 'not set'}, want required"]


def check_rest_probe(out: str) -> list[str]:
    """The REST probe's `cert_no_auth=<http code>` (want 401) and `no_cert=<code|refused:...>` (want refused)."""
    kv = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    problems = []
    if kv.get("cert_no_auth") != "401":
        problems.append(f"POST without basic auth answered {kv.get('cert_no_auth', 'nothing')}, want 401")
    if not kv.get("no_cert", "").startswith("refused"):
        problems.append(f"a client without a certificate got {kv.get('no_cert', 'nothing')}, want a TLS refusal")
    return problems


def check_ssl(show_out: str) -> list[str]:
    return [] if show_out.strip() == "on" else [f"ssl is {show_out.strip() or 'unknown'}, want on"]


def check_unit_user(show_out: str, want: str) -> list[str]:
    got = show_out.strip().removeprefix("User=")
    return [] if got == want else [f"unit runs as {got or 'root (User= empty)'}, want {want}"]


def find_secrets(text: str, secrets: dict) -> list[str]:
    """The roles whose password (or basic-auth token) appears in text; never the values themselves."""
    from runbook.credentials.secrets import secret_values

    return sorted(role for role, entry in secrets.items() if any(v in text for v in secret_values({role: entry})))


def check_log_scan(out: str) -> list[str]:
    """The remote scan's `source|count of lines holding a secret`; unreadable output is a problem too."""
    problems, seen = [], 0
    for ln in out.splitlines():
        src, _, n = ln.rpartition("|")
        if not src:
            continue
        seen += 1
        if n.strip() not in ("", "0"):
            problems.append(f"{src}: {n.strip()} line(s) hold a secret")
    return problems if seen else ["the log scan returned nothing"]


# -- remote commands -----------------------------------------------------------------------------
def _stat_cmd(rules: list[Rule]) -> str:
    return f"stat -c '{STAT_FMT}' " + " ".join(r.pattern for r in rules) + " 2>&1; true"


LOG_SCAN = r"""p=$(cat)
scan() { printf '%s\n' "$p" | { "$@" 2>/dev/null | grep -c -F -f /dev/fd/3; } 3<&0; }
echo "journal (patroni, etcd)|$(scan journalctl --no-pager -q -u patroni -u etcd)"
find {log_dir} -type f 2>/dev/null | while IFS= read -r f; do echo "$f|$(scan cat "$f")"; done"""

REST_PROBE = r"""import ssl, sys, urllib.error, urllib.request
url, ca, crt, key = sys.argv[1:5]
def probe(cert):
    c = ssl.create_default_context(cafile=ca)
    c.check_hostname = False
    if cert:
        c.load_cert_chain(crt, key)
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    try:
        return str(urllib.request.urlopen(req, context=c, timeout=10).status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except Exception as e:
        return "refused:" + type(e).__name__
print("cert_no_auth=" + probe(True))
print("no_cert=" + probe(False))
"""


def etcd_rules(ctx: Ctx) -> list[Rule]:
    d = ctx.paths.etcd_tls_dir
    return [Rule(d, "0750", "etcd"), Rule(f"{d}/etcd-peer.key", "0600", "etcd"),
            Rule(f"{d}/etcd-server.key", "0600", "etcd"), Rule(f"{d}/etcd-root.key", "0600", "root")]


def patroni_rules(ctx: Ctx) -> list[Rule]:
    p = ctx.paths
    return [Rule(p.patroni_tls_dir, "0750", "postgres"), Rule(f"{p.patroni_tls_dir}/*.key", "0600", "postgres"),
            Rule(p.patroni_conf, "0600", "postgres")]


def audit_etcd(ctx: Ctx, h: Host) -> list[Check]:
    from runbook.cluster.commands import etcdctl

    run = lambda cmd, **kw: ctx.transport.run(h, cmd, timeout=60, **kw)  # noqa: E731
    tls = ctx.paths.etcd_tls_dir
    base = (f"ETCDCTL_API=3 {ctx.paths.etcd_bin_dir}/etcdctl --command-timeout=3s --dial-timeout=3s "
            "get /runbook-audit-probe")
    ok = run(etcdctl(ctx, h, "get /runbook-audit-probe"))
    # A refused client waits out etcdctl's dial timeout (gRPC retries a failed handshake until then): the two
    # refusal probes run side by side, 3 s for both instead of 6.
    refused = run(f"{base} --endpoints=http://{h.name}:2379 >/dev/null 2>&1 & p=$!; "
                  f"{base} --cacert={tls}/ca.crt --endpoints=https://{h.name}:2379 >/dev/null 2>&1; n=$?; "
                  'wait $p; echo "plain=$? nocert=$n"')
    rcs = parse_refusals(refused.stdout)
    return [Check(h.name, "etcd key and TLS dir modes", check_modes(run(_stat_cmd(etcd_rules(ctx))).stdout,
                                                                    etcd_rules(ctx))),
            Check(h.name, "etcd refuses plain http / no client cert",
                  check_etcd_tls(ok.rc, *rcs) if rcs else
                  [f"the refusal probes gave no answer (rc {refused.rc}): {refused.stderr.strip()[-200:]}"]),
            Check(h.name, "etcd client-cert-auth (client, peer)",
                  check_etcd_config(run(f"grep -c '^ *client-cert-auth: true' {ctx.paths.etcd_conf}").stdout)),
            Check(h.name, "etcd unit User=etcd", check_unit_user(run("systemctl show -p User etcd").stdout, "etcd"))]


def audit_postgres(ctx: Ctx, h: Host) -> list[Check]:
    from runbook.cluster.commands import psql

    run = lambda cmd, **kw: ctx.transport.run(h, cmd, timeout=60, **kw)  # noqa: E731
    p = ctx.paths
    tls = p.patroni_tls_dir
    probe_args = " ".join(shlex.quote(a) for a in (f"https://{h.address}:8008/switchover", f"{tls}/ca.crt",
                                                     f"{tls}/rest-client.crt", f"{tls}/rest-client.key"))
    rest = run(f"{p.patroni_venv}/bin/python - {probe_args}", user="postgres", stdin=REST_PROBE.encode())
    hba = run(psql(ctx, f"-tA -F '|' -c {shlex.quote(HBA_SQL)}"), user="postgres")
    ssl_on = run(psql(ctx, "-tAc 'show ssl'"), user="postgres")
    leftover = run(f"test ! -e {p.post_bootstrap}")
    return [Check(h.name, "Patroni key, TLS dir, config modes",
                  check_modes(run(_stat_cmd(patroni_rules(ctx))).stdout, patroni_rules(ctx))),
            Check(h.name, "no post_bootstrap script left after the bootstrap",
                  [] if leftover.ok else [f"{p.post_bootstrap} is still there (an older runbook left it with the "
                                          "admin password); `inv cluster.up` removes it (patroni.config)"]),
            Check(h.name, "REST API verify_client required",
                  check_verify_client(run(f"grep -E '^ *verify_client:' {p.patroni_conf}").stdout)),
            Check(h.name, "REST API refuses unauthenticated POST / no client cert",
                  check_rest_probe(rest.stdout) if rest.ok else [f"REST probe failed: {rest.stderr.strip()[-200:]}"]),
            Check(h.name, "PostgreSQL ssl on", check_ssl(ssl_on.stdout) if ssl_on.ok else
                  [f"psql failed: {ssl_on.stderr.strip()[-200:]}"]),
            Check(h.name, "pg_hba (live rules): hostssl + scram only, rejects before accepts",
                  check_pg_hba(hba.stdout) if hba.ok else [f"psql failed: {hba.stderr.strip()[-200:]}"]),
            Check(h.name, "patroni unit User=postgres",
                  check_unit_user(run("systemctl show -p User patroni").stdout, "postgres"))]


def audit_logs(ctx: Ctx, h: Host, values: list[str]) -> Check:
    r = ctx.transport.run(h, LOG_SCAN.replace("{log_dir}", shlex.quote(ctx.paths.log_dir)),
                          stdin=("\n".join(values) + "\n").encode(), timeout=300)
    return Check(h.name, "no secret in journal (patroni, etcd) or /data/log", check_log_scan(r.stdout))


def audit_local(ctx: Ctx) -> list[Check]:
    files = [ctx.state_dir / "secrets.yml", *sorted(ctx.pki_dir.rglob("*.key"))]
    problems = [p for f in files for p in check_local_mode(f, f.stat().st_mode if f.exists() else None)]
    if not list(ctx.pki_dir.rglob("*.key")):
        problems.append(f"{ctx.pki_dir}: no *.key")
    checks = [Check("local", "state/secrets.yml and state/pki/*.key 0600", problems)]
    db = ctx.state_dir / f"{ctx.inventory.cluster.name}.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        dump = "\n".join(conn.iterdump())
    leaked = find_secrets(dump, ctx.secrets)
    checks.append(Check("local", f"no secret in the ledger {db.name}",
                        [f"the password of {r} appears in the ledger" for r in leaked]))
    return checks


def audit_certificates(ctx: Ctx) -> list[Check]:
    """Every certificate on the hosts and the CAs: expiring within runbook.pki_expiry_days (default 30),
    expired, or differing from the record in state/pki (pki.status shows the whole table)."""
    from runbook.procedures.pki_status import collect, findings

    days = ctx.settings.pki_expiry_days if ctx.settings is not None else 30
    rows = collect(ctx)
    found = findings(rows, days)
    return [Check(host, f"certificates: expiry (< {days} days) and record",
                  [p for h, p in found if h == host]) for host in dict.fromkeys(r.host for r in rows)]


def run_audit(ctx: Ctx) -> list[Check]:
    from runbook.credentials.secrets import secret_values
    from runbook.procedures.audit_health import audit_etcd_capacity, audit_wal_retention
    from runbook.procedures.audit_probes import audit_plain_logins, audit_sudo_journal
    from runbook.procedures.audit_purposes import audit_wrong_purposes
    from runbook.procedures.frontdoor_audit import audit_balancer, audit_pooler

    if not (ctx.state_dir / "secrets.yml").exists():
        raise ProcedureFailed(f"{ctx.state_dir}/secrets.yml does not exist: nothing was installed from this "
                              "state dir", 2)
    from runbook.procedures.backup_ops import audit_backup

    checks = audit_local(ctx)
    checks.append(audit_backup(ctx))
    values = secret_values(ctx.secrets)

    def one_host(h: Host) -> list[Check]:
        found: list[Check] = []
        try:
            if h.has("etcd"):
                found += audit_etcd(ctx, h)
                found += audit_etcd_capacity(ctx, h)
            if h.has("postgres"):
                found += audit_postgres(ctx, h)
                found.append(audit_wal_retention(ctx, h))
                if ctx.inventory.cluster.vip is not None:
                    found += audit_pooler(ctx, h)
            if h.has("balancer"):
                found += audit_balancer(ctx, h)
            found.append(audit_logs(ctx, h, values))
            found.append(audit_sudo_journal(ctx, h))
        except Exception as exc:  # an unreachable host is a finding, the others are still audited
            found.append(Check(h.name, "reachable over SSH", [str(exc).splitlines()[0]]))
        return found

    # Every probe only reads: the hosts are audited side by side (runbook.parallel at a time) with the
    # cluster-wide probes, and the findings listed in the same order as one after the other.
    hosts = list(ctx.inventory.hosts)
    with ThreadPoolExecutor(max(1, min(ctx.options.parallel, len(hosts) + 3))) as pool:
        per_host = [pool.submit(one_host, h) for h in hosts]
        wide = [pool.submit(f, ctx) for f in (audit_plain_logins, audit_certificates, audit_wrong_purposes)]
        for f in per_host + wide:
            checks += f.result()
    return checks


