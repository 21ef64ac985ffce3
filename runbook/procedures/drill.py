"""`inv drill.failover|switchover`: fault drills on lab hosts, measured under a concurrent writer.

The writer (psycopg 3 on the control machine, libpq multi-host with target_session_attrs=read-write)
inserts numbered rows and keeps the time of every acknowledged one; at the end every acknowledged
row must be present on the final primary. All waits are bounded (patroni_api.wait).
"""
from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runbook import console as ui
from runbook.cluster.context import Ctx
from runbook.cluster.readers import Member, host_of, members, wait
from runbook.core.transport import SshTransport
from runbook.errors import ProcedureFailed
from runbook.inventory import Host

TABLE = "runbook_drill"
PG_PORT = 5432


# -- the writer ---------------------------------------------------------------------------------
def writer_dsn(ctx: Ctx) -> str:
    """libpq multi-host DSN for the admin user over TLS (verify-ca); keepalives so a dead peer is noticed."""
    parts = {"host": ",".join(h.address for h in ctx.inventory.postgres), "port": str(PG_PORT),
             "dbname": "postgres", "user": ctx.secrets["admin"]["username"],
             "password": ctx.secrets["admin"]["password"], "sslmode": "verify-ca",
             "sslrootcert": str(ctx.pki_dir / "ca.crt"), "target_session_attrs": "read-write",
             "connect_timeout": "3", "keepalives": "1", "keepalives_idle": "2", "keepalives_interval": "1",
             "keepalives_count": "3", "tcp_user_timeout": "5000", "application_name": "runbook-drill"}
    return " ".join(f"{k}={v}" for k, v in parts.items())


@dataclass
class Writer:
    """A thread inserting (run, seq) rows; reconnects on any error; never reuses a seq."""

    dsn: str
    run: str
    interval: float = 0.05
    acked: list[tuple[int, float]] = field(default_factory=list)  # (seq, monotonic time of the ack)
    local_only: list[int] = field(default_factory=list)  # commits whose sync-rep wait was cancelled
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)  # first line of each error's message (no DSN in it)
    started: float = 0.0
    stopped: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drill-writer", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 30) -> bool:
        """Stop and join (bounded); False when the thread is still stuck in a call."""
        self._stop.set()
        self._thread.join(timeout)
        self.stopped = time.monotonic()
        return not self._thread.is_alive()

    def _loop(self) -> None:
        import psycopg

        conn, seq, warned = None, 0, []
        while not self._stop.is_set():
            seq += 1
            try:
                if conn is None:
                    # no server-side prepared statements: through PgBouncer's transaction pooling the next
                    # statement may run on another server connection
                    conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None)
                    conn.add_notice_handler(lambda d: warned.append(d.message_primary or ""))
                warned.clear()
                conn.execute(f"INSERT INTO {TABLE} (run, seq) VALUES (%s, %s)", (self.run, seq))
            except psycopg.Error as exc:
                self.errors += 1
                self.error_kinds[(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]] += 1
                _close(conn)
                conn = None
                self._stop.wait(0.1)
                continue
            if any("synchronous replication" in w for w in warned):
                self.local_only.append(seq)  # committed locally, not confirmed by the sync standby
            else:
                self.acked.append((seq, time.monotonic()))
            self._stop.wait(self.interval)
        _close(conn)

    def first_ack_after(self, t: float) -> float | None:
        return next((at for _, at in list(self.acked) if at > t), None)

    def gap(self, start: float | None = None, end: float | None = None) -> tuple[float, float]:
        """(longest time without an acknowledged write within [start, end], when that gap ended)."""
        lo = self.started if start is None else start
        hi = (self.stopped or time.monotonic()) if end is None else end
        times = [lo] + [at for _, at in list(self.acked) if lo < at < hi] + [hi]
        return max(((b - a, b) for a, b in zip(times, times[1:], strict=False)), default=(0.0, hi))


def _close(conn: Any) -> None:
    """Close a psycopg connection that may already be broken (a failover just killed its server)."""
    if conn is None:
        return None
    try:
        conn.close()
    except Exception:  # psycopg raises various errors on a connection whose server vanished
        pass
    return None


