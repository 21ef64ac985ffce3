"""cluster.audit's live probes: what a client on the network actually gets, and what sudo wrote to the journal.

- A login without TLS to every PostgreSQL host's port (and PgBouncer's when the front door is deployed),
  sent over the network from another PostgreSQL host: the raw startup packet of a libpq `sslmode=disable`
  client (no SSLRequest), for a role that does not exist and with no password, so it carries no secret and
  would send none even to a server that asked for a cleartext password. Refused = the server's first answer
  is an error: SQLSTATE 28000 (pg_hba rejects it, or has no entry for it) or PgBouncer's "SSL required".
  An authentication request, or a session, is a finding naming the host and port: the server was ready to
  log a client in over a connection without TLS.
- The journal's sudo entries (SYSLOG_IDENTIFIER=sudo: every command the runbook or an operator ran through
  sudo, with its full command line) on every host, matched against the cluster's secrets. The secrets go
  to the host on stdin, the match runs there, and only the time, unit and secret name come back.

The verdicts are pure functions of the probes' output (unit-tested on hand-written answers).
"""
from __future__ import annotations

import shlex
from datetime import datetime, timezone

from collections.abc import Callable

from runbook.cluster.context import Ctx
from runbook.core.transport import Result
from runbook.inventory import Host

PG_PORT = 5432
PROBE_ROLE = "runbook_audit_probe"
AUTH_NAMES = {0: "no password at all (trust)", 3: "a cleartext password", 5: "an md5 password",
              7: "GSSAPI", 9: "SSPI", 10: "SCRAM (SASL)"}

# argv: host:port targets (addresses only); stdout: one `target|verdict` line per target
PLAIN_PROBE = r"""import socket, struct, sys
ROLE = sys.argv[1]
def read(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b
def probe(host, port):
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
    except OSError as e:
        return "unreachable:" + (e.strerror or type(e).__name__)
    try:
        s.settimeout(5)
        params = b"user\0" + ROLE.encode() + b"\0database\0postgres\0application_name\0runbook-audit\0\0"
        s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        kind, n = struct.unpack("!ci", read(s, 5))
        body = read(s, min(n - 4, 4096))
        if kind == b"R":
            return "auth:%d" % struct.unpack("!i", body[:4])[0]
        if kind == b"E":
            f = {p[:1].decode(): p[1:].decode(errors="replace") for p in body.split(b"\0") if p}
            return "error:%s:%s" % (f.get("C", ""), f.get("M", "").replace("|", "/").replace("\n", " "))
        return "other:" + kind.decode(errors="replace")
    except (OSError, EOFError, struct.error) as e:
        return "broken:" + type(e).__name__ + " " + str(e)[:80]
    finally:
        s.close()
for t in sys.argv[2:]:
    h, _, p = t.rpartition(":")
    print(t + "|" + probe(h, p), flush=True)
"""

SUDO_SCAN = r"""p=$(cat)
printf '%s\n' "$p" | { journalctl --no-pager -q -o json SYSLOG_IDENTIFIER=sudo </dev/null 2>/dev/null | awk '
BEGIN { while ((getline l < "/dev/fd/3") > 0) { i = index(l, "\t")
    if (i > 1) { n++; name[n] = substr(l, 1, i - 1); val[n] = substr(l, i + 1) } } }
{ for (k = 1; k <= n; k++) if (index($0, val[k])) {
    t = ""; u = ""
    if (match($0, /"__REALTIME_TIMESTAMP":"[0-9]+"/)) t = substr($0, RSTART + 24, RLENGTH - 25)
    if (match($0, /"_SYSTEMD_UNIT":"[^"]*"/)) u = substr($0, RSTART + 17, RLENGTH - 18)
    else if (match($0, /"_PID":"[0-9]+"/)) u = "pid " substr($0, RSTART + 8, RLENGTH - 9)
    print "match|" t "|" u "|" name[k] } }
END { print "scanned|" NR "|" n }'; } 3<&0"""


# -- verdicts -----------------------------------------------------------------------------------
def plain_verdict(target: str, answer: str, prober: str) -> list[str]:
    """One probe's answer (`auth:10`, `error:28000:...`, `unreachable:...`) -> findings for target."""
    kind, _, rest = answer.partition(":")
    code, _, message = rest.partition(":")
    if kind == "error" and (code == "28000" or "SSL required" in message):
        return []
    if kind == "auth":
        what = AUTH_NAMES.get(int(code) if code.isdigit() else -1, f"authentication type {code}")
        return [f"{target} accepted a login without TLS from {prober} and asked for {what}: pg_hba (or the "
                "pooler) lets clients in over a connection without TLS"]
    if kind == "error":
        return [f"{target} answered a login without TLS from {prober} with SQLSTATE {code} ({message[:120]}), "
                "not a refusal for want of TLS"]
    if kind == "unreachable":
        return [f"{target} could not be reached from {prober} ({rest}): the refusal of a login without TLS "
                "is not proven"]
    return [f"{target}: the probe from {prober} got {answer[:160] or 'no answer'}"]


