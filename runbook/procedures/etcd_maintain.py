"""`inv etcd.maintain`: alarms, defragmentation one member at a time, a verified snapshot on this machine.

Compaction (periodic, configured in etcd.conf.yml) only marks old revisions free; the backend file keeps
its size until a member is defragmented, and the quota counts the file. Defragmenting blocks that member
while it runs, so members go one at a time, followers first and the leader last, each followed by a
health check of the whole cluster. The procedure refuses to start when a member is unreachable or the
cluster has no quorum; an active alarm alone does not stop it (freeing space is how NOSPACE is fixed).
An alarm is disarmed only when asked (--disarm) and only once every backend is back under its quota.

Phases (each recorded in the ledger as an event of step `etcd.maintain`): survey, defrag <member>,
health, disarm, snapshot. Nothing here is destructive: an interrupted run is simply run again.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from runbook import console as ui
from runbook.cluster.commands import etcdctl
from runbook.cluster.context import Ctx
from runbook.cluster.readers import parse_endpoint_health
from runbook.errors import ProcedureFailed
from runbook.inventory import Host
from runbook.procedures.audit_health import QUOTA_SHARE_LIMIT, parse_alarms

STEP = "etcd.maintain"
SNAPSHOT_FETCH_LIMIT = 512 * 1024**2  # fetched through the SSH session: a Patroni DCS is a few MB
ALARM_ONLY = "Active Alarm"  # etcdctl reports a reachable member with an alarm as unhealthy


@dataclass
class Survey:
    via: Host  # the etcd host that answered
    health: dict[str, tuple[bool, str]]
    sizes: dict[str, tuple[int, int]]  # endpoint -> (dbSize, dbSizeInUse)
    leader: str | None  # the leader's endpoint
    alarms: list[tuple[str, str]]
    problems: list[str] = field(default_factory=list)


def parse_status_sizes(text: str) -> tuple[dict[str, tuple[int, int]], str | None]:
    """`endpoint status -w json` -> ({endpoint: (dbSize, dbSizeInUse)}, the leader's endpoint)."""
    sizes, leader = {}, None
    for e in json.loads(text or "[]"):
        st = e.get("Status", {})
        ep = e.get("Endpoint", "")
        sizes[ep] = (int(st.get("dbSize", 0)), int(st.get("dbSizeInUse", st.get("dbSize", 0))))
        if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
            leader = ep
    return sizes, leader


def health_problems(health: dict[str, tuple[bool, str]], expected: list[str]) -> list[str]:
    """Why the cluster is unfit for maintenance: a member that did not answer or is unhealthy for another
    reason than an active alarm."""
    problems = [f"{ep}: no answer" for ep in expected if ep not in health]
    for ep, (ok, err) in sorted(health.items()):
        if not ok and ALARM_ONLY not in err:
            problems.append(f"{ep}: unhealthy ({err or 'no error given'})")
    return problems


def defrag_order(endpoints: list[str], leader: str | None) -> list[str]:
    """Followers first (a blocked follower costs nothing), the leader last."""
    return sorted(endpoints, key=lambda ep: (ep == leader, ep))


def parse_snapshot_status(text: str) -> dict:
    """`etcdutl snapshot status -w json` -> {hash, revision, totalKey, totalSize}; {} when unreadable."""
    try:
        st = json.loads(text.strip().splitlines()[0]) if text.strip() else {}
    except (json.JSONDecodeError, IndexError):
        return {}
    return st if isinstance(st, dict) and {"hash", "revision", "totalKey", "totalSize"} <= set(st) else {}


def disarm_refusals(alarms: list[tuple[str, str]], sizes: dict[str, tuple[int, int]], quota: int) -> list[str]:
    """Reasons not to disarm: a CORRUPT alarm (a member to restore), a backend still near its quota."""
    out = [f"member {m} raised CORRUPT: restore that member from a snapshot; disarming hides it"
           for m, a in alarms if a == "CORRUPT"]
    out += [f"{ep}: backend {size // 1024**2} MB is still over {QUOTA_SHARE_LIMIT:.0%} of the quota "
            f"{quota // 1024**2} MB: compact (etcdctl compact <revision>) and defragment again first"
            for ep, (size, _) in sorted(sizes.items()) if size > QUOTA_SHARE_LIMIT * quota]
    return out


class Maintenance:
    def __init__(self, ctx: Ctx, *, disarm: bool = False, snapshot: bool = True, health_wait: float = 60):
        self.ctx, self.disarm, self.snapshot, self.health_wait = ctx, disarm, snapshot, health_wait
        self.hosts = ctx.inventory.etcd
        self.endpoints = [f"https://{h.name}:2379" for h in self.hosts]

    # -- reading ---------------------------------------------------------------------------------
    def _run(self, h: Host, args: str, timeout: float = 60, endpoints: str | None = None):
        return self.ctx.transport.run(h, etcdctl(self.ctx, h, args, endpoints), timeout=timeout)

    def survey(self) -> Survey:
        eps = ",".join(self.endpoints)
        errors = []
        for h in self.hosts:
            try:
                health = self._run(h, "endpoint health -w json", endpoints=eps)
            except Exception as exc:  # an unreachable host: ask the next one
                errors.append(f"{h.name}: {str(exc).splitlines()[0]}")
                continue
            if not health.stdout.strip().startswith("["):
                errors.append(f"{h.name}: {(health.stderr.strip() or 'no answer')[-200:]}")
                continue
            status = self._run(h, "endpoint status -w json", endpoints=eps)
            alarms = self._run(h, "alarm list")
            sizes, leader = parse_status_sizes(status.stdout if status.stdout.strip().startswith("[") else "")
            s = Survey(h, parse_endpoint_health(health.stdout), sizes, leader, parse_alarms(alarms.stdout))
            s.problems = health_problems(s.health, self.endpoints)
            if not alarms.ok:
                s.problems.append(f"alarm list failed on {h.name}: {alarms.stderr.strip()[-200:]}")
            return s
        raise ProcedureFailed("no etcd host answered `endpoint health`: " + "; ".join(errors), 1)

    def healthy_within(self, seconds: float) -> list[str]:
        """Poll (bounded) until every member is healthy again; the remaining problems ([] = healthy)."""
        deadline, problems = time.monotonic() + seconds, ["not asked"]
        for _ in range(int(seconds) + 2):
            try:
                problems = self.survey().problems
            except ProcedureFailed as exc:
                problems = [str(exc)]
            if not problems or time.monotonic() >= deadline:
                break
            time.sleep(1)
        return problems

    def _event(self, host: str, kind: str, action: str, rc: int, out: str = "", err: str = "",
               t0: float | None = None) -> None:
        if not self.ctx.options.dry:
            self.ctx.ledger.event(host, STEP, kind, action, rc, out, err,
                                  None if t0 is None else round(time.monotonic() - t0, 3))

    # -- the procedure -------------------------------------------------------------------------------
    def run(self) -> dict:
        dry, quota = self.ctx.options.dry, self.ctx.inventory.cluster.etcd_quota_backend_bytes
        s = self.survey()
        by_ep = {f"https://{h.name}:2379": h for h in self.hosts}
        self._event(s.via.name, "survey", "endpoint health, endpoint status, alarm list", 1 if s.problems else 0,
                    json.dumps({"sizes": s.sizes, "leader": s.leader, "alarms": s.alarms}), "\n".join(s.problems))
        ui.console.print(ui_sizes(s, quota))
        for m, a in s.alarms:
            ui.console.print(f"[red]active alarm {a}[/] raised by member {m}")
        if s.problems:
            raise ProcedureFailed("etcd.maintain refused: the cluster is not healthy, and defragmenting would "
                                  "take another member out:\n  " + "\n  ".join(s.problems), 1)
        order = defrag_order(list(by_ep), s.leader)
        result: dict = {"defragmented": [], "alarms": [f"{m}:{a}" for m, a in s.alarms], "disarmed": False}
        if dry:
            ui.console.print("[bold]dry run[/]: nothing changes. It would:")
            for ep in order:
                ui.console.print(f"  defragment {by_ep[ep].name}{' (leader, last)' if ep == s.leader else ''}, "
                                 f"then wait up to {self.health_wait:.0f}s until every member is healthy")
            if s.alarms:
                ui.console.print("  " + ("disarm the alarms if every backend is under the quota" if self.disarm
                                         else "leave the alarms armed (--disarm not given)"))
            if self.snapshot:
                ui.console.print(f"  save a snapshot from {by_ep[order[0]].name} to {snapshot_dir(self.ctx)} "
                                 "(0600), verified with etcdutl snapshot status")
            result["dry"] = True
            return result
        for ep in order:
            h = by_ep[ep]
            t0 = time.monotonic()
            r = self._run(h, "--command-timeout=120s defrag", timeout=180)
            self._event(h.name, "defrag", f"etcdctl defrag --endpoints={ep}", r.rc, r.stdout, r.stderr, t0)
            if not r.ok:
                raise ProcedureFailed(f"defragmenting {h.name} failed: {(r.stderr or r.stdout).strip()[-300:]}; "
                                      "the other members were not touched after it. Run it again when the "
                                      "cause is fixed.", 1)
            problems = self.healthy_within(self.health_wait)
            self._event(h.name, "health", "endpoint health (all members)", 1 if problems else 0,
                        err="\n".join(problems), t0=t0)
            if problems:
                raise ProcedureFailed(f"after defragmenting {h.name} the cluster is not healthy within "
                                      f"{self.health_wait:.0f}s; stopped before the next member:\n  "
                                      + "\n  ".join(problems), 1)
            ui.console.print(f"  [green]✓[/] {h.name} defragmented ({time.monotonic() - t0:.1f}s), "
                             "every member healthy")
            result["defragmented"].append(h.name)
        after = self.survey()
        result["sizes_after"] = after.sizes
        if after.alarms and self.disarm:
            refusals = disarm_refusals(after.alarms, after.sizes, quota)
            if refusals:
                self._event(after.via.name, "disarm", "alarm disarm (refused)", 1, err="\n".join(refusals))
                raise ProcedureFailed("alarms left armed:\n  " + "\n  ".join(refusals), 1)
            r = self._run(after.via, "alarm disarm")
            self._event(after.via.name, "disarm", "etcdctl alarm disarm", r.rc, r.stdout, r.stderr)
            if not r.ok:
                raise ProcedureFailed(f"alarm disarm failed: {r.stderr.strip()[-300:]}", 1)
            result["disarmed"] = True
            ui.console.print("  [green]✓[/] alarms disarmed")
        elif after.alarms:
            ui.console.print("[yellow]alarms left armed[/]: once the cause is fixed, run `inv etcd.maintain "
                             "--disarm`")
        if self.snapshot:
            result["snapshot"] = self.save_snapshot(by_ep[order[0]])
        return result

    def save_snapshot(self, h: Host) -> dict:
        """Save on the member, check it there with etcdutl, fetch it, re-check its sha256 here (0600)."""
        ctx = self.ctx
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        remote = f"{ctx.paths.etcd_data_dir.rsplit('/', 1)[0]}/runbook-snapshot-{stamp}.db"
        b = ctx.paths.etcd_bin_dir
        t0 = time.monotonic()
        save = (f"set -e; umask 077; {etcdctl(ctx, h, '--command-timeout=120s snapshot save ' + remote)} "
                f">/dev/null; chmod 0600 {remote}; if [ -x {b}/etcdutl ]; then {b}/etcdutl snapshot status -w json "
                f"{remote}; else ETCDCTL_API=3 {b}/etcdctl snapshot status -w json {remote}; fi; "
                f"stat -c %s {remote}; sha256sum {remote} | cut -d' ' -f1")
        r = ctx.transport.run(h, save, timeout=300)
        lines = r.stdout.strip().splitlines()
        status = parse_snapshot_status(lines[0] if lines else "")
        self._event(h.name, "snapshot", f"etcdctl snapshot save {remote}; etcdutl snapshot status", r.rc,
                    r.stdout, r.stderr, t0)
        keep_remote = False
        try:
            if not r.ok or not status or len(lines) < 3:
                raise ProcedureFailed(f"snapshot on {h.name} failed or did not verify: "
                                      f"{(r.stderr or r.stdout).strip()[-300:]}", 1)
            size, sha = int(lines[-2]), lines[-1].strip()
            if size > SNAPSHOT_FETCH_LIMIT:
                keep_remote = True
                raise ProcedureFailed(f"the snapshot is {size // 1024**2} MB, too big to fetch through the session; "
                                      f"copy {h.name}:{remote} by hand (it is left there, 0600)", 1)
            data = base64.b64decode(ctx.transport.run(h, f"base64 -w0 {remote}", timeout=300).stdout)
        finally:
            if not keep_remote:
                ctx.transport.run(h, f"rm -f {remote}", timeout=60)
        if hashlib.sha256(data).hexdigest() != sha:
            raise ProcedureFailed(f"the snapshot fetched from {h.name} does not match its sha256 there; run it again",
                                  1)
        dest = snapshot_dir(ctx) / f"{ctx.inventory.cluster.name}-{stamp}-{h.name}.db"
        write_private(dest, data)
        self._event("local", "snapshot", f"fetched to {dest} (0600, sha256 {sha[:12]})", 0, json.dumps(status))
        ui.console.print(f"  [green]✓[/] snapshot {dest} ({len(data)} bytes, revision {status['revision']}, "
                         f"{status['totalKey']} keys, sha256 {sha[:12]})")
        return {"path": str(dest), "sha256": sha, "bytes": len(data), "from": h.name, **status}


def snapshot_dir(ctx: Ctx) -> Path:
    return ctx.state_dir / "etcd-snapshots"


def write_private(dest: Path, data: bytes) -> None:
    """0600 from the first byte (never world-readable, not even briefly), in a 0700 directory."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dest.parent, 0o700)
    tmp = dest.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def human(n: int) -> str:
    return f"{n / 1024**2:.1f} MB" if n >= 1024**2 else f"{n / 1024:.0f} kB"


def ui_sizes(s: Survey, quota: int):
    from rich.table import Table

    t = Table("member", "leader", "db size", "in use", "of quota", "health",
              title=f"etcd via {s.via.name} (quota {human(quota)})", title_justify="left")
    for ep, (size, used) in sorted(s.sizes.items()):
        ok, err = s.health.get(ep, (False, "no answer"))
        t.add_row(ep, "yes" if ep == s.leader else "", human(size), human(used),
                  f"{size / quota:.1%}", "[green]ok[/]" if ok else f"[red]{err}[/]")
    return t