def prepare_table(ctx: Ctx, leader: Host) -> None:
    """The writer's table, created by postgres on the leader (admin may not create in public on PG15)."""
    from runbook.cluster.commands import psql

    admin = ctx.secrets["admin"]["username"]
    sql = (f"CREATE TABLE IF NOT EXISTS {TABLE} (run text, seq int, at timestamptz DEFAULT now(), "
           f"PRIMARY KEY (run, seq)); GRANT SELECT, INSERT ON {TABLE} TO {admin};")
    r = ctx.transport.run(leader, psql(ctx, f"-v ON_ERROR_STOP=1 -c {shlex.quote(sql)}"), user="postgres",
                          timeout=60)
    if not r.ok:
        raise ProcedureFailed(f"creating {TABLE} on {leader.name} failed: {r.stderr.strip()}", 1)


def prove(ctx: Ctx, w: Writer) -> dict:
    """Every acknowledged row on the final primary (reached like the writer: read-write)."""
    import psycopg

    def ask() -> tuple[str, set[int]]:
        with psycopg.connect(writer_dsn(ctx)) as conn:
            row = conn.execute("SELECT inet_server_addr()").fetchone()
            addr = str(row[0]) if row else "?"
            rows = conn.execute(f"SELECT seq FROM {TABLE} WHERE run = %s", (w.run,)).fetchall()
        return addr, {r[0] for r in rows}

    got = wait(ask, 60, 1)
    if not got:
        raise ProcedureFailed("proof failed: no read-write primary answered within 60 s", 1)
    addr, present = got
    acked = [s for s, _ in w.acked]
    lost = sorted(set(acked) - present)
    final = next((h.name for h in ctx.inventory.postgres if h.address == addr), addr)
    return {"final_primary": final, "acknowledged": len(acked), "present": len(present & set(acked)),
            "lost": len(lost), "lost_seqs": lost[:20], "local_only_commits": len(w.local_only),
            "write_errors": w.errors, "write_error_kinds": dict(w.error_kinds.most_common(3)),
            "longest_write_gap_s": round(w.gap()[0], 2)}


# -- lab guard and helpers ----------------------------------------------------------------------
def lab_problems(ctx: Ctx, power: bool = True) -> list[str]:
    """Why this inventory's hosts are not (running) lab machines; empty when they are. *power*: the drill powers
    hosts off and on, so it needs root and the lab of this very inventory file; without it (a drill that only
    drops a table) the file may be a copy that adds hosts (the backup and restore hosts)."""
    from runbook.lab import lab as labmod

    out = [] if not power or os.geteuid() == 0 else ["the lab's kill/start need root"]
    for h in ctx.inventory.hosts:
        m = labmod.machine(ctx.inventory, h)
        try:
            meta = json.loads(m.meta.read_text())
        except (OSError, ValueError):
            out.append(f"{h.name}: not a lab host (no {m.meta})")
            continue
        if meta.get("address") != h.address or (power and meta.get("inventory") != str(ctx.inventory.path)):
            out.append(f"{h.name}: its lab record {m.meta} belongs to another address or inventory")
        elif not m.running():
            out.append(f"{h.name}: lab host is not running (`inv lab.up`)")
    return out


def require_lab(ctx: Ctx, what: str, power: bool = True) -> None:
    problems = lab_problems(ctx, power)
    if problems:
        does = "powers lab hosts off and on" if power else "changes data on the cluster"
        raise ProcedureFailed(f"{what} refused: it {does}, and only runs against the lab "
                              f"(runbook/lab) of {ctx.inventory.path}:\n  " + "\n  ".join(problems), 2)


def one_leader(ms: list[Member]) -> Member:
    leaders = [m for m in ms if m.is_leader]
    if len(leaders) != 1 or not any(m.streaming for m in ms):
        raise ProcedureFailed("drill refused: needs one running leader and a streaming replica; now: "
                   + ", ".join(f"{m.name}={m.role}/{m.state}" for m in ms), 1)
    return leaders[0]


def start_writer(ctx: Ctx, kind: str, dsn: str | None = None) -> Writer:
    """The writer on `dsn` (default: libpq multi-host to the PostgreSQL hosts; the front door drills pass
    VIP:5000, runbook.procedures.frontdoor.frontdoor_dsn)."""
    w = Writer(dsn or writer_dsn(ctx), f"{kind}-{ctx.ledger.run_id}-{int(time.time())}")
    w.start()
    if not wait(lambda: len(w.acked) >= 5, 30, 0.2):
        w.stop(5)
        raise ProcedureFailed(f"the writer could not write before the drill (errors: {w.errors}); "
                              "is the cluster up?", 1)
    return w