def parse_plain_probe(out: str) -> dict[str, str]:
    """`target|answer` lines -> {target: answer}."""
    return dict(ln.split("|", 1) for ln in out.splitlines() if "|" in ln)


def check_sudo_scan(out: str, host: str) -> list[str]:
    """SUDO_SCAN's `match|µs|unit|secret name` lines -> one finding per (entry, secret), never the value."""
    problems, scanned = [], False
    for ln in out.splitlines():
        f = ln.split("|")
        if f[0] == "scanned":
            scanned = True
        elif f[0] == "match" and len(f) == 4:
            when = (datetime.fromtimestamp(int(f[1]) / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                    if f[1].isdigit() else "unknown time")
            msg = (f"{host}: a sudo journal entry at {when} (unit {f[2] or 'unknown'}) holds the {f[3]} password: "
                   "rotate it (`inv secrets.rotate`) and vacuum the journal")
            if msg not in problems:
                problems.append(msg)
    return problems if scanned else [f"{host}: the sudo journal scan returned nothing"]


# -- remote -------------------------------------------------------------------------------------
def probe_targets(ctx: Ctx, h: Host) -> list[tuple[str, str]]:
    """(what, host:port) probed on h: PostgreSQL, and PgBouncer when the front door is deployed."""
    targets = [("PostgreSQL", f"{h.address}:{PG_PORT}")]
    if ctx.inventory.cluster.vip is not None:
        targets.append(("PgBouncer", f"{h.address}:{ctx.inventory.cluster.ports.pgbouncer}"))
    return targets


def first_answer(ctx: Ctx, hosts: list[Host], command: Callable[[Host], str], stdin: bytes,
                 timeout: float = 60) -> tuple[Result | None, Host | None, list[str]]:
    """Run a probe as postgres on the first of *hosts* that runs it: (its result, that host, why the ones before
    it did not); (None, None, reasons) when none did."""
    errors: list[str] = []
    for h in hosts:
        try:
            r = ctx.transport.run(h, command(h), user="postgres", stdin=stdin, timeout=timeout)
        except Exception as exc:  # an unreachable prober: try the next one
            errors.append(f"{h.name}: {str(exc).splitlines()[0]}")
            continue
        if r.ok:
            return r, h, errors
        errors.append(f"{h.name}: {r.stderr.strip()[-160:] or f'exit {r.rc}'}")
    return None, None, errors


def _same(cmd: str) -> Callable[[Host], str]:
    return lambda _h: cmd


def audit_plain_logins(ctx: Ctx) -> list:
    """Each PostgreSQL host's ports probed from the next PostgreSQL host (the first one that answers SSH)."""
    from runbook.procedures.audit import Check

    pg = list(ctx.inventory.postgres)
    checks = []
    for i, h in enumerate(pg):
        targets = probe_targets(ctx, h)
        argv = " ".join(shlex.quote(a) for a in (PROBE_ROLE, *(t for _, t in targets)))
        # a peer first; the host itself only when no peer answers
        cmd = f"{ctx.paths.patroni_venv}/bin/python - {argv}"
        r, p, errors = first_answer(ctx, [*pg[i + 1:], *pg[:i + 1]], _same(cmd), PLAIN_PROBE.encode())
        answers, prober = (parse_plain_probe(r.stdout), p.name) if r is not None and p is not None else (None, "")
        for what, target in targets:
            name = f"{what} refuses a client without TLS ({target})"
            if answers is None:
                checks.append(Check(h.name, name, [f"no PostgreSQL host could run the probe: {'; '.join(errors)}"]))
            else:
                checks.append(Check(h.name, name, plain_verdict(target, answers.get(target, ""), prober)))
    return checks


def secret_lines(secrets: dict) -> bytes:
    """`name<TAB>value` per secret value (passwords, basic-auth tokens): SUDO_SCAN's stdin."""
    from runbook.credentials.secrets import secret_values

    return "".join(f"{role}\t{v}\n" for role, entry in sorted(secrets.items())
                   for v in secret_values({role: entry})).encode()


def audit_sudo_journal(ctx: Ctx, h: Host):
    from runbook.procedures.audit import Check

    r = ctx.transport.run(h, SUDO_SCAN, stdin=secret_lines(ctx.secrets), timeout=300)
    return Check(h.name, "no secret in the journal's sudo entries",
                 check_sudo_scan(r.stdout, h.name) if r.ok else
                 [f"the sudo journal scan failed: {r.stderr.strip()[-160:] or f'exit {r.rc}'}"])