def log_lines(ctx: Ctx, h: Host) -> int:
    r = ctx.transport.run(h, f"cat {ctx.paths.patroni_log_dir}/patroni.log 2>/dev/null | wc -l", timeout=30)
    return int(r.stdout.strip() or 0) if r.ok and r.stdout.strip().isdigit() else 0


def rewind_evidence(ctx: Ctx, h: Host, since: int) -> list[str]:
    """Patroni log lines about rewind / crash recovery written after line `since`."""
    r = ctx.transport.run(h, f"tail -n +{since + 1} {ctx.paths.patroni_log_dir}/patroni.log 2>/dev/null | "
                             "grep -iE 'rewind|crash recovery|single.user' | tail -n 8", timeout=30)
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]


def rewind_verdict(lines: list[str], old_tl: int | None, new_tl: int | None) -> str:
    """A one-line reading of the rewind evidence and the timelines (pure, unit-testable)."""
    text = "\n".join(lines).lower()
    tl = f"timeline {old_tl} = leader's {new_tl}" if old_tl == new_tl else f"timeline {old_tl} != leader's {new_tl}"
    if "running pg_rewind" in text or "pg_rewind exit" in text or "rewind" in text and "success" in text:
        return f"pg_rewind ran; {tl}"
    if "rewind" in text:
        return f"rewind mentioned, not confirmed: {lines[-1][:160]}; {tl}"
    return f"no pg_rewind in the Patroni log (not needed: no diverging WAL); {tl}"


# -- failover -----------------------------------------------------------------------------------
def restore_names(ctx: Ctx, h: Host) -> bool:
    """The lab rewrites /etc/hosts at every boot (a real server keeps it): re-apply the etcd.names step
    when its check fails, through the engine (recorded in the ledger). True when it had to."""
    from runbook.core.engine import Decision, evaluate_check, execute
    from runbook.core.step import fingerprint
    from runbook.sections.etcd import names

    if evaluate_check(ctx, names, h):
        return False
    actions = names.actions_fn(ctx, h)
    err = execute(ctx, Decision(h, names, True, "drifted", "lab boot reset /etc/hosts", actions,
                                fingerprint(actions)), "drill")
    if err:
        raise ProcedureFailed(f"{h.name}: re-applying etcd.names after the boot failed: {err}", 1)
    return True


def boot_back(inv, name: str) -> None:
    """Never leave the lab with a host powered off (a drill that failed before booting it again)."""
    from runbook.lab import lab as labmod

    try:
        labmod.start(inv, name)
    except Exception as exc:
        ui.console.print(f"[red]could not boot {name} again: {exc}; run `inv lab.start {name}`[/]")


def _fresh_transport(ctx: Ctx) -> None:
    """Drop every cached SSH connection (a killed host's is dead); the others reconnect on demand."""
    ctx.transport.close()
    ctx.transport = SshTransport()


def boot(ctx: Ctx, h: Host, res: dict) -> None:
    """Power a killed lab host on again; res gets boot_s and names_reapplied (the lab's boot resets
    /etc/hosts: etcd.names re-applied through the engine)."""
    from runbook.lab import lab as labmod

    t_boot = time.monotonic()
    labmod.start(ctx.inventory, h.name)
    _fresh_transport(ctx)
    res["boot_s"] = round(time.monotonic() - t_boot, 2)
    if h.has("etcd") or h.has("postgres"):
        res["names_reapplied"] = restore_names(ctx, h)


def writes_go_on(w: Writer, rows: int = 5, seconds: float = 10) -> None:
    """Wait (bounded) for a few more acknowledged writes: the proof then covers writes made with every host
    back, not only those made while one was down."""
    t_mark = time.monotonic()
    wait(lambda: sum(at > t_mark for _, at in list(w.acked)) >= rows, seconds, 0.5)


def sync_standby_ready(ctx: Ctx, budget: float = 90) -> bool:
    """Until a switchover's prechecks pass (one leader, a sync standby streaming with lag 0, etcd healthy):
    what both drills need before they take the leader away; False when `budget` seconds were not enough."""
    from runbook.procedures.switchover import prechecks

    return bool(wait(lambda: not prechecks(ctx, members(ctx), None)[2], budget, 2))


def failover_drill(ctx: Ctx, write_wait: float, rejoin_timeout: float, dsn: str | None = None) -> dict:
    from runbook.lab import lab as labmod

    inv = ctx.inventory
    # Under synchronous_mode_strict only the sync standby may take over: right after a switchover Patroni names
    # it on its next cycle, and a leader killed before that has no successor (a drill that proves nothing).
    if not sync_standby_ready(ctx):
        raise ProcedureFailed("failover drill: no sync standby with lag 0 (or etcd unhealthy) within 90 s; "
                              "under synchronous_mode_strict only a sync standby may take over. Check "
                              "`inv cluster.status`, then run the drill again", 1)
    lead = one_leader(members(ctx))
    old = host_of(ctx, lead.name)
    survivors = [h for h in inv.postgres if h.name != old.name]
    since = log_lines(ctx, old)
    prepare_table(ctx, old)
    w = start_writer(ctx, "failover", dsn)
    res: dict = {"killed": old.name}
    booted = False

    def streams(name: str) -> Member | None:
        return next((m for m in members(ctx, via=survivors) if m.name == name and m.streaming), None)

    try:
        time.sleep(1)
        t0 = time.monotonic()
        res["kill"] = labmod.kill(inv, old.name)
        t_off = time.monotonic()
        ui.console.print(f"[red]✗[/] {old.name} powered off hard (it was the leader {lead.name})")
        _fresh_transport(ctx)
        new = wait(lambda: next((m for m in members(ctx, via=survivors)
                                 if m.is_leader and m.name != lead.name), None), 120, 0.5)
        if not new:
            raise ProcedureFailed(f"no new leader within 120 s after powering off {old.name}", 1)
        res.update(new_leader=new.name, promoted_s=round(time.monotonic() - t0, 2))
        ui.console.print(f"  {new.name} is the leader after {res['promoted_s']} s")
        writable = wait(lambda: w.first_ack_after(t_off), write_wait, 0.2)
        res["writable_before_old_leader_back"] = bool(writable)
        if not writable:
            ui.console.print(f"  no write acknowledged within {write_wait:.0f} s of the promotion (a synchronous "
                             "commit needs a sync standby); booting the old leader")
        t_boot = time.monotonic()
        boot(ctx, old, res)
        booted = True
        ui.console.print(f"  {old.name} booted again in {res['boot_s']} s; waiting until it streams")
        if res["names_reapplied"]:
            ui.console.print(f"  {old.name}: the lab boot reset /etc/hosts; etcd.names re-applied")
        back = wait(lambda: streams(lead.name), rejoin_timeout, 1)
        res["rejoined"] = bool(back)
        if back:
            res["rejoin_after_boot_s"] = round(time.monotonic() - t_boot, 2)
            res["old_leader_streaming_s"] = round(time.monotonic() - t0, 2)
        writable = writable or wait(lambda: w.first_ack_after(t_off), 60, 0.2)
        res["writable_s"] = round(writable - t0, 2) if writable else None
        writes_go_on(w)
        ms = members(ctx, via=survivors)
        new_tl = next((m.timeline for m in ms if m.is_leader), None)
        old_tl = next((m.timeline for m in ms if m.name == lead.name), None)
        res["timelines"] = {"leader": new_tl, "old_leader": old_tl}
        res["rewind_log"] = [ctx.redact(x) for x in rewind_evidence(ctx, old, since)]
        res["rewind"] = rewind_verdict(res["rewind_log"], old_tl, new_tl)
    finally:
        res["writer_stopped"] = w.stop(30)
        if not booted:
            boot_back(inv, old.name)
    res.update(prove(ctx, w))
    return res


# -- switchover ---------------------------------------------------------------------------------
def switchover_drill(ctx: Ctx, count: int, dsn: str | None = None) -> dict:
    from runbook.procedures.switchover import do_switchover

    lead = one_leader(members(ctx))
    prepare_table(ctx, host_of(ctx, lead.name))
    w = start_writer(ctx, "switchover", dsn)
    rounds: list[dict] = []
    try:
        for i in range(count):
            if not sync_standby_ready(ctx):
                raise ProcedureFailed(f"switchover {i + 1}: no sync standby with lag 0 (or etcd unhealthy) "
                                      "within 90 s", 1)
            t0 = time.monotonic()
            res = do_switchover(ctx, None)
            res["writer_gap_s"] = round(w.gap(t0, time.monotonic())[0], 2)
            rounds.append(res)
            ui.console.print(f"  [green]✓[/] switchover {i + 1}/{count} {res['from']} -> {res['to']}")
        time.sleep(1)
    finally:
        stopped = w.stop(30)
    return {"rounds": rounds, "writer_stopped": stopped, **prove(ctx, w)}


